"""PatchGAN discriminator for the adversarial option of the autoencoders.

The network is pix2pix's ``NLayerDiscriminator`` as taming-transformers
(``taming/modules/discriminator/model.py``) and LDM (``ldm/modules/losses``) use it: a 4x4
stride-2 conv + LeakyReLU(0.2), ``n_layers - 1`` more stride-2 convs with doubling width (capped
at 8x), one stride-1 conv, then a stride-1 conv to one channel. Each output logit judges one
patch (70x70 pixels for 3 layers), so the output is a grid of ``size / 2**n_layers - 2`` logits
per side: 2x2 at 32 px, 6x6 at 64 px, 30x30 at 256 px.

Normalisation, ``loss.disc_norm``:
  "group" (default): GroupNorm normalises each sample on its own. A sample's logits then do not
      depend on the rest of the batch, so the discriminator behaves the same on one rank or many,
      at any per-rank batch size, with no running buffers to broadcast or SyncBatchNorm to add
      under DDP, and real and fake images can share one forward pass without leaking statistics.
  "batch": BatchNorm exactly as taming/LDM (use it to match or load their discriminators). Under
      DDP each rank normalises with its own batch statistics.
  "none": plain convs with bias.

    python -m pytest -q tests/unit/test_adversarial.py   # CPU, a few seconds
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.models.losses import LossConfig

NORMS = ("group", "batch", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups, as in the autoencoder
    return nn.Identity()


def _block(c_in: int, c_out: int, stride: int, norm: str) -> list[nn.Module]:
    # A conv bias right before a normalisation with its own shift is redundant (taming drops it).
    conv = nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=norm == "none")
    return [conv, _norm(norm, c_out), nn.LeakyReLU(0.2, inplace=True)]


class NLayerDiscriminator(nn.Module):
    """PatchGAN: image [N, C, H, W] -> patch logits [N, 1, H / 2**n_layers - 2, W / 2**n - 2]."""

    def __init__(
        self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "group"
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"loss.disc_norm must be one of {list(NORMS)}, got {norm!r}")
        if n_layers < 1 or channels < 1:
            raise ValueError(
                f"loss.disc_layers and loss.disc_channels must be >= 1, got {n_layers}, {channels}"
            )
        self.n_layers = n_layers
        # The first layer has no normalisation (pix2pix): it sees raw pixels.
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last widening conv keeps the resolution
            layers += _block(channels * prev, channels * mult, stride, norm)
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def min_size(self) -> int:
        """Smallest input side with at least one patch logit."""
        return 3 * 2**self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size():
            # Otherwise conv2d fails with a kernel-size error that does not name the cause.
            raise ValueError(
                f"discriminator with loss.disc_layers={self.n_layers} needs images of at least "
                f"{self.min_size()} px per side, got {tuple(x.shape[-2:])}"
            )
        return self.main(x)


def init_weights(module: nn.Module) -> None:
    """taming's ``weights_init``: convs N(0, 0.02); norm scales N(1, 0.02), shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def patch_grid(size: int, n_layers: int = 3) -> int:
    """Logits per side for a ``size``-pixel input: n stride-2 convs halve, two 4x4 convs trim 2."""
    return size // 2**n_layers - 2


def build_discriminator(loss_cfg: LossConfig, in_channels: int = 3) -> NLayerDiscriminator:
    """The discriminator that ``loss.disc_*`` describes (checks the other disc_* keys too)."""
    if loss_cfg.disc_start < -1 or loss_cfg.disc_weight < 0 or loss_cfg.disc_lr < 0:
        raise ValueError(
            "loss.disc_start must be >= -1 and loss.disc_weight, loss.disc_lr >= 0, got "
            f"{loss_cfg.disc_start}, {loss_cfg.disc_weight}, {loss_cfg.disc_lr}"
        )
    return NLayerDiscriminator(
        in_channels, loss_cfg.disc_channels, loss_cfg.disc_layers, loss_cfg.disc_norm
    )
