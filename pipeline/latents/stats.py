"""Streaming per-channel latent statistics for the diffusion ``scaling_factor`` / ``shift_factor``
(and, for VQ corpora, the code histogram behind usage and perplexity).

Batches are merged with Chan et al.'s parallel update of (count, mean, M2) in float64, which stays
accurate over hundreds of millions of values where a naive sum/sum-of-squares would cancel.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ChannelStats:
    """Running mean/variance per channel of latents shaped ``[N, C, ...]``."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.count = 0  # values per channel (same for every channel)
        self.mean = np.zeros(channels, dtype=np.float64)
        self.m2 = np.zeros(channels, dtype=np.float64)

    def update(self, latents: np.ndarray) -> None:
        """Fold a batch ``[N, C, ...]`` into the running statistics."""
        if latents.shape[0] == 0:
            return
        if latents.ndim < 2 or latents.shape[1] != self.channels:
            raise ValueError(f"expected latents [N, {self.channels}, ...], got {latents.shape}")
        per_channel = np.moveaxis(latents, 1, 0).reshape(self.channels, -1).astype(np.float64)
        n_b = per_channel.shape[1]
        mean_b = per_channel.mean(axis=1)
        m2_b = ((per_channel - mean_b[:, None]) ** 2).sum(axis=1)
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n_b / total)
        self.count = total

    def merge(self, other: ChannelStats) -> None:
        """Fold in statistics gathered elsewhere (another unit or worker); same update rule."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {other.channels}-channel stats into {self.channels}")
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / total)
        self.count = total

    def state(self) -> dict[str, Any]:
        """JSON-able exact state (Python floats round-trip float64 exactly through JSON)."""
        return {
            "count": int(self.count),
            "mean": [float(x) for x in self.mean],
            "m2": [float(x) for x in self.m2],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ChannelStats:
        stats = cls(len(state["mean"]))
        stats.count = int(state["count"])
        stats.mean = np.array(state["mean"], dtype=np.float64)
        stats.m2 = np.array(state["m2"], dtype=np.float64)
        return stats

    def summary(self) -> dict[str, Any]:
        """Per-channel and global mean/std; global std gives ``scaling_factor = 1/std``."""
        if self.count == 0:
            return {
                "channel_mean": [],
                "channel_std": [],
                "mean": None,
                "std": None,
                "values_per_channel": 0,
            }
        channel_var = self.m2 / self.count
        # Pool the channels (equal counts): total M2 = sum(M2_c) + n * sum((mean_c - mean)^2).
        global_mean = float(self.mean.mean())
        pooled_m2 = self.m2.sum() + self.count * ((self.mean - global_mean) ** 2).sum()
        global_std = float(np.sqrt(pooled_m2 / (self.count * self.channels)))
        return {
            "channel_mean": [float(x) for x in self.mean],
            "channel_std": [float(x) for x in np.sqrt(channel_var)],
            "mean": global_mean,
            "std": global_std,
            "values_per_channel": int(self.count),
        }


class CodeUsage:
    """Histogram of stored VQ code indices: how much of the codebook the corpus actually uses."""

    def __init__(self, num_codes: int) -> None:
        self.counts = np.zeros(num_codes, dtype=np.int64)

    def update(self, indices: np.ndarray) -> None:
        if indices.size:
            flat = indices.reshape(-1).astype(np.int64)
            self.counts += np.bincount(flat, minlength=len(self.counts))

    def merge(self, counts: list[int] | np.ndarray) -> None:
        self.counts += np.asarray(counts, dtype=np.int64)

    def summary(self) -> dict[str, Any]:
        """codes used, usage (fraction of codes used) and perplexity exp(H) of the index
        distribution (natural log, as the quantizer's training metric; = num_codes when uniform)."""
        total = int(self.counts.sum())
        probs = self.counts[self.counts > 0] / max(total, 1)
        used = int((self.counts > 0).sum())
        return {
            "num_codes": len(self.counts),
            "codes_used": used,
            "usage": used / len(self.counts),
            "perplexity": float(np.exp(-(probs * np.log(probs)).sum())) if total else 0.0,
            "indices": total,
        }
