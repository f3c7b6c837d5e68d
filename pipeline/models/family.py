"""Model families: what the code around a model needs to know about its kind, in one place.

Three families: the SD-class KL autoencoder, the VQ autoencoder and the textbook VAEs. Training,
evaluation, the report and export ask the family (``family_of(model)`` or
``family_for(cfg.model.kind)``) instead of branching on the model's class or kind:

* ``loss``: the training objective for the loss weights given (the trainer schedules them:
  pipeline/train/loss_schedule.py) and the decoder output;
* ``stored_latents``: what an encoded corpus stores for an image, as float (KL: the posterior
  mean; VQ: the quantised latent) — export's scale statistics;
* ``reconstruct``: (reconstruction, stored latents, code indices or None) — evaluation
  (the textbook VAEs return images in [0, 1], the autoencoders in their own range);
* ``evaluation``: "quality" (PSNR/SSIM) or "likelihood" (ELBO / IWAE NLL);
* ``onnx``: which ONNX encoder graph export builds ("kl", "vq"), or None (no ONNX encoder);
* ``adversarial``: whether the PatchGAN loss applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models.kl import KLAutoencoder
from pipeline.models.losses import LossConfig, autoencoder_loss, vq_autoencoder_loss
from pipeline.models.textbook import CLASSIC_MODELS, ClassicVAE, elbo_from_outputs
from pipeline.models.vq import VQAutoencoder

Terms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KLFamily:
    name: str = "kl"
    evaluation: str = "quality"
    onnx: str | None = "kl"
    adversarial: bool = True

    def loss(self, model, batch, labels, cfg: LossConfig) -> tuple[Terms, torch.Tensor]:
        recon, posterior = model(batch)
        return autoencoder_loss(batch, recon, posterior, cfg), recon

    def stored_latents(self, model: nn.Module, images: torch.Tensor, labels=None) -> torch.Tensor:
        return model.encode(images).mean

    def reconstruct(self, model: nn.Module, images: torch.Tensor, labels=None):
        mean = model.encode(images).mean
        return model.decode(mean), mean, None


@dataclass(frozen=True)
class VQFamily:
    name: str = "vq"
    evaluation: str = "quality"
    onnx: str | None = "vq"
    adversarial: bool = True

    def loss(self, model, batch, labels, cfg: LossConfig) -> tuple[Terms, torch.Tensor]:
        recon, info = model(batch)
        return vq_autoencoder_loss(batch, recon, info, cfg), recon

    def stored_latents(self, model: nn.Module, images: torch.Tensor, labels=None) -> torch.Tensor:
        return model.export_forward(images)[1]  # (indices, quantized)

    def reconstruct(self, model: nn.Module, images: torch.Tensor, labels=None):
        z_q, indices, _ = model.encode(images)
        return model.decode(z_q), z_q, indices


@dataclass(frozen=True)
class TextbookFamily:
    name: str = "textbook"
    evaluation: str = "likelihood"
    onnx: str | None = None  # Linear encoders over a fixed image size, class labels
    adversarial: bool = False

    def loss(self, model, batch, labels, cfg: LossConfig) -> tuple[Terms, torch.Tensor]:
        core = getattr(model, "module", model)  # under DDP the model is wrapped
        outputs = model(batch, labels)
        return elbo_from_outputs(core, batch, outputs, cfg.kl_weight), outputs[0]

    def stored_latents(self, model: nn.Module, images: torch.Tensor, labels=None) -> torch.Tensor:
        return model.encode(images, labels)[0]  # the posterior mean mu

    def reconstruct(self, model: nn.Module, images: torch.Tensor, labels=None):
        mu = model.encode(images, labels)[0]
        return model.to_image(model.decode(mu, labels)), mu, None


Family = KLFamily | VQFamily | TextbookFamily
KL, VQ, TEXTBOOK = KLFamily(), VQFamily(), TextbookFamily()
_BY_KIND: dict[str, Family] = {"kl": KL, "vq": VQ, **{kind: TEXTBOOK for kind in CLASSIC_MODELS}}
_BY_CLASS: tuple[tuple[type, Family], ...] = (
    (KLAutoencoder, KL),
    (VQAutoencoder, VQ),
    (ClassicVAE, TEXTBOOK),
)


def family_for(kind: str) -> Family:
    """The family of a ``model.kind``."""
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise ValueError(f"model.kind={kind!r} is not a known model kind") from None


def family_of(model: nn.Module) -> Family:
    """The family of a built model (DDP-wrapped or not)."""
    core = getattr(model, "module", model)
    for cls, family in _BY_CLASS:
        if isinstance(core, cls):
            return family
    raise TypeError(f"{type(core).__name__} is not a latentpipe model")
