"""Held-out evaluation after training: figures land in metrics.jsonl, eval.json and the sidecar."""

import json

import fsspec
import pytest
import torch

from pipeline.artifacts import read_card
from pipeline.config import load_config
from pipeline.evaluate.quality import codebook_health, read_eval, reconstruction_metrics
from pipeline.export import ExportConfig, export_from_artifact
from pipeline.models.family import KL
from pipeline.train.config import TrainRunConfig
from pipeline.train.run import train
from tests.conftest import TINY_TRAIN


class _Identity(torch.nn.Module):
    """An autoencoder that reconstructs perfectly, to pin PSNR/SSIM golden values."""

    class _Posterior:
        def __init__(self, mean):
            self.mean = mean

    def encode(self, x):
        return self._Posterior(x)

    def decode(self, z):
        return z


def test_reconstruction_metrics_golden_values():
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    perfect = reconstruction_metrics(_Identity(), [(images, None)], "signed", family=KL)
    assert perfect["ssim"] == pytest.approx(1.0, abs=1e-4) and perfect["psnr_db"] > 100

    class _Gray(_Identity):
        def decode(self, z):
            return torch.zeros_like(z)  # mid-grey on the [0, 1] scale

    constant = torch.full((2, 3, 16, 16), 1.0)  # white; error 0.5 everywhere -> 6.02 dB
    assert reconstruction_metrics(_Gray(), [(constant, None)], "signed", family=KL)[
        "psnr_db"
    ] == pytest.approx(6.021, abs=1e-3)


def test_codebook_health():
    assert codebook_health(torch.tensor([0, 1, 2, 3]), 8) == {
        "codebook_usage": 0.5,
        "perplexity": 4.0,
    }


def test_kl_run_reports_psnr_ssim_and_export_copies_them(sample_corpus):
    cfg = load_config(
        TrainRunConfig,
        None,
        [
            f"data.shards={sample_corpus['train']}",
            f"data.val_shards={sample_corpus['val']}",
            *TINY_TRAIN,
            "train.storage_path=memory://eval-runs",
            "train.run_name=kl",
            "train.num_workers=0",
            "train.steps=2",
            "train.eval_images=16",
        ],
    )
    result = train(cfg)
    figures = result["eval"]
    assert figures["images"] == 16 and 0 < figures["psnr_db"] < 60 and -1 <= figures["ssim"] <= 1
    assert read_eval(result["checkpoint"]) == figures
    last = (
        fsspec.filesystem("memory")
        .cat_file("/eval-runs/kl/metrics.jsonl")
        .decode()
        .splitlines()[-1]
    )
    assert json.loads(last) == {"step": 2, "eval": figures}
    # The model artifact carries the figures and the latent scale measured in the same pass;
    # its diffusers config.json has those factors.
    card = read_card(f"{result['checkpoint']}/model")
    assert card.quality == figures and card.latent_scale.source == "measured"
    assert card.latent_scale.samples == 16 and card.latent_scale.data == sample_corpus["val"]
    config = json.loads(
        fsspec.filesystem("memory").cat_file(
            f"{result['checkpoint'].removeprefix('memory://')}/model/config.json"
        )
    )
    assert config["scaling_factor"] == card.latent_scale.scaling_factor > 0
    assert config["shift_factor"] == card.latent_scale.shift_factor
    sidecar = export_from_artifact(
        ExportConfig(model=result["checkpoint"], output="memory://eval-export", scale_samples=8)
    )
    assert sidecar.quality == figures and sidecar.quality_psnr_db() == figures["psnr_db"]
    assert sidecar.scaling_source == "data"  # export measures its own (scale_shards) as before


def test_textbook_vae_reports_nats_iwae_and_bits_per_dim(mnist_shards):
    cfg = load_config(
        TrainRunConfig,
        "configs/train/mnist-mlp-vae.yaml",
        [
            f"data.shards={mnist_shards['train']}",
            f"data.val_shards={mnist_shards['test']}",
            "train.storage_path=memory://eval-vae",
            "train.num_workers=0",
            "train.steps=30",
            "train.eval_images=100",
            "train.iwae_k=20",
        ],
    )
    figures = train(cfg)["eval"]
    assert figures["images"] == 100
    assert figures["iwae20_nll_nats"] <= figures["nelbo_nats"] + 0.5  # IWAE is the tighter bound
    assert figures["nelbo_bits_per_dim"] == pytest.approx(
        figures["nelbo_nats"] / (784 * 0.6931471805599453), rel=1e-3
    )
