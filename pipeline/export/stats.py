"""Estimate the latent scale/shift (SD-style ``scaling_factor``/``shift_factor``) from real images.

KL models: statistics of the posterior means. VQ models: statistics of the quantized latents (the
codebook lookup), which is what LDM's diffusion on VQ latents is trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from pipeline.data.images import normalize
from pipeline.data.reader import iter_val_images
from pipeline.latents.stats import ChannelStats
from pipeline.models.family import family_of

log = logging.getLogger(__name__)

BATCH = 16


def _batches(images: Iterable[np.ndarray], size: int) -> Iterable[torch.Tensor]:
    buf: list[np.ndarray] = []
    for arr in images:
        buf.append(normalize(arr))
        if len(buf) == size:
            yield torch.from_numpy(np.stack(buf))
            buf = []
    if buf:
        yield torch.from_numpy(np.stack(buf))


def encoder_latents(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the stored latents stand for: quantized latents (VQ) or posterior means (KL)."""
    return family_of(model).stored_latents(model, images)


def latent_moments(model: nn.Module, images: Iterable[np.ndarray]) -> tuple[float, float, int]:
    """(mean, std, n_images) over every element of the latents of uint8 HWC ``images``.

    Uses the encode job's streaming statistics (`ChannelStats`), so the sidecar's factors are
    computed exactly as the manifest's are.
    """
    device = next(model.parameters()).device
    stats, n_images = None, 0
    model.eval()
    with torch.no_grad():
        for batch in _batches(images, BATCH):
            latents = encoder_latents(model, batch.to(device)).cpu().numpy()
            stats = stats or ChannelStats(latents.shape[1])
            stats.update(latents)
            n_images += batch.shape[0]
    if n_images == 0:
        return 0.0, 1.0, 0
    summary = stats.summary()
    return summary["mean"], summary["std"], n_images


def estimate_latent_stats(
    model: nn.Module, urls: list[str], resolution: int, limit: int
) -> tuple[float, float]:
    """Scalar mean and std of posterior means over up to ``limit`` images from shard ``urls``."""
    mean, std, _ = estimate_latent_stats_counted(model, urls, resolution, limit)
    return mean, std


def estimate_latent_stats_counted(
    model: nn.Module, urls: list[str], resolution: int, limit: int
) -> tuple[float, float, int]:
    """Like :func:`estimate_latent_stats` but also returns the number of images used."""
    images = (arr for _key, arr in iter_val_images(urls, resolution, limit))
    mean, std, n = latent_moments(model, images)
    if n == 0:
        raise ValueError(f"no decodable images found for latent statistics in {urls}")
    if std <= 0.0:
        raise ValueError(f"latents have zero variance over {n} images from {urls}")
    log.info("latent stats over %d images: mean %.4f std %.4f", n, mean, std)
    return mean, std, n
