"""`latentpipe demo configs/demo-vq.yaml` end to end (a short schedule): a small VQ-VAE whose
latent shards hold uint16 code indices, decoded back through the corpus's codebook."""

from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipeline.contracts.manifest import load_manifest, manifest_shards
from pipeline.latents.format import load_manifest_codebook, lookup_codebook
from tests.integration.conftest import run_short_demo

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_summary(tmp_path_factory) -> dict:
    # Training in the demo's own process (no Ray Train start-up): the KL demo test trains on
    # Ray Train as the README's demo does, and tests/unit/test_vq_ddp.py the codebook under DDP.
    return run_short_demo(
        tmp_path_factory.mktemp("demo_vq") / "out",
        str(ROOT / "configs" / "demo-vq.yaml"),
        overrides=("train.num_workers=0",),
    )


def test_summary_reports_codebook_usage_and_perplexity(demo_summary):
    for key in ("checkpoint", "model", "onnx", "sidecar", "latents", "manifest", "report"):
        assert Path(demo_summary[key]).exists(), key
    assert (Path(demo_summary["model"]) / "latentpipe.json").exists()  # the model artifact
    assert demo_summary["model_kind"] == "vq" and demo_summary["rejects"] == 0
    assert demo_summary["psnr_db"] > 10
    book = demo_summary["codebook"]
    assert book["num_codes"] == 256
    assert 0 < book["train_usage"] <= 1 and book["train_perplexity"] >= 1
    assert 0 < book["corpus_usage"] <= 1 and book["corpus_codes_used"] == round(
        book["corpus_usage"] * 256
    )
    assert 1 <= book["corpus_perplexity"] <= book["corpus_codes_used"]


def test_latent_shards_hold_uint16_indices(demo_summary):
    directory = demo_summary["latents"]
    manifest = load_manifest(directory)
    latent = manifest.latent
    assert latent.kind == "vq_indices" and latent.dtype == "uint16"
    codebook = load_manifest_codebook(directory, manifest)
    urls = [str(Path(directory) / s.name) for s in manifest_shards(directory, manifest)]
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        indices = sample["indices.npy"]
        assert indices.dtype == np.uint16 and list(indices.shape) == latent.shape
        assert list(lookup_codebook(indices, codebook).shape) == latent.lookup_shape
        keys.append(sample["__key__"])
    assert len(keys) == len(set(keys)) == manifest.samples
    assert manifest.scaling_factor > 0
