"""Ray Job entrypoint: `latentpipe verify`. Check a latent corpus: exactly once against its input, checksums, decode PSNR.

Submit to a cluster (token auth, README "Running on a Ray cluster": `ray job submit` needs
RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token; get it with
`ray get-auth-token` on the head node, never put it on the command line):

    export RAY_AUTH_MODE=token
    export RAY_ADDRESS=http://127.0.0.1:8265     # e.g. after kubectl port-forward svc/<head> 8265
    ray job submit --working-dir . -- python jobs/verify.py output=s3://bucket/latents/train samples=64

Run locally with the same arguments: `python jobs/verify.py ...`. The job exits 1 when a check
fails. The arguments are exactly those of the CLI command; everything happens in the library.
"""

import sys
from pathlib import Path

# Run from a source checkout (ray job submit --working-dir .) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import main  # noqa: E402
from pipeline.raynoise import filter_ray_noise  # noqa: E402

if __name__ == "__main__":
    filter_ray_noise()  # Ray's known-harmless ERROR lines out of the job log (see the module)
    sys.exit(main(["verify", *sys.argv[1:]]))
