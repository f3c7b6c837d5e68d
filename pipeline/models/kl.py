"""KL-regularised convolutional autoencoder (the "AutoencoderKL" family) and its posterior.

encoder -> 2*z_channels moments -> quant_conv (1x1) -> DiagonalGaussian(mean, logvar);
z -> post_quant_conv (1x1) -> decoder. The 1x1 quant convs exist so SD-style weights map 1:1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import nn

from pipeline.models.blocks import Decoder, Encoder, check_groups
from pipeline.models.quantizer import VQConfig
from pipeline.models.textbook import ClassicVAEConfig

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class ModelKind(StrEnum):
    """``model.kind``: the class in ``MODEL_REGISTRY`` (pipeline/models/__init__.py)."""

    kl = "kl"  # SD-class KL autoencoder
    vq = "vq"  # VQ autoencoder
    mlp_vae = "mlp_vae"  # the textbook VAEs (model.classic)
    conv_vae = "conv_vae"
    cvae = "cvae"
    conv_cvae = "conv_cvae"


@dataclass
class ModelConfig:
    """Architecture of the autoencoder; ``kind`` selects the class in ``MODEL_REGISTRY``."""

    kind: ModelKind = ModelKind.kl
    in_channels: int = 3
    ch: int = 32
    # Downsampling factor = 2 ** (len(ch_mult) - 1): [1, 2, 2] -> f4, [1, 2, 2, 4] -> f8.
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    z_channels: int = 4
    groups: int = 8
    attention: bool = False  # self-attention in the mid block (SD: true)
    # LDM semantics: level i runs at ``resolution // 2**i``; levels whose size is listed in
    # ``attn_resolutions`` get attention after every resnet block. ``resolution`` only names the
    # levels (SD: 256); it does not restrict the input size.
    attn_resolutions: list[int] = field(default_factory=list)
    resolution: int = 256
    double_z: bool = True  # encoder emits mean and logvar (2*z_channels); KL models need it
    embed_dim: int = 0  # latent channels after quant_conv; 0 = z_channels (SD: 4 = z_channels)
    dropout: float = 0.0  # inside resnet blocks
    # Latent normalisation the weights were published with (diffusers' scaling_factor and
    # shift_factor). 0 = unknown: export measures it from data instead.
    scaling_factor: float = 0.0
    shift_factor: float = 0.0
    vq: VQConfig = field(default_factory=VQConfig)  # codebook, for kind "vq"
    # The textbook VAEs (kinds mlp_vae, conv_vae, cvae, conv_cvae) read only this section.
    classic: ClassicVAEConfig = field(default_factory=ClassicVAEConfig)

    def __post_init__(self) -> None:
        self.kind = ModelKind(self.kind)  # a bad value fails here or at config load


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
    for name in ("in_channels", "ch", "num_res_blocks", "z_channels", "resolution"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"model.{name} must be positive, got {getattr(cfg, name)}")
    if cfg.embed_dim < 0 or not 0.0 <= cfg.dropout < 1.0 or cfg.scaling_factor < 0:
        raise ValueError(
            "model.embed_dim and model.scaling_factor must be >= 0 and model.dropout in [0, 1), "
            f"got {cfg.embed_dim}, {cfg.scaling_factor}, {cfg.dropout}"
        )
    for mult in cfg.ch_mult:
        check_groups(cfg.ch * mult, cfg.groups)
    attn_levels(cfg)  # raises on resolutions that name no level


def attn_levels(cfg: ModelConfig) -> tuple[int, ...]:
    """Level indices whose size (``resolution // 2**i``) is listed in ``attn_resolutions``."""
    sizes = [cfg.resolution // 2**i for i in range(len(cfg.ch_mult))]
    # LDM silently ignores a size no level has; a typo there would quietly drop attention.
    unknown = [r for r in cfg.attn_resolutions if r not in sizes]
    if unknown:
        raise ValueError(
            f"model.attn_resolutions {unknown} match no level: with model.resolution="
            f"{cfg.resolution} the levels are {sizes}"
        )
    return tuple(i for i, size in enumerate(sizes) if size in cfg.attn_resolutions)


def trunk_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments shared by :class:`Encoder` and :class:`Decoder` for ``cfg``."""
    return dict(
        ch=cfg.ch,
        ch_mult=list(cfg.ch_mult),
        num_res_blocks=cfg.num_res_blocks,
        groups=cfg.groups,
        mid_attention=cfg.attention,
        attn_levels=attn_levels(cfg),
        dropout=cfg.dropout,
    )


class KLAutoencoder(nn.Module):
    """Convolutional VAE with a diagonal Gaussian posterior (SD's AutoencoderKL layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_config(cfg)
        if not cfg.double_z:
            raise ValueError("model.double_z must be true for model.kind='kl' (mean and logvar)")
        self.config = cfg
        trunk = trunk_kwargs(cfg)
        embed = cfg.embed_dim or cfg.z_channels
        self.encoder = Encoder(
            in_channels=cfg.in_channels, out_channels=2 * cfg.z_channels, **trunk
        )
        self.decoder = Decoder(out_channels=cfg.in_channels, z_channels=cfg.z_channels, **trunk)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * embed, 1)
        self.post_quant_conv = nn.Conv2d(embed, cfg.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim or self.config.z_channels

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
