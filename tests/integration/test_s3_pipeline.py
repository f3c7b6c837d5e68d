"""The pipeline against a real S3 endpoint (moto server): shards, checkpoints, ONNX, latents on s3://.

Each stage runs through the CLI in its own process, as a user would; the S3 endpoint and
test credentials reach them (and their Ray workers) through the environment.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import TINY_TRAIN

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_train_export_encode_on_s3(s3_server, sample_corpus):
    import s3fs

    from pipeline.contracts.manifest import load_manifest
    from pipeline.contracts.sidecar import Sidecar
    from pipeline.latents.format import iter_latents

    _, bucket = s3_server
    fs = s3fs.S3FileSystem()
    fs.put(sample_corpus["train"], f"{bucket}/shards/train", recursive=True)
    shards = f"s3://{bucket}/shards/train"

    _cli(
        "train",
        f"data.shards={shards}",
        *TINY_TRAIN,
        f"train.storage_path=s3://{bucket}/runs",
        "train.run_name=s3run",
        "train.steps=4",
        "train.num_workers=2",
        "train.checkpoint_every=4",
    )
    checkpoints = fs.glob(f"{bucket}/runs/s3run/checkpoint_*/training_state.pt")
    assert checkpoints, fs.find(f"{bucket}/runs")
    assert fs.exists(f"{bucket}/runs/s3run/config.yaml")
    assert fs.exists(f"{bucket}/runs/s3run/metrics.jsonl")
    checkpoint = "s3://" + checkpoints[-1].rsplit("/", 1)[0]
    assert fs.exists(f"{checkpoint}/model/latentpipe.json")  # Ray uploaded the artifact too

    encoders = f"s3://{bucket}/encoders/tiny"
    _cli("export", f"model={checkpoint}", f"output={encoders}", "scale_samples=16")
    where = f"{encoders}/encoder.json"
    sidecar = Sidecar.from_dict(json.loads(fs.cat_file(where)), where)
    assert sidecar.model.step == 4 and sidecar.latent_shape == [4, 8, 8]
    assert sidecar.model.path == f"{checkpoint}/model" and sidecar.model.sha256

    latents = f"s3://{bucket}/latents/train"
    _cli("encode", f"input={shards}", f"output={latents}", f"encoder={encoders}/encoder.onnx")
    manifest = load_manifest(latents)
    index = json.loads(fs.cat_file(f"{bucket}/shards/train/index.json"))
    assert manifest.samples == index["samples"] and manifest.rejects == 0
    assert manifest.encoder.sha256 == sidecar.onnx_sha256 and manifest.sidecar == sidecar
    keys = [key for key, latent, _ in iter_latents(latents)]
    assert len(keys) == len(set(keys)) == index["samples"]
