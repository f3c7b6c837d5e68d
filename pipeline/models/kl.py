"""KL-regularised convolutional autoencoder (the "AutoencoderKL" family) and its posterior.

encoder -> 2*z_channels moments -> quant_conv (1x1) -> DiagonalGaussian(mean, logvar);
z -> post_quant_conv (1x1) -> decoder. The 1x1 quant convs exist so SD-style weights map 1:1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.models.blocks import Decoder, Encoder, check_groups

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


@dataclass
class ModelConfig:
    """Architecture of the autoencoder; ``kind`` selects the class in ``MODEL_REGISTRY``."""

    kind: str = "kl"
    in_channels: int = 3
    ch: int = 32
    # Downsampling factor = 2 ** (len(ch_mult) - 1): [1, 2, 2] -> f4, [1, 2, 2, 4] -> f8.
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    z_channels: int = 4
    groups: int = 8
    attention: bool = False


class DiagonalGaussian:
    """Diagonal Gaussian posterior over latents, parameterised by mean and clamped log-variance."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """Split a [N, 2C, h, w] tensor into mean (first C channels) and logvar (last C)."""
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, logvar)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over all latent dims, one value per sample: shape [N]."""
        dims = list(range(1, self.mean.ndim))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)


def validate_config(cfg: ModelConfig) -> None:
    """Raise ValueError naming the offending ``model.*`` key."""
    if not cfg.ch_mult or any(m <= 0 for m in cfg.ch_mult):
        raise ValueError(
            f"model.ch_mult must be a non-empty list of positive ints, got {cfg.ch_mult}"
        )
    for name in ("in_channels", "ch", "num_res_blocks", "z_channels"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"model.{name} must be positive, got {getattr(cfg, name)}")
    for mult in cfg.ch_mult:
        check_groups(cfg.ch * mult, cfg.groups)


class KLAutoencoder(nn.Module):
    """Convolutional VAE with a diagonal Gaussian posterior."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_config(cfg)
        self.config = cfg
        trunk = dict(
            ch=cfg.ch,
            ch_mult=list(cfg.ch_mult),
            num_res_blocks=cfg.num_res_blocks,
            groups=cfg.groups,
            mid_attention=cfg.attention,
        )
        self.encoder = Encoder(
            in_channels=cfg.in_channels, out_channels=2 * cfg.z_channels, **trunk
        )
        self.decoder = Decoder(out_channels=cfg.in_channels, z_channels=cfg.z_channels, **trunk)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
