"""`latentpipe demo` end to end (a short schedule) and checks on every artifact it names."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import webdataset as wds

from pipeline.artifacts import artifact_sha256
from pipeline.contracts.manifest import load_manifest, manifest_shards
from pipeline.contracts.sidecar import load_sidecar
from pipeline.data.images import normalize
from pipeline.data.reader import iter_val_images
from tests.integration.conftest import run_short_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_summary(tmp_path_factory) -> dict:
    return run_short_demo(tmp_path_factory.mktemp("demo") / "out")


def test_summary_names_every_artifact(demo_summary):
    for key in ("checkpoint", "model", "onnx", "sidecar", "latents", "manifest", "report"):
        assert Path(demo_summary[key]).exists(), key
    assert Path(demo_summary["grid"]).exists()
    assert demo_summary["model"] == f"{demo_summary['checkpoint']}/model"
    assert demo_summary["model_sha256"] == artifact_sha256(demo_summary["model"])
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


def test_diffusers_loads_the_trained_model_and_encodes_like_the_onnx_encoder(demo_summary):
    """The demo's model artifact is an AutoencoderKL directory: diffusers loads it, with the
    latent scale training measured, and its posterior means are the ONNX encoder's."""
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL.from_pretrained(demo_summary["model"]).eval()
    card = json.loads((Path(demo_summary["model"]) / "latentpipe.json").read_text())
    assert card["latent_scale"]["source"] == "measured"
    assert vae.config.scaling_factor == card["latent_scale"]["scaling_factor"] > 0
    sidecar = load_sidecar(demo_summary["onnx"])
    assert sidecar.model.path == demo_summary["model"]
    val = demo_summary["shards"]["val"]
    images = [image for _, image in iter_val_images(val, sidecar.input.resolution, limit=4)]
    batch = np.stack([normalize(image) for image in images]).astype(np.float32)
    session = ort.InferenceSession(demo_summary["onnx"], providers=["CPUExecutionProvider"])
    (mean,) = session.run(["mean"], {"image": batch})
    with torch.no_grad():
        theirs = vae.encode(torch.from_numpy(batch)).latent_dist.mean.numpy()
    np.testing.assert_allclose(theirs, mean, atol=1e-4, rtol=0)
