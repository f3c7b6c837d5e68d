"""Autoencoder models: registry of model kinds and a config-driven constructor.

New kinds (e.g. an SD-compatible KL variant or a VQ autoencoder) register here under their
``model.kind`` name; each class takes its config object as the only constructor argument.
"""

from __future__ import annotations

from torch import nn

from pipeline.models.kl import DiagonalGaussian, KLAutoencoder, ModelConfig
from pipeline.models.losses import LossConfig, autoencoder_loss, vq_autoencoder_loss
from pipeline.models.quantizer import VectorQuantizer, VQConfig
from pipeline.models.vq import VQAutoencoder, VQEncoderForExport

MODEL_REGISTRY: dict[str, type[nn.Module]] = {"kl": KLAutoencoder, "vq": VQAutoencoder}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the model class registered for ``cfg.kind``."""
    try:
        cls = MODEL_REGISTRY[cfg.kind]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(
            f"model.kind={cfg.kind!r} is not a known model kind (known: {known})"
        ) from None
    return cls(cfg)


__all__ = [
    "MODEL_REGISTRY",
    "DiagonalGaussian",
    "KLAutoencoder",
    "LossConfig",
    "ModelConfig",
    "VQAutoencoder",
    "VQConfig",
    "VQEncoderForExport",
    "VectorQuantizer",
    "autoencoder_loss",
    "build_model",
    "vq_autoencoder_loss",
]
