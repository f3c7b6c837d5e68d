"""Held-out likelihood of a VAE: negative ELBO, IWAE estimate of -log p(x), bits per dimension.

Works with any model exposing the classic-VAE interface of `pipeline.models.textbook`:
``encode(x, y) -> (mu, logvar)`` of a diagonal-Gaussian posterior, ``decode(z, y) -> out`` and
``log_likelihood(x, out) -> (B,)`` (``log p(x|z)`` summed over pixels). The prior is N(0, I).

* `negative_elbo`: ``E_q[-log p(x|z)] + KL(q(z|x) || p(z))`` with the KL in closed form and the
  reconstruction term from reparameterised draws; an upper bound on ``-log p(x)``.
* `iwae_nll`: Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders" (2016):
  ``-log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)`` with ``z_i ~ q(z|x)``. In expectation it is
  a tighter upper bound than the negative ELBO for every k and tends to ``-log p(x)`` as
  k -> inf; k = 1 is the negative ELBO with a single-sample (Monte Carlo) KL.
* `bits_per_dim`: ``nll / (D ln 2)``.

Units and conventions. Everything is in nats per image, averaged over images. What the number
means depends on the decoder:

* Bernoulli decoder on binary data (e.g. stochastically binarised MNIST): a true discrete
  log-probability; literature values for MNIST are ~85-90 nats. On grey-level data in [0, 1]
  the "BCE" is not a normalised likelihood, so its nats are not comparable to those papers.
* Gaussian decoder on 8-bit images: ``log p`` is a *density* over the scaled pixel values, so
  the raw number depends on the scaling and can be negative. To report a discrete NLL (and
  bits/dim comparable with PixelCNN/RealNVP/Glow), evaluate on dequantised data
  ``y = (x_uint8 + u) / 256`` with ``u ~ U[0, 1)`` (see `dequantize`) and add
  ``D * ln 256`` nats, i.e. ``-D * ln(bin_width)`` with bin width ``1/256``
  (`discretization_correction`). Then ``NLL_discrete <= NLL_density + D ln 256`` (Jensen over
  the dequantisation noise; Theis et al., 2016), so bits/dim = ``bits_per_dim(nll + corr, D)``
  = density bits/dim + 8. Other scalings: ``x / 255`` has bin width 1/255 (add ``D ln 255``);
  data in [-1, 1] from ``2 (x + u) / 256 - 1`` has bin width 2/256 (add ``D ln 128``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

Batches = torch.Tensor | Iterable


def bits_per_dim(nll_nats: float, num_dims: int) -> float:
    """Convert a per-image NLL in nats to bits per dimension: ``nll / (D ln 2)``."""
    if num_dims < 1:
        raise ValueError(f"num_dims must be >= 1, got {num_dims}")
    return float(nll_nats) / (num_dims * math.log(2.0))


def discretization_correction(num_dims: int, bin_width: float = 1.0 / 256) -> float:
    """Nats to add to a continuous NLL to bound the discrete NLL: ``-D ln(bin_width)``.

    ``bin_width`` is the width of one 8-bit level on the model's data scale: 1/256 for
    ``(x + u) / 256`` in [0, 1] (the default), 1/255 for ``x / 255``, 2/256 for [-1, 1].
    """
    if num_dims < 1 or not 0 < bin_width:
        raise ValueError("num_dims must be >= 1 and bin_width > 0")
    return -num_dims * math.log(bin_width)


def dequantize(x_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly dequantise 8-bit values to ``(x + u) / 256`` in [0, 1), ``u ~ U[0, 1)``."""
    x = x_uint8.float()
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return (x + u) / 256.0


@contextmanager
def _eval_mode(model: nn.Module):
    """Evaluate in eval mode without gradients, then restore the model's previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _batches(data: Batches, y: torch.Tensor | None, batch_size: int) -> Iterator[tuple]:
    """``(x, y)`` pairs from a tensor (+ labels) or from an iterable of batches.

    An iterable may yield tensors, ``(x, y)`` tuples/lists or dicts with "image" and "label".
    """
    if isinstance(data, torch.Tensor):
        for start in range(0, data.shape[0], batch_size):
            end = start + batch_size
            yield data[start:end], None if y is None else y[start:end]
        return
    if y is not None:
        raise ValueError("pass labels inside the batches when data is an iterable")
    for batch in data:
        if isinstance(batch, dict):
            yield batch["image"], batch.get("label")
        elif isinstance(batch, tuple | list):
            yield batch[0], batch[1] if len(batch) > 1 else None
        else:
            yield batch, None


def _draw(mu: torch.Tensor, logvar: torch.Tensor, k: int, generator) -> tuple:
    """``k`` reparameterised draws ``z = mu + std * eps``: (z, eps), each ``(k, B, L)``."""
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps, eps


def negative_elbo(
    model: nn.Module,
    data: Batches,
    y: torch.Tensor | None = None,
    *,
    batch_size: int = 500,
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> float:
    """Mean negative ELBO in nats per image over `data` (a tensor, or an iterable of batches).

    KL is analytic; the reconstruction term averages `samples` reparameterised draws per image.
    """
    total, count = 0.0, 0
    with _eval_mode(model):
        for xb, yb in _batches(data, y, batch_size):
            mu, logvar = model.encode(xb, yb)
            z, _ = _draw(mu, logvar, samples, generator)
            out = model.decode(z.flatten(0, 1), _repeat(yb, samples))
            rec = -model.log_likelihood(_repeat(xb, samples), out).view(samples, -1).mean(0)
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
            total += float((rec + kl).sum())
            count += xb.shape[0]
    if count == 0:
        raise ValueError("no data to evaluate")
    return total / count


def _repeat(t: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """Tile a batch k times along dim 0, sample-major (matches ``z.flatten(0, 1)``)."""
    if t is None:
        return None
    return t.repeat(k, *([1] * (t.dim() - 1)))


def log_importance_weights(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    k: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``log p(x|z) + log p(z) - log q(z|x)`` for k draws per image: shape ``(k, B)``.

    Decodes ``k * B`` latents at once; `iwae_nll` bounds that by chunking.
    """
    mu, logvar = model.encode(x, y)
    z, eps = _draw(mu, logvar, k, generator)
    # log N(z; 0, I) - log N(z; mu, sigma^2): the 2*pi terms cancel, (z-mu)/sigma = eps.
    log_prior_ratio = (0.5 * (eps.pow(2) - z.pow(2) + logvar)).sum(dim=-1)
    out = model.decode(z.flatten(0, 1), _repeat(y, k))
    log_px_z = model.log_likelihood(_repeat(x, k), out).view(k, -1)
    return log_px_z + log_prior_ratio


def iwae_nll(
    model: nn.Module,
    x: Batches,
    y: torch.Tensor | None = None,
    k: int = 100,
    batch_chunk: int | None = None,
    *,
    max_rows: int = 8192,
    generator: torch.Generator | None = None,
) -> float:
    """Importance-weighted estimate of ``-log p(x)`` with `k` samples, nats per image (mean).

    Memory-bounded: at most ``max_rows`` latents are decoded at once. Images go in chunks of
    `batch_chunk` (default ``max(1, max_rows // k)``; an iterable of batches keeps its own
    batch size); if ``batch * k`` exceeds
    ``max_rows`` the k draws are split too, and their log-weights are concatenated before the
    log-sum-exp (only ``k`` floats per image are kept).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    batch_chunk = batch_chunk or max(1, max_rows // k)
    total, count = 0.0, 0
    with _eval_mode(model):
        for xb, yb in _batches(x, y, batch_chunk):
            draws = max(1, max_rows // xb.shape[0])  # an iterable's batches may be larger
            parts = [
                log_importance_weights(model, xb, yb, min(draws, k - done), generator)
                for done in range(0, k, draws)
            ]
            log_w = torch.cat(parts, dim=0)
            log_px = torch.logsumexp(log_w, dim=0) - math.log(k)
            total += float(-log_px.sum())
            count += xb.shape[0]
    if count == 0:
        raise ValueError("no data to evaluate")
    return total / count
