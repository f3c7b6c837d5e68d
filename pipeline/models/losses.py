"""Autoencoder training objectives.

KL models: pixel reconstruction loss plus weighted KL to N(0, I). VQ models: reconstruction loss
plus the quantizer's own loss (commitment, and codebook loss when the codebook is learned by
gradient); its weight lives in ``model.vq.commitment``, so there is no extra weight here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F

from pipeline.models.kl import DiagonalGaussian


class Recon(StrEnum):
    l1 = "l1"
    mse = "mse"


class DiscNorm(StrEnum):
    """Normalisation in the PatchGAN (see discriminator.py)."""

    group = "group"
    batch = "batch"  # taming/LDM
    none = "none"


RECON_LOSSES = tuple(Recon)


@dataclass
class LossConfig:
    """``recon``: "l1" or "mse"; ``kl_weight`` scales the per-sample KL sum."""

    recon: Recon = Recon.l1
    kl_weight: float = 1e-6  # beta; the textbook VAEs use 1.0 (ELBO), beta-VAE > 1
    kl_warmup_steps: int = (
        0  # linear KL warm-up from 0 to kl_weight (pipeline/train/loss_schedule.py)
    )
    # Adversarial option (LDM's hinge PatchGAN; see pipeline/models/adversarial.py).
    disc_start: int = -1  # step at which the adversarial loss switches on; -1 = never (off)
    disc_weight: float = 0.5  # scales LDM's adaptive weight (LDM kl-f8: 0.5)
    disc_layers: int = 3  # stride-2 conv layers in the PatchGAN (3: 70x70 receptive field)
    disc_channels: int = 64  # width of the first layer; doubles per layer, capped at 8x
    disc_norm: DiscNorm = DiscNorm.group
    disc_lr: float = 0.0  # discriminator learning rate; 0 = the generator's train.lr
    # Perceptual option (LDM: 1.0): recon += perceptual_weight * LPIPS (pipeline/models/
    # perceptual.py), 0 = off. The two weight files are local paths on every training node,
    # never downloaded (README, "Perceptual loss").
    perceptual_weight: float = 0.0
    lpips_vgg: str = ""  # torchvision's ImageNet VGG16 state dict, e.g. vgg16-397923af.pth
    lpips_lin: str = ""  # LPIPS v0.1 linear heads: lpips/weights/v0.1/vgg.pth of the lpips package

    def __post_init__(self) -> None:
        # Choices are Enums: a bad value fails at config load (OmegaConf names the key) or here.
        self.recon = Recon(self.recon)
        self.disc_norm = DiscNorm(self.disc_norm)


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean per-element reconstruction error."""
    if kind == "l1":
        return F.l1_loss(recon, x)
    if kind == "mse":
        return F.mse_loss(recon, x)
    raise ValueError(f"loss.recon must be one of {list(RECON_LOSSES)}, got {kind!r}")


def autoencoder_loss(
    x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian, cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """Return {"loss", "recon", "kl"}; kl is the batch mean of per-sample KL sums."""
    rec = reconstruction_loss(x, recon, cfg.recon)
    kl = posterior.kl().mean()
    return {"loss": rec + cfg.kl_weight * kl, "recon": rec, "kl": kl}


def vq_autoencoder_loss(
    x: torch.Tensor, recon: torch.Tensor, info: dict[str, torch.Tensor], cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """Return {"loss", "recon", "vq", "usage", "perplexity"} for a VQ autoencoder's output.

    ``info`` is the dict from ``VQAutoencoder.forward``; usage and perplexity are passed through
    detached, as metrics only.
    """
    rec = reconstruction_loss(x, recon, cfg.recon)
    vq = info["vq_loss"]
    return {
        "loss": rec + vq,
        "recon": rec,
        "vq": vq,
        "usage": info["usage"].detach(),
        "perplexity": info["perplexity"].detach(),
    }
