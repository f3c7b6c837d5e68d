"""Tests for pipeline.models: shapes, posterior maths, losses, registry errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.models import MODEL_REGISTRY, KLAutoencoder, ModelConfig, build_model
from pipeline.models.kl import DiagonalGaussian, ModelKind
from pipeline.models.losses import LossConfig, autoencoder_loss


def tiny(**kw) -> ModelConfig:
    base = dict(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, groups=4)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize(
    ("ch_mult", "factor", "attention"),
    [([1, 2, 2], 4, False), ([1, 2, 2, 4], 8, True)],
)
def test_shapes(ch_mult, factor, attention):
    torch.manual_seed(0)
    model = build_model(tiny(ch_mult=ch_mult, attention=attention))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, post = model(x)
    assert model.downsample_factor == factor
    assert model.latent_channels == 4
    assert recon.shape == x.shape
    assert post.mean.shape == (2, 4, 32 // factor, 32 // factor)
    assert post.logvar.shape == post.mean.shape
    assert post.kl().shape == (2,)
    assert model.decode(post.mode()).shape == x.shape


def test_sd_style_parameter_names():
    names = set(build_model(tiny(attention=True)).state_dict())
    for key in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.mid.attn_1.q.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.2.block.1.conv2.weight",
        "decoder.conv_out.weight",
    ):
        assert key in names, key


def test_kl_nonnegative_and_zero_at_prior():
    torch.manual_seed(0)
    post = DiagonalGaussian(torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2) * 3)
    assert (post.kl() >= 0).all()
    prior = DiagonalGaussian(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2))
    assert torch.allclose(prior.kl(), torch.zeros(2))


def test_logvar_clamped_and_sampling_seeded():
    post = DiagonalGaussian(torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 100.0))
    assert post.logvar.max().item() == 20.0
    assert DiagonalGaussian(post.mean, torch.full_like(post.mean, -99.0)).logvar.min() == -30.0
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("recon", ["l1", "mse"])
def test_loss_finite_and_decreases(recon):
    torch.manual_seed(0)
    model = build_model(tiny(ch_mult=[1, 2]))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    cfg = LossConfig(recon=recon, kl_weight=1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        rec, post = model(x, sample_posterior=False)
        out = autoencoder_loss(x, rec, post, cfg)
        assert set(out) == {"loss", "recon", "kl"}
        assert all(torch.isfinite(v) for v in out.values())
        assert torch.allclose(out["loss"], out["recon"] + cfg.kl_weight * out["kl"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0]


def test_build_model_errors():
    assert MODEL_REGISTRY["kl"] is KLAutoencoder
    with pytest.raises(ValueError, match=r"'vqgan' is not a valid ModelKind"):
        build_model(tiny(kind="vqgan"))  # model.kind is an Enum: refused when the config is built
    assert sorted(MODEL_REGISTRY) == sorted(ModelKind)  # every kind has a class, and back
    with pytest.raises(ValueError, match="model.groups"):
        build_model(tiny(groups=3))
    with pytest.raises(ValueError, match="model.ch_mult"):
        build_model(tiny(ch_mult=[]))


def test_bad_recon_loss():
    post = DiagonalGaussian(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="not a valid Recon"):
        autoencoder_loss(x, x, post, LossConfig(recon="ssim"))


def test_configs_work_as_omegaconf_structured():
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"ch": 8, "groups": 4})
    model = build_model(cfg)
    assert model.downsample_factor == 4
    OmegaConf.structured(LossConfig)


@pytest.mark.parametrize(
    "override",
    [
        "model.kind=vqgan",
        "model.vq.distance=dot",
        "model.classic.likelihood=laplace",
        "loss.recon=ssim",
        "loss.disc_norm=layer",
        "train.lr_scaling=cubic",
        "train.precision=fp8",
        "data.value_range=bytes",
    ],
)
def test_model_choices_fail_at_load_naming_the_key(override):
    from pipeline.config import ConfigError, load_config
    from pipeline.train.config import TrainRunConfig

    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(TrainRunConfig, [], ["data.shards=x", override])
