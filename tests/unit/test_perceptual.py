"""The perceptual loss option (pipeline/models/perceptual.py), with locally made random LPIPS
weights: it adds w * LPIPS to the reconstruction term as LDM does, gradients reach the
autoencoder (not the frozen LPIPS net), the adaptive adversarial weight sees it, and a run whose
weight files are missing fails before it starts."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import ModelConfig, build_model
from pipeline.models.adversarial import adaptive_weight, last_layer
from pipeline.models.discriminator import build_discriminator
from pipeline.models.losses import LossConfig, reconstruction_loss
from pipeline.models.perceptual import check_perceptual, load_perceptual
from pipeline.train.step import compute_loss
from tests.lpips_files import lpips_files

TINY = ModelConfig(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, groups=4)


@pytest.fixture(scope="module")
def loss_cfg(tmp_path_factory) -> LossConfig:
    vgg, lin = lpips_files(tmp_path_factory.mktemp("lpips"))
    return LossConfig(
        perceptual_weight=0.7, lpips_vgg=vgg, lpips_lin=lin, disc_start=0, disc_layers=2
    )


def _batch() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_recon_is_pixel_plus_weighted_lpips_and_lpips_is_logged(loss_cfg):
    perceptual = load_perceptual(loss_cfg)
    torch.manual_seed(0)
    model = build_model(TINY)
    x = _batch()
    terms, recon = compute_loss(model, x, None, loss_cfg, 0)
    pixel, loss = terms["recon"].detach(), terms["loss"].detach()
    terms = perceptual.add_to(terms, x, recon)
    distance = perceptual.lpips(x, recon).mean()
    assert terms["lpips"] > 0 and torch.allclose(terms["lpips"], distance)
    assert torch.allclose(pixel, reconstruction_loss(x, recon, "l1"))
    assert torch.allclose(terms["recon"], pixel + 0.7 * distance)
    assert torch.allclose(terms["loss"], loss + 0.7 * distance)
    assert load_perceptual(LossConfig()) is None  # perceptual_weight 0: off


def test_gradients_reach_the_autoencoder_not_the_lpips_net(loss_cfg):
    perceptual = load_perceptual(loss_cfg)
    torch.manual_seed(0)
    model = build_model(TINY)
    x = _batch()
    terms, recon = compute_loss(model, x, None, loss_cfg, 0)
    perceptual.add_to(terms, x, recon)["lpips"].backward()
    assert all(p.grad is None for p in perceptual.parameters())
    assert not any(p.requires_grad for p in perceptual.parameters())
    encoder = model.encoder.conv_in.weight.grad
    assert encoder is not None and encoder.abs().sum() > 0  # through the decoder and the latent


def test_the_adaptive_weight_balances_the_whole_reconstruction_term(loss_cfg):
    """LDM's adaptive weight is a ratio of gradient norms of recon (pixel + perceptual) and of
    the generator term: with LPIPS in recon it is another number than with the pixel loss."""
    perceptual = load_perceptual(loss_cfg)
    torch.manual_seed(0)
    model, disc = build_model(TINY), build_discriminator(loss_cfg, 3)
    x = _batch()
    terms, recon = compute_loss(model, x, None, loss_cfg, 0)
    pixel = terms["recon"]
    g_loss = -disc(recon).mean()
    with_lpips = perceptual.add_to(dict(terms), x, recon)["recon"]
    layer = last_layer(model)
    plain = adaptive_weight(pixel, g_loss, layer, loss_cfg.disc_weight)
    both = adaptive_weight(with_lpips, g_loss, layer, loss_cfg.disc_weight)
    assert both > 0 and not torch.allclose(plain, both)


def test_missing_or_bad_settings_fail_before_training(tmp_path, loss_cfg):
    from pipeline.train.config import TrainRunConfig
    from pipeline.train.run import train

    check_perceptual(loss_cfg)  # both files there: nothing to say
    check_perceptual(LossConfig(lpips_vgg="/nowhere"))  # off: the paths are not read
    missing = LossConfig(perceptual_weight=1.0, lpips_vgg=loss_cfg.lpips_vgg)
    cfg = TrainRunConfig(loss=missing)
    cfg.data.shards = str(tmp_path / "no-shards")
    cfg.train.storage_path = str(tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match=r"loss.lpips_lin = LPIPS v0.1's linear heads"):
        train(cfg)
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="loss.perceptual_weight=-1.0"):
        check_perceptual(LossConfig(perceptual_weight=-1.0))
    with pytest.raises(ValueError, match="needs a kl or vq model, not 'mlp_vae'"):
        check_perceptual(loss_cfg, "mlp_vae", "unit")
    with pytest.raises(ValueError, match=r"data.value_range=signed"):
        check_perceptual(loss_cfg, "kl", "unit")
