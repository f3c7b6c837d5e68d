"""One small interface over the three model families, so every picture is written once.

A codec maps images to a deterministic latent (``encode``), latents back to displayable images
in [0, 1] (``decode``) and, where the model has one, draws from its prior (``prior``):

* KL autoencoder: the posterior mean; decode the latent as is; prior N(0, I) over [C, h, w].
* VQ autoencoder: the *pre-quantisation* latent (quant_conv output); ``decode`` quantises to
  the nearest codes first, so every picture shows something the decoder can actually be fed
  (an interpolation or traversal therefore moves in discrete code steps). No prior: a VQ
  model needs a separately learned prior over code indices.
* Classic VAE: ``mu`` of q(z|x); ``to_image(decode(z, y))``; prior via ``sample``/``generate``.
"""

from __future__ import annotations

import torch

from pipeline.models import ClassicVAE
from pipeline.models.family import family_of
from pipeline.report.pictures import to_unit


class KLCodec:
    kind = "kl"
    has_prior = True
    spatial = True  # latents are [C, h, w] maps (traverse channels, not vector dims)
    conditional = False

    def __init__(self, model: torch.nn.Module, value_range: str, resolution: int):
        self.model = model
        self.value_range = value_range
        side = resolution // model.downsample_factor
        self.latent_shape = (model.latent_channels, side, side)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.encode(x).mean

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return to_unit(self.model.decode(z), self.value_range)

    def prior(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.decode(torch.randn((n, *self.latent_shape), generator=generator))


class VQCodec(KLCodec):
    kind = "vq"
    has_prior = False

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.quant_conv(self.model.encoder(x))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        z_q, _ = self.model.quantize.quantize(z)  # no EMA/dead-code updates, unlike forward
        return to_unit(self.model.decode(z_q), self.value_range)


class ClassicCodec:
    kind = "classic"
    has_prior = True
    spatial = False

    def __init__(self, model: ClassicVAE):
        self.model = model
        self.conditional = model.conditional
        self.latent_shape = (model.cfg.latent_dim,)

    def posterior(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple:
        return self.model.encode(x, y if self.conditional else None)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.posterior(x, y)[0]

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.to_image(self.model.decode(z, y if self.conditional else None))

    def prior(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.model.sample(n, generator=generator)

    def generate(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.model.generate(labels, generator=generator)


CODECS = {"kl": KLCodec, "vq": VQCodec}


def make_codec(model: torch.nn.Module, value_range: str, resolution: int):
    """The codec for a trained model (KL, VQ or any classic VAE), chosen by its family."""
    family = family_of(model)
    if family.name == "textbook":
        return ClassicCodec(model)
    return CODECS[family.name](model, value_range, resolution)
