"""SD-class KL autoencoder: configs/model/kl-f8.yaml reproduces SD's kl-f8 parameter for parameter,
and the LDM-style options (attn_resolutions, embed_dim, double_z, dropout) behave as in LDM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.models import ModelConfig, build_model
from pipeline.models.kl import attn_levels
from pipeline.train.config import TrainRunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def count(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_kl_f8_matches_diffusers_parameter_counts():
    files = [str(CONFIGS / "train/kl-f4-tiny.yaml"), str(CONFIGS / "model/kl-f8.yaml")]
    cfg = load_config(TrainRunConfig, files, ["data.shards=x"])
    with torch.device("meta"):  # counts only: no 84M-parameter allocation
        model = build_model(cfg.model)
    # diffusers AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2).
    assert count(model.encoder, model.quant_conv) == 34_163_664
    assert count(model.decoder, model.post_quant_conv) == 49_490_199
    assert model.downsample_factor == 8 and model.latent_channels == 4


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(ch=8, ch_mult=[1, 2, 2], groups=4, resolution=32), **kw})


def test_attn_resolutions_follow_ldm_levels():
    # Levels run at 32, 16, 8: attention on the 16 and 8 levels, after every resnet block.
    cfg = tiny(attn_resolutions=[16, 8], num_res_blocks=2)
    assert attn_levels(cfg) == (1, 2)
    model = build_model(cfg)
    assert len(model.encoder.down[0].attn) == 0 and len(model.encoder.down[1].attn) == 2
    assert len(model.decoder.up[2].attn) == 3  # decoder: num_res_blocks + 1 per level
    assert model(torch.zeros(1, 3, 32, 32))[0].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"model.attn_resolutions \[12\] match no level"):
        build_model(tiny(attn_resolutions=[12]))


def test_embed_dim_double_z_and_dropout():
    model = build_model(tiny(embed_dim=3, dropout=0.1))
    assert model.latent_channels == 3
    post = model.encode(torch.zeros(2, 3, 16, 16))
    assert post.mean.shape == (2, 3, 4, 4)
    assert model.decode(post.mean).shape == (2, 3, 16, 16)
    assert model.quant_conv.weight.shape == (6, 8, 1, 1)
    with pytest.raises(ValueError, match="model.double_z"):
        build_model(tiny(double_z=False))
    with pytest.raises(ValueError, match="model.dropout"):
        build_model(tiny(dropout=1.5))


def test_downsample_pads_like_sd():
    # SD pads (0, 1, 0, 1) then runs a 3x3 stride-2 conv with no padding.
    model = build_model(tiny(ch_mult=[1, 2]))
    down = model.encoder.down[0].downsample
    x = torch.randn(1, 8, 6, 6)
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2
    )
    assert torch.equal(down(x), ref) and ref.shape[-1] == 3
