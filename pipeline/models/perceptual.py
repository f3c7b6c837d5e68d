"""The perceptual term of the reconstruction loss (``loss.perceptual_weight`` > 0), LDM's recipe.

LDM's ``LPIPSWithDiscriminator`` (ldm/modules/losses/contperceptual.py) adds the LPIPS distance to
the pixel loss inside the reconstruction term, ``rec = |x - x_hat| + w * lpips(x, x_hat)``, and
averages it; with our mean pixel loss that is ``recon = pixel + w * mean(lpips)``. Because it is
part of ``recon``, the adversarial loss's adaptive weight (``pipeline.models.adversarial``, a ratio
of the gradient norms of ``recon`` and the generator term at the decoder's last layer) balances
against pixel and perceptual terms together, as in LDM. ``lpips`` (unweighted, batch mean) is
logged as its own metric.

The LPIPS network (:mod:`pipeline.models.lpips`) is frozen and never wrapped for data parallelism:
each DDP rank holds its own copy and only the reconstruction's gradient flows through it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from pipeline.models.family import family_for
from pipeline.models.losses import LossConfig
from pipeline.models.lpips import load_lpips


class PerceptualLoss(nn.Module):
    """``weight`` x LPIPS, added to a loss's ``recon`` and ``loss`` terms by :meth:`add_to`."""

    def __init__(self, lpips: nn.Module, weight: float) -> None:
        super().__init__()
        self.lpips = lpips
        self.weight = weight

    def add_to(
        self, terms: dict[str, torch.Tensor], x: torch.Tensor, recon: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``terms`` (from the autoencoder losses) with ``w * lpips`` in ``recon`` and ``loss``,
        and ``lpips`` itself as a metric."""
        distance = self.lpips(x, recon).mean()
        weighted = self.weight * distance
        terms["recon"] = terms["recon"] + weighted
        terms["loss"] = terms["loss"] + weighted
        terms["lpips"] = distance
        return terms


def perceptual_enabled(cfg: LossConfig) -> bool:
    return cfg.perceptual_weight > 0


def check_perceptual(cfg: LossConfig, kind: str = "kl", value_range: str = "signed") -> None:
    """Refuse, before any training starts, a perceptual loss the run cannot use: whose weight
    files are missing, on a textbook VAE (its loss is the ELBO), or on images outside [-1, 1]
    (what LPIPS's scaling layer expects)."""
    if cfg.perceptual_weight < 0:
        raise ValueError(f"loss.perceptual_weight={cfg.perceptual_weight}: expected >= 0")
    if not perceptual_enabled(cfg):
        return
    if not family_for(kind).adversarial:  # the image autoencoders (kl, vq)
        raise ValueError(f"loss.perceptual_weight: needs a kl or vq model, not {str(kind)!r}")
    if value_range != "signed":
        raise ValueError("loss.perceptual_weight: LPIPS needs data.value_range=signed ([-1, 1])")
    missing = [p for p in (cfg.lpips_vgg, cfg.lpips_lin) if not p or not os.path.isfile(p)]
    if missing:
        load_lpips(cfg.lpips_vgg, cfg.lpips_lin)  # raises FileNotFoundError naming the files


def load_perceptual(cfg: LossConfig, device: torch.device | str = "cpu") -> PerceptualLoss | None:
    """The frozen perceptual loss from ``loss.lpips_vgg`` / ``loss.lpips_lin`` on ``device``, or
    None when ``loss.perceptual_weight`` is 0."""
    if not perceptual_enabled(cfg):
        return None
    return PerceptualLoss(load_lpips(cfg.lpips_vgg, cfg.lpips_lin), cfg.perceptual_weight).to(
        device
    )
