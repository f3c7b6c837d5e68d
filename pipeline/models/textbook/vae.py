"""Classic (textbook) VAEs for 28x28 digits: MLP, convolutional and class-conditional.

The recipe is Kingma & Welling, "Auto-Encoding Variational Bayes" (2014), as written in the
PyTorch examples repository (``examples/vae/main.py``): a 784-400-20 encoder with ReLU, a
diagonal-Gaussian posterior ``q(z|x) = N(mu, exp(logvar))``, the reparameterisation trick, a
20-400-784 decoder and the loss "BCE summed over pixels + analytic KL". The conditional variant
is Sohn et al., "Learning Structured Output Representation using Deep Conditional Generative
Models" (2015): a one-hot label is concatenated to the encoder input and to the decoder input.
The KL warm-up follows Bowman et al. (2016) / Sønderby et al. (2016); ``beta`` is the β-VAE
weight of Higgins et al. (2017).

Inputs are images in **[0, 1]** (not the [-1, 1] of the KL/VQ autoencoders), shape
``(B, C, H, W)``. With ``likelihood="bernoulli"`` each pixel is the probability of a Bernoulli
variable and the decoder returns **logits**; with ``likelihood="gaussian"`` the decoder returns
the **mean** of ``N(mean, sigma^2)`` per pixel, with one scalar ``sigma`` shared by all pixels
and learned by default (the "sigma-VAE" calibrated decoder of Rybkin et al., 2021); set
``learn_sigma=False`` for a fixed variance.

Conditioning lives in the shared base class, so ``MLPVAE`` and ``ConvVAE`` both become
conditional when ``num_classes > 0``. ``ConditionalVAE`` (MLP trunk) and ``ConditionalConvVAE``
(conv trunk) are the same models that insist on ``num_classes > 0``.

CPU check: ``python -m pytest tests/unit/test_classic_vae.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn


class Likelihood(StrEnum):
    bernoulli = "bernoulli"  # decoder -> logits, images in [0, 1]
    gaussian = "gaussian"  # decoder -> mean, with a (learned) sigma


LIKELIHOODS = tuple(Likelihood)
_MIN_LOG_SIGMA = math.log(1e-3)  # a learned sigma may not collapse to 0 (log-density -> inf)
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class ClassicVAEConfig:
    """Shape and likelihood of a classic VAE. Defaults are the textbook 784-400-20 MNIST VAE."""

    image_size: int = 28
    in_channels: int = 1
    latent_dim: int = 20
    hidden_dims: list[int] = field(default_factory=lambda: [400])  # fc layers after the trunk
    num_classes: int = 0  # > 0: conditional (one-hot label into encoder and decoder)
    likelihood: Likelihood = Likelihood.bernoulli
    conv_channels: list[int] = field(default_factory=lambda: [32, 64])  # ConvVAE: stride-2 convs
    gaussian_sigma: float = 0.1  # gaussian: (initial) decoder std, on the [0, 1] pixel scale
    learn_sigma: bool = True  # gaussian: learn sigma (sigma-VAE) or keep it fixed

    def __post_init__(self) -> None:
        self.likelihood = Likelihood(self.likelihood)  # a bad value fails here or at load


def _mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last one: it feeds another layer)."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers)


def _validate(cfg: ClassicVAEConfig) -> None:
    if min(cfg.image_size, cfg.in_channels, cfg.latent_dim) < 1 or cfg.num_classes < 0:
        raise ValueError("image_size, in_channels, latent_dim must be >= 1; num_classes >= 0")
    if any(d < 1 for d in [*cfg.hidden_dims, *cfg.conv_channels]):
        raise ValueError("hidden_dims and conv_channels must be positive")
    if cfg.likelihood == "gaussian" and cfg.gaussian_sigma <= 0:
        raise ValueError(f"gaussian_sigma must be > 0, got {cfg.gaussian_sigma}")


class ClassicVAE(nn.Module):
    """Shared VAE logic; subclasses build ``encoder`` (cond. input -> features) and ``decoder``.

    The encoder maps ``_encoder_input(x, onehot)`` to ``(B, enc_features)``; ``fc_mu`` and
    ``fc_logvar`` map those to the posterior. The decoder maps ``[z, onehot]`` to an output of
    the image's shape (logits or mean).
    """

    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, cfg: ClassicVAEConfig, enc_features: int):
        super().__init__()
        self.cfg = cfg
        self.fc_mu = nn.Linear(enc_features, cfg.latent_dim)
        self.fc_logvar = nn.Linear(enc_features, cfg.latent_dim)
        if cfg.likelihood == "gaussian":
            log_sigma = torch.tensor(math.log(cfg.gaussian_sigma))
            if cfg.learn_sigma:
                self.log_sigma = nn.Parameter(log_sigma)
            else:
                self.register_buffer("log_sigma", log_sigma)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)

    @property
    def conditional(self) -> bool:
        return self.cfg.num_classes > 0

    def _onehot(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """One-hot labels ``(B, num_classes)``; an empty ``(B, 0)`` tensor if unconditional."""
        if not self.conditional:
            if y is not None:
                raise ValueError("labels given to an unconditional model (num_classes=0)")
            return torch.zeros(batch, 0, device=device)
        if y is None:
            raise ValueError(f"conditional model (num_classes={self.cfg.num_classes}) needs y")
        y = torch.as_tensor(y, device=device).long().reshape(-1)
        if y.numel() != batch:
            raise ValueError(f"expected {batch} labels, got {y.numel()}")
        if y.numel() and (y.min() < 0 or y.max() >= self.cfg.num_classes):
            raise ValueError(f"labels must be in [0, {self.cfg.num_classes}), got {y.tolist()}")
        return F.one_hot(y, self.cfg.num_classes).float()

    def _encoder_input(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)``, each ``(B, latent_dim)``, for images ``x`` in [0, 1]."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images of shape (B, {self.image_shape}), got {x.shape}")
        h = self.encoder(self._encoder_input(x, self._onehot(y, x.shape[0], x.device)))
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (bernoulli) or mean (gaussian), shape ``(B, C, H, W)``."""
        onehot = self._onehot(y, z.shape[0], z.device)
        return self.decoder(torch.cat([z, onehot], dim=1)).view(-1, *self.image_shape)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(decoder output, mu, logvar)`` with ``z`` drawn by reparameterisation."""
        mu, logvar = self.encode(x, y)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decode(z, y), mu, logvar

    def log_likelihood(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``log p(x|z)`` in nats, summed over pixels: shape ``(B,)``; ``out`` from `decode`."""
        if self.cfg.likelihood == "bernoulli":
            return bernoulli_log_likelihood(x, out)
        return gaussian_log_likelihood(x, out, self.log_sigma.clamp(min=_MIN_LOG_SIGMA))

    def to_image(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> expected image in [0, 1] (sigmoid of logits, or clamped mean)."""
        if self.cfg.likelihood == "bernoulli":
            return torch.sigmoid(out)
        return out.clamp(0.0, 1.0)

    @torch.no_grad()
    def sample(
        self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Decode ``n`` prior draws ``z ~ N(0, I)``; returns the mean images in [0, 1]."""
        device = self.fc_mu.weight.device
        z = torch.randn(n, self.cfg.latent_dim, generator=generator, device=device)
        return self.to_image(self.decode(z, y))

    def generate(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One image of each requested class: ``(len(labels), C, H, W)`` in [0, 1]."""
        if not self.conditional:
            raise ValueError("generate() needs a conditional model (num_classes > 0)")
        labels = torch.as_tensor(labels).long().reshape(-1)
        return self.sample(labels.numel(), labels, generator)


class MLPVAE(ClassicVAE):
    """Fully connected VAE; the default config is exactly the PyTorch-examples 784-400-20 VAE."""

    def __init__(self, cfg: ClassicVAEConfig):
        _validate(cfg)
        pixels = cfg.in_channels * cfg.image_size**2
        enc_dims = [pixels + cfg.num_classes, *cfg.hidden_dims]
        super().__init__(cfg, enc_dims[-1])
        self.encoder = _mlp(enc_dims)
        dec_dims = [cfg.latent_dim + cfg.num_classes, *reversed(cfg.hidden_dims)]
        self.decoder = nn.Sequential(_mlp(dec_dims), nn.Linear(dec_dims[-1], pixels))

    def _encoder_input(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.flatten(1), onehot], dim=1)


class ConvVAE(ClassicVAE):
    """Conv encoder (4x4 stride-2 convs, 1->32->64: 28->14->7), fc to mu/logvar, mirror decoder.

    Between the conv features and ``mu``/``logvar`` sit the ``hidden_dims`` fc layers (as in
    the MLP; the default [400] gives 2.6 M parameters, ``hidden_dims=[]`` maps the 64x7x7
    features straight to ``mu``/``logvar`` with 0.26 M). A conditional ConvVAE feeds the label to the encoder as constant one-hot planes
    concatenated to the image channels, and to the decoder concatenated to ``z``.
    """

    def __init__(self, cfg: ClassicVAEConfig):
        _validate(cfg)
        stride = 2 ** len(cfg.conv_channels)
        if not cfg.conv_channels or cfg.image_size % stride:
            raise ValueError(f"image_size {cfg.image_size} must be divisible by 2^len(convs)")
        side = cfg.image_size // stride
        feat_shape = (cfg.conv_channels[-1], side, side)
        flat = math.prod(feat_shape)
        super().__init__(cfg, cfg.hidden_dims[-1] if cfg.hidden_dims else flat)
        self.feat_shape = feat_shape
        chans = [cfg.in_channels + cfg.num_classes, *cfg.conv_channels]
        convs: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            convs += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        self.encoder = nn.Sequential(*convs, nn.Flatten(), _mlp([flat, *cfg.hidden_dims]))
        self.decoder = self._build_decoder(cfg, flat)

    def _build_decoder(self, cfg: ClassicVAEConfig, flat: int) -> nn.Sequential:
        fc_dims = [cfg.latent_dim + cfg.num_classes, *reversed(cfg.hidden_dims)]
        layers: list[nn.Module] = [_mlp(fc_dims), nn.Linear(fc_dims[-1], flat), nn.ReLU()]
        layers.append(nn.Unflatten(1, self.feat_shape))
        chans = [*reversed(cfg.conv_channels), cfg.in_channels]
        for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < len(chans) - 2:  # no activation on the output: logits / unbounded mean
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def _encoder_input(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        planes = onehot[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return torch.cat([x, planes], dim=1)


class ConditionalVAE(MLPVAE):
    """Class-conditional MLP VAE (Sohn et al., 2015); needs ``num_classes > 0``."""

    def __init__(self, cfg: ClassicVAEConfig):
        if cfg.num_classes < 1:
            raise ValueError("ConditionalVAE needs num_classes > 0")
        super().__init__(cfg)


class ConditionalConvVAE(ConvVAE):
    """Class-conditional ConvVAE (label planes into the encoder); needs ``num_classes > 0``."""

    def __init__(self, cfg: ClassicVAEConfig):
        if cfg.num_classes < 1:
            raise ValueError("ConditionalConvVAE needs num_classes > 0")
        super().__init__(cfg)


# ----------------------------------------------------------------------------- losses


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over pixels of ``x log sigmoid(l) + (1-x) log(1-sigmoid(l))``: shape ``(B,)``.

    For grey-level ``x`` in [0, 1] this is the textbook "BCE" objective, not a normalised
    density of grey values (only binary ``x`` gives a true log-probability).
    """
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return -bce.flatten(1).sum(dim=1)


def gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor
) -> torch.Tensor:
    """Sum over pixels of ``log N(x; mean, sigma^2)`` (continuous density): shape ``(B,)``."""
    z = (x - mean) * torch.exp(-log_sigma)
    return (-0.5 * z.pow(2) - log_sigma - 0.5 * _LOG_2PI).flatten(1).sum(dim=1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Analytic ``KL(N(mu, exp(logvar)) || N(0, I))`` summed over latent dims: shape ``(B,)``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def elbo_terms(
    model: ClassicVAE, x: torch.Tensor, y: torch.Tensor | None = None, beta: float = 1.0
) -> dict[str, torch.Tensor]:
    """Batch means, in nats per image, of the (β-)ELBO terms for one reparameterised draw.

    ``recon`` = ``-log p(x|z)`` (BCE-with-logits summed over pixels, or Gaussian NLL with the
    model's sigma), ``kl`` = analytic KL summed over latent dims, ``loss`` = recon + beta * kl
    (what to minimise), ``nelbo`` = recon + kl (the beta-free negative ELBO, for logging).
    """
    return elbo_from_outputs(model, x, model(x, y), beta)


def elbo_from_outputs(
    model: ClassicVAE, x: torch.Tensor, outputs: tuple, beta: float = 1.0
) -> dict[str, torch.Tensor]:
    """`elbo_terms` from the `(out, mu, logvar)` a forward pass returned.

    Lets a trainer run the forward pass through a wrapper (DDP) and still use the model's own
    likelihood.
    """
    out, mu, logvar = outputs
    recon = -model.log_likelihood(x, out).mean()
    kl = gaussian_kl(mu, logvar).mean()
    return {"loss": recon + beta * kl, "recon": recon, "kl": kl, "nelbo": recon + kl}


CLASSIC_MODELS: dict[str, type[ClassicVAE]] = {
    "mlp_vae": MLPVAE,
    "conv_vae": ConvVAE,
    "cvae": ConditionalVAE,
    "conv_cvae": ConditionalConvVAE,
}
