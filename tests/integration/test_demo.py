"""`latentpipe demo` end to end (a short schedule) and checks on every artifact it names."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import webdataset as wds

from pipeline.contracts.manifest import load_manifest, manifest_shards
from pipeline.contracts.sidecar import load_sidecar
from tests.integration.conftest import run_short_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_summary(tmp_path_factory) -> dict:
    return run_short_demo(tmp_path_factory.mktemp("demo") / "out")


def test_summary_names_every_artifact(demo_summary):
    for key in ("checkpoint", "onnx", "sidecar", "latents", "manifest", "report", "grid"):
        assert Path(demo_summary[key]).exists(), key
    assert demo_summary["psnr_db"] > 10  # 30 steps: far from good, far from noise
    assert demo_summary["rejects"] == 0
    verified = demo_summary["verify"]
    assert verified["ok"] and verified["samples"] == demo_summary["samples_encoded"]
    assert verified["decoded"] == 16 and verified["psnr_db"] > 10


def test_latent_shards_read_with_webdataset_match_manifest(demo_summary):
    directory = demo_summary["latents"]
    manifest = load_manifest(directory)
    shards = manifest_shards(directory, manifest)
    urls = [str(Path(directory) / s.name) for s in shards]
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        latent = sample["latent.npy"]
        assert list(latent.shape) == manifest.latent.shape
        assert latent.dtype == np.float16
        assert "json" in sample  # the input's metadata is carried through
        keys.append(sample["__key__"])
    assert len(keys) == len(set(keys)) == manifest.samples
    assert manifest.samples == sum(s.samples for s in shards)
    assert manifest.scaling_factor > 0


def test_onnx_encoder_runs_in_onnxruntime_as_its_sidecar_says(demo_summary):
    sidecar = load_sidecar(demo_summary["onnx"])  # the sidecar beside it, hash-checked
    assert demo_summary["sidecar"].endswith("encoder.json")
    session = ort.InferenceSession(demo_summary["onnx"], providers=["CPUExecutionProvider"])
    resolution = sidecar.input.resolution
    image = np.random.default_rng(0).uniform(-1, 1, (3, 3, resolution, resolution))
    mean, logvar = session.run(["mean", "logvar"], {"image": image.astype(np.float32)})
    assert list(mean.shape[1:]) == sidecar.latent_shape == list(logvar.shape[1:])
    assert sidecar.scaling_factor > 0 and sidecar.parity["max_abs_diff"] <= 1e-4
