"""Writing one unit's latent shards and its commit record, on the worker that encoded it.

A unit's shards (one per latent shape: aspect-ratio buckets) are each written atomically
(temporary name + rename locally, one PUT on object stores); its commit record
``_encode/commits/uNNNNNN.json`` is written after them, last. A unit is done exactly when its
record exists, so a job killed anywhere redoes the unit, byte for byte, on the next run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.tario import build_tar
from pipeline.latents.format import (
    commit_url,
    join_url,
    lookup_codebook,
    sha256_bytes,
    shard_name,
    write_bytes_atomic,
    write_json_atomic,
)
from pipeline.latents.stats import ChannelStats, CodeUsage


@dataclass(frozen=True)
class ShardLayout:
    """Where and how a unit's shards are written."""

    output: str
    prefix: str
    buckets: bool  # one shard per (unit, bucket), named with the bucket's size
    channels: int  # of the statistics (VQ: of the codebook lookup)
    factor: int  # encoder downsampling: latent shape from image size
    latent_channels: int
    vq: bool


@dataclass
class FinishedSample:
    key: str
    shape: tuple[int, int]  # the image size the encoder saw (height, width)
    files: dict[str, bytes]
    values: np.ndarray  # stored values (float32) or VQ indices, for statistics


def latent_shape(layout: ShardLayout, shape: tuple[int, int]) -> list[int]:
    spatial = [shape[0] // layout.factor, shape[1] // layout.factor]
    return spatial if layout.vq else [layout.latent_channels, *spatial]


def unit_statistics(layout: ShardLayout, codebook, groups) -> tuple[ChannelStats, CodeUsage | None]:
    """Statistics of a unit's stored values, folded one shape group at a time in sorted order
    (the same order on every run, so the float64 sums are byte-identical)."""
    stats = ChannelStats(layout.channels)
    codes = CodeUsage(len(codebook)) if codebook is not None else None
    for _shape, samples in groups:
        stored = np.stack([s.values for s in samples])
        if codes is None:
            stats.update(stored)
        else:
            codes.update(stored)
            stats.update(lookup_codebook(stored, codebook))
    return stats, codes


def group_by_shape(samples: list[FinishedSample]) -> list[tuple[tuple[int, int], list]]:
    groups: dict[tuple[int, int], list[FinishedSample]] = {}
    for sample in samples:
        groups.setdefault(sample.shape, []).append(sample)
    return sorted(groups.items())


def write_shards(layout: ShardLayout, unit: int, source: str, groups) -> list[dict[str, Any]]:
    """One shard per shape group, each written atomically; their entries for the record."""
    entries = []
    for shape, samples in groups:
        bucket = [int(shape[0]), int(shape[1])] if layout.buckets else None
        name = shard_name(layout.prefix, unit, tuple(bucket) if bucket else None)
        data = build_tar([(s.key, s.files) for s in samples])
        write_bytes_atomic(join_url(layout.output, name), data)
        entries.append(
            {
                "name": name,
                "samples": len(samples),
                "bytes": len(data),
                "sha256": sha256_bytes(data),
                "unit": unit,
                "source": source,
                "bucket": bucket,
                "latent_shape": latent_shape(layout, shape),
            }
        )
    return entries


def write_record(output: str, record: dict[str, Any]) -> None:
    """The unit's commit record: written last, it makes the unit done."""
    write_json_atomic(commit_url(output, int(record["unit"])), record)
