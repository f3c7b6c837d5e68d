"""Convolutional building blocks and the encoder/decoder trunks of the autoencoders.

Module and attribute names follow the layout of the Stable Diffusion / taming-transformers
autoencoders (``conv_in``, ``down[i].block[j]``, ``mid.block_1``, ``norm_out`` ...) so that an
SD-class configuration (attention at chosen resolutions, ``double_z``) and pretrained weights can be
mapped onto these classes without renaming. Plain torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def check_groups(channels: int, groups: int, where: str = "model.groups") -> None:
    """Raise a clear error when GroupNorm cannot split ``channels`` into ``groups``."""
    if groups <= 0 or channels % groups != 0:
        raise ValueError(
            f"{where}={groups} must divide every channel count (got {channels} channels)"
        )


def normalize(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm used throughout the trunks (eps/affine as in SD)."""
    check_groups(channels, groups)
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) x 2 plus a 1x1 shortcut if needed."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/proj convs (SD layout).

    Written with explicit matmuls rather than scaled_dot_product_attention so the legacy ONNX
    exporter produces plain MatMul/Softmax nodes on every opset we target.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).transpose(1, 2)  # b, hw, c
        k = k.reshape(b, c, hh * ww)  # b, c, hw
        w = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # b, hw(q), hw(k)
        v = v.reshape(b, c, hh * ww)
        h = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 conv3x3.

    The asymmetric (0, 1, 0, 1) padding matches SD so imported weights behave identically.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation followed by a conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: a list of resnet blocks, matching attention blocks, a resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    """Bottleneck: resnet, optional attention, resnet."""

    def __init__(self, channels: int, groups: int, attention: bool, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1: nn.Module = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _run_level(level: _Level, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """Image -> ``out_channels`` feature map at 1/2**(len(ch_mult)-1) resolution.

    ``attn_levels`` lists level indices (0 = full resolution) that get attention after every resnet
    block, the SD ``attn_resolutions`` idea expressed independently of the input size.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        out_channels: int,
        groups: int,
        mid_attention: bool = False,
        attn_levels: tuple[int, ...] = (),
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = _Level()
            block_out = ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, groups, dropout))
                block_in = block_out
                if i in attn_levels:
                    level.attn.append(AttnBlock(block_in, groups))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, groups, mid_attention, dropout)
        self.norm_out = normalize(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``z_channels`` map -> image; mirrors :class:`Encoder` with one extra block per level."""

    def __init__(
        self,
        *,
        out_channels: int,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        z_channels: int,
        groups: int,
        mid_attention: bool = False,
        attn_levels: tuple[int, ...] = (),
        dropout: float = 0.0,
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, groups, mid_attention, dropout)
        self.up = nn.ModuleList()
        # Built from the lowest resolution upwards but stored by level index, as SD does.
        for i in reversed(range(len(ch_mult))):
            level = _Level()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, groups, dropout))
                block_in = block_out
                if i in attn_levels:
                    level.attn.append(AttnBlock(block_in, groups))
            if i != 0:
                level.upsample = Upsample(block_in)
            self.up.insert(0, level)
        self.norm_out = normalize(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
