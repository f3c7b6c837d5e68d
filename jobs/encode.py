"""Ray Job entrypoint: `latentpipe encode`. Encode image shards into latent shards + manifest with Ray Data and ONNX Runtime.

Submit to a cluster (token auth, README "Running on a Ray cluster": `ray job submit` needs
RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token; get it with
`ray get-auth-token` on the head node, never put it on the command line):

    export RAY_AUTH_MODE=token
    export RAY_ADDRESS=http://127.0.0.1:8265     # e.g. after kubectl port-forward svc/<head> 8265
    ray job submit --working-dir . -- python jobs/encode.py \
        input=s3://bucket/shards/train output=s3://bucket/latents/train encoder=/mnt/encoders/kl-f4/encoder.onnx num_actors=8

Run locally on embedded Ray with the same arguments: `python jobs/encode.py ...`.
The arguments are exactly those of the CLI command; everything happens in the library.
"""

import sys
from pathlib import Path

# Run from a source checkout (ray job submit --working-dir .) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import main  # noqa: E402
from pipeline.raynoise import filter_ray_noise  # noqa: E402

if __name__ == "__main__":
    filter_ray_noise()  # Ray's known-harmless ERROR lines out of the job log (see the module)
    sys.exit(main(["encode", *sys.argv[1:]]))
