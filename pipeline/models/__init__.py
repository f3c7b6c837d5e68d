"""Autoencoder models: registry of model kinds and a config-driven constructor.

Kinds: "kl" (SD-class KL autoencoder), "vq" (VQ autoencoder) and the textbook VAEs
"mlp_vae", "conv_vae", "cvae", "conv_cvae" (which read only the ``model.classic`` section).
"""

from __future__ import annotations

from torch import nn

from pipeline.models.kl import DiagonalGaussian, KLAutoencoder, ModelConfig
from pipeline.models.losses import LossConfig, autoencoder_loss, vq_autoencoder_loss
from pipeline.models.quantizer import VectorQuantizer, VQConfig
from pipeline.models.textbook import CLASSIC_MODELS, ClassicVAE, ClassicVAEConfig
from pipeline.models.vq import VQAutoencoder

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "kl": KLAutoencoder,
    "vq": VQAutoencoder,
    **CLASSIC_MODELS,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the model class registered for ``cfg.kind``."""
    try:
        cls = MODEL_REGISTRY[cfg.kind]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(
            f"model.kind={cfg.kind!r} is not a known model kind (known: {known})"
        ) from None
    return cls(cfg.classic) if cfg.kind in CLASSIC_MODELS else cls(cfg)


def training_buffers(model: nn.Module) -> list[str]:
    """``state_dict`` names of the buffers only training needs (a VQ codebook's statistics).

    A model artifact leaves them out (inference never reads them); a training checkpoint keeps
    them beside the artifact, so a resumed run continues exactly.
    """
    names = []
    for prefix, module in model.named_modules():
        for name in getattr(module, "TRAINING_BUFFERS", ()):
            names.append(f"{prefix}.{name}" if prefix else name)
    return names


__all__ = [
    "MODEL_REGISTRY",
    "ClassicVAE",
    "ClassicVAEConfig",
    "DiagonalGaussian",
    "KLAutoencoder",
    "LossConfig",
    "ModelConfig",
    "VQAutoencoder",
    "VQConfig",
    "VectorQuantizer",
    "autoencoder_loss",
    "build_model",
    "training_buffers",
    "vq_autoencoder_loss",
]
