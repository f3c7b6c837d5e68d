"""Model families (pipeline.models.family): one answer per kind, the same from a config's kind
as from a built model, and each family's operations on real tiny models."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import MODEL_REGISTRY, ModelConfig, build_model
from pipeline.models.family import TEXTBOOK, family_for, family_of
from pipeline.models.losses import LossConfig
from pipeline.models.textbook import ClassicVAEConfig


def _tiny(kind: str) -> torch.nn.Module:
    classes = 3 if kind in ("cvae", "conv_cvae") else 0
    classic = ClassicVAEConfig(
        num_classes=classes,
        image_size=8,
        in_channels=1,
        latent_dim=2,
        hidden_dims=[8],
        conv_channels=[4],
    )
    cfg = ModelConfig(
        kind=kind, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=2, classic=classic
    )
    return build_model(cfg)


@pytest.mark.parametrize("kind", sorted(MODEL_REGISTRY))
def test_kind_and_model_agree(kind):
    model = _tiny(kind)
    assert family_of(model) is family_for(kind)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_autoencoder_families(kind):
    torch.manual_seed(0)
    model, family = _tiny(kind), family_for(kind)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    terms, recon = family.loss(model, images, None, LossConfig())
    assert recon.shape == images.shape and terms["loss"].requires_grad
    model.eval()
    recon, latents, indices = family.reconstruct(model, images)
    assert recon.shape == images.shape
    assert torch.allclose(family.stored_latents(model, images), latents, atol=1e-6)
    assert (indices is not None) == (kind == "vq")
    assert family.onnx == kind and family.evaluation == "quality" and family.adversarial


def test_textbook_family():
    model = _tiny("mlp_vae")
    images = torch.rand(2, 1, 8, 8)
    terms, _ = TEXTBOOK.loss(model, images, None, LossConfig(kl_weight=1.0))
    assert terms["loss"].requires_grad
    recon, mu, indices = TEXTBOOK.reconstruct(model, images)
    assert recon.shape == images.shape and mu.shape == (2, 2) and indices is None
    assert TEXTBOOK.onnx is None and TEXTBOOK.evaluation == "likelihood"


def test_unknown_kinds_and_models_are_refused():
    with pytest.raises(ValueError, match="model.kind='nope'"):
        family_for("nope")
    with pytest.raises(TypeError, match="Linear is not a latentpipe model"):
        family_of(torch.nn.Linear(2, 2))
