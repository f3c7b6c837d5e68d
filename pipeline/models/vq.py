"""VQ autoencoder (taming-transformers' VQModel layout).

encoder -> z_channels -> quant_conv (1x1) -> code_dim -> VectorQuantizer -> post_quant_conv (1x1)
-> decoder. Attribute names (``encoder``, ``quant_conv``, ``quantize``, ``post_quant_conv``,
``decoder``) follow LDM's VQModel so pretrained vq-f* weights map across; only the codebook is
called ``quantize.codebook`` here rather than ``quantize.embedding.weight``.

    python -m pytest -q tests/unit/test_quantizer.py   # CPU; trains a tiny one on photo crops
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.blocks import Decoder, Encoder
from pipeline.models.kl import ModelConfig, trunk_kwargs, validate_config
from pipeline.models.quantizer import VectorQuantizer


class VQAutoencoder(nn.Module):
    """Convolutional autoencoder with a vector-quantised bottleneck (``model.kind: vq``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_config(cfg)
        code_dim = cfg.vq.code_dim
        if cfg.embed_dim not in (0, code_dim):
            raise ValueError(
                f"model.embed_dim={cfg.embed_dim} must be 0 or equal model.vq.code_dim={code_dim}"
            )
        self.config = cfg
        trunk = trunk_kwargs(cfg)
        # double_z is a KL notion: the VQ encoder always emits z_channels (LDM VQ configs: false).
        self.encoder = Encoder(in_channels=cfg.in_channels, out_channels=cfg.z_channels, **trunk)
        self.quant_conv = nn.Conv2d(cfg.z_channels, code_dim, 1)
        self.quantize = VectorQuantizer(cfg.vq)
        self.post_quant_conv = nn.Conv2d(code_dim, cfg.z_channels, 1)
        self.decoder = Decoder(out_channels=cfg.in_channels, z_channels=cfg.z_channels, **trunk)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.vq.code_dim

    @property
    def num_codes(self) -> int:
        return self.config.vq.num_codes

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Image -> (straight-through z_q [N, C, h, w], indices [N, h, w], vq losses/metrics)."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode stored code indices [N, h, w] (any integer dtype) to images."""
        return self.decode(self.quantize.lookup(indices.long()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (reconstruction, info with vq_loss / usage / perplexity)."""
        z_q, _, info = self.encode(x)
        return self.decode(z_q), info

    def export_forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Traceable encode: (indices int64 [N, h, w], quantized [N, C, h, w]); no state change."""
        z_q, indices = self.quantize.quantize(self.quant_conv(self.encoder(image)))
        return indices, z_q
