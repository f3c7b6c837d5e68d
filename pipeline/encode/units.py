"""Driver side of the encode job: turn one unit's rows into committed latent shards.

A unit is one input shard. When its trailer row arrives the driver (the only writer):
1. merges rows that share a key (a sample whose tar members are not contiguous arrives as
   several rows) and decides every key exactly once: a sample, or a reject with the reason;
2. rejects keys already written by an earlier unit (WebDataset consumers address samples by key);
3. writes one shard per latent shape (aspect-ratio bucket), each atomically, then
4. writes the unit's commit record (shards with sha256, rejects, keys, statistics). Only then is
   the unit done: a job killed anywhere before redoes the unit, byte for byte, on the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.encode.stages import unpack_extras
from pipeline.encode.stats import ChannelStats, CodeUsage
from pipeline.latents.format import (
    SIZES_FIELD,
    STD_FIELD,
    commit_url,
    encode_latent,
    encode_npy,
    join_url,
    lookup_codebook,
    sha256_bytes,
    shard_name,
    stored_values,
    write_bytes_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One encoder-stage row (see pipeline.encode.stages for the columns)."""

    seq: int
    key: str
    has_image: bool
    extras: str
    reject: str
    sizes: tuple[int, int, int, int, int, int]  # orig_h, orig_w, crop_top, crop_left, h, w
    latent: bytes
    std: bytes


@dataclass
class Sample:
    key: str
    latent: np.ndarray  # float32 [C, h, w] (KL mean) or integer [h, w] (VQ indices)
    std: np.ndarray | None
    files: dict[str, bytes]  # the input's non-image fields
    sizes: tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class LatentLayout:
    """How the encoder stage's raw latent bytes become arrays: the actors send bare buffers
    (no per-sample .npy header to write and parse) whose shape follows from the image size."""

    channels: int
    factor: int
    dtype: str  # "float32" (KL means and stds) or the VQ index dtype
    vq: bool = False

    def shape(self, height: int, width: int) -> tuple[int, ...]:
        spatial = (height // self.factor, width // self.factor)
        return spatial if self.vq else (self.channels, *spatial)

    def array(self, raw: bytes, height: int, width: int, dtype: str | None = None) -> np.ndarray:
        return np.frombuffer(raw, dtype=dtype or self.dtype).reshape(self.shape(height, width))


@dataclass
class StoragePlan:
    """How the driver turns encoder outputs into stored fields (from the config + sidecar)."""

    field: str  # latent.npy | indices.npy
    dtype: str  # stored dtype of KL latents (VQ: ignored, indices are stored as they come)
    sample: bool  # store one draw from the posterior instead of its mean
    store_std: bool
    sample_seed: int
    layout: LatentLayout
    codebook: np.ndarray | None = None  # VQ: statistics are taken on the codebook lookup


@dataclass
class UnitResult:
    samples: list[Sample] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    merged: int = 0  # keys whose members were spread over several rows


def rows_from_batch(batch: dict[str, np.ndarray]) -> list[tuple[int, bool, Row]]:
    """(unit, is_trailer, row) for each row of an encoder-stage batch."""
    names = ("orig_h", "orig_w", "crop_top", "crop_left", "height", "width")
    sizes = np.stack([np.asarray(batch[n], dtype=np.int64) for n in names], axis=1)
    out = []
    for i in range(len(batch["key"])):
        row = Row(
            seq=int(batch["seq"][i]),
            key=str(batch["key"][i]),
            has_image=bool(batch["has_image"][i]),
            extras=str(batch["extras"][i]),
            reject=str(batch["reject"][i]),
            sizes=tuple(int(x) for x in sizes[i]),  # type: ignore[arg-type]
            latent=bytes(batch["latent"][i]),
            std=bytes(batch["std"][i]),
        )
        out.append((int(batch["unit"][i]), bool(batch["end"][i]), row))
    return out


def resolve_unit(rows: list[Row], shard: str, layout: LatentLayout) -> UnitResult:
    """Decide every key of one unit exactly once (rows in ``seq`` order)."""
    result = UnitResult()
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if not row.key:  # a truncated shard's unknown sample: nothing to merge it with
            result.rejects.append(_reject(row.key, shard, row.reject or "empty key", row.seq))
            continue
        groups.setdefault(row.key, []).append(row)
    for key, group in groups.items():
        if len(group) > 1:
            result.merged += 1
        _resolve_key(key, group, shard, result, layout)
    result.rejects.sort(key=lambda r: r.pop("_seq"))
    return result


def _reject(key: str, shard: str, reason: str, seq: int) -> dict[str, Any]:
    return {"key": key or None, "shard": shard, "reason": reason, "_seq": seq}


def _resolve_key(
    key: str, group: list[Row], shard: str, result: UnitResult, layout: LatentLayout
) -> None:
    images = [row for row in group if row.has_image]
    for extra in images[1:]:
        # Two images under one key in one shard: the first wins, the later one is recorded.
        result.rejects.append(_reject(key, shard, "duplicate key within the shard", extra.seq))
    parts = [row for row in group if not row.has_image] + images[:1]
    parts.sort(key=lambda row: row.seq)
    problem = next((row.reject for row in parts if row.reject), "")
    if not problem and not images:
        fields = sorted({ext for row in parts for ext in json.loads(row.extras)})
        problem = f"no image field (fields: {fields})"
    if problem:
        result.rejects.append(_reject(key, shard, problem, parts[0].seq))
        return
    files: dict[str, bytes] = {}
    for row in parts:
        for ext, data in unpack_extras(row.extras).items():
            files.setdefault(ext, data)  # first occurrence wins, like a duplicate tar member
    image = images[0]
    height, width = image.sizes[4:6]
    latent = layout.array(image.latent, height, width)
    std = layout.array(image.std, height, width, "float32") if image.std else None
    result.samples.append(Sample(key, latent, std, files, image.sizes))


def posterior_draw(mean: np.ndarray, std: np.ndarray, key: str, seed: int) -> np.ndarray:
    """mean + std * eps with eps seeded by (seed, key) alone: the same draw on every run,
    worker and batch composition."""
    words = np.frombuffer(hashlib.sha256(key.encode("utf-8")).digest()[:16], dtype=np.uint32)
    rng = np.random.default_rng([seed, *(int(w) for w in words)])
    eps = rng.standard_normal(mean.shape, dtype=np.float32)
    return (mean + std * eps).astype(np.float32)


def sizes_json(sizes: tuple[int, ...]) -> bytes:
    orig_h, orig_w, top, left, height, width = sizes
    record = {
        "original_size": [orig_h, orig_w],
        "crop_top_left": [top, left],
        "target_size": [height, width],
    }
    return json.dumps(record).encode("utf-8")


class UnitCommitter:
    """Writes units' shards and commit records; owns the job-wide key set and statistics."""

    def __init__(self, output: str, prefix: str, plan: StoragePlan, channels: int, buckets: bool):
        self.output = output
        self.prefix = prefix
        self.plan = plan
        self.channels = channels
        self.buckets = buckets
        self.keys: set[str] = set()  # every key written by an earlier unit
        self._earlier: dict[int, dict[str, Any]] = {}

    def remember(self, records: dict[int, dict[str, Any]]) -> None:
        """Units committed by an earlier run. Their keys block duplicates in *later* units only,
        exactly as in an uninterrupted run, which commits units in input order."""
        self._earlier.update(records)

    def _absorb_earlier(self, unit: int) -> None:
        for earlier in sorted(u for u in self._earlier if u < unit):
            self.keys.update(self._earlier.pop(earlier)["keys"])

    def commit(self, unit: int, source: str, rows: list[Row], extra: dict[str, Any]) -> dict:
        """Resolve, write and commit one unit; returns its commit record."""
        self._absorb_earlier(unit)
        result = resolve_unit(rows, source, self.plan.layout)
        samples = self._drop_duplicates(result, source)
        stats = ChannelStats(self.channels)
        codes = CodeUsage(len(self.plan.codebook)) if self.plan.codebook is not None else None
        by_shape: dict[tuple[int, int], list[tuple[str, dict[str, bytes]]]] = {}
        stored_by_shape: dict[tuple[int, int], list[np.ndarray]] = {}
        clashes = 0
        for sample in samples:
            files, stored, clash = self._stored_files(sample)
            clashes += clash
            by_shape.setdefault(sample.sizes[4:6], []).append((sample.key, files))
            stored_by_shape.setdefault(sample.sizes[4:6], []).append(stored)
        shards = []
        for shape, group in sorted(by_shape.items()):  # sorted: the same order on every run
            self._update_stats(stats, codes, np.stack(stored_by_shape[shape]))
            shards.append(self._write_shard(unit, source, shape, group))
        record = {
            "unit": unit,
            "input": source,
            "rows": len(rows),
            "samples": len(samples),
            "shards": shards,
            "rejects": result.rejects,
            "keys": [s.key for s in samples],
            "merged_keys": result.merged,
            "replaced_fields": clashes,
            "stats": stats.state(),
            "code_counts": codes.counts.tolist() if codes is not None else None,
            **extra,
        }
        write_json_atomic(commit_url(self.output, unit), record)  # last: the unit is done
        self.keys.update(record["keys"])
        return record

    def _drop_duplicates(self, result: UnitResult, source: str) -> list[Sample]:
        kept = []
        for sample in result.samples:
            if sample.key in self.keys:
                reason = "duplicate key (an earlier input shard already provided it)"
                result.rejects.append({"key": sample.key, "shard": source, "reason": reason})
            else:
                kept.append(sample)
        return kept

    def _stored_files(self, sample: Sample) -> tuple[dict[str, bytes], np.ndarray, int]:
        """The sample's output fields, the stored values as a reader sees them, and 1 when an
        input field had to give way to one of ours (counted in the manifest, never silent)."""
        plan = self.plan
        files = dict(sample.files)
        ours = {plan.field, SIZES_FIELD} | ({STD_FIELD} if plan.store_std else set())
        clash = int(bool(ours & files.keys()))
        if clash:
            log.warning(
                "sample %r had field(s) %s; replaced", sample.key, sorted(ours & files.keys())
            )
        if plan.codebook is not None:
            files[plan.field] = encode_npy(sample.latent)
            stored = sample.latent
        else:
            latent = sample.latent
            if plan.sample:
                latent = posterior_draw(latent, sample.std, sample.key, plan.sample_seed)
            files[plan.field] = encode_latent(latent, plan.dtype)
            stored = stored_values(latent, plan.dtype)
            if plan.store_std:
                files[STD_FIELD] = encode_latent(sample.std, plan.dtype)
        files[SIZES_FIELD] = sizes_json(sample.sizes)
        return files, stored, clash

    def _update_stats(self, stats: ChannelStats, codes: CodeUsage | None, stored) -> None:
        """Fold one shard's stored values [N, ...] into the unit's statistics."""
        if codes is None:
            stats.update(stored)
            return
        codes.update(stored)
        stats.update(lookup_codebook(stored, self.plan.codebook))

    def _write_shard(self, unit: int, source: str, shape, group) -> dict[str, Any]:
        from pipeline.data.tario import build_tar

        bucket = [int(shape[0]), int(shape[1])] if self.buckets else None
        name = shard_name(self.prefix, unit, tuple(bucket) if bucket else None)
        data = build_tar(group)
        write_bytes_atomic(join_url(self.output, name), data)
        return {
            "name": name,
            "samples": len(group),
            "bytes": len(data),
            "sha256": sha256_bytes(data),
            "unit": unit,
            "source": source,
            "bucket": bucket,
            "latent_shape": list(self.plan.layout.shape(*shape)),
        }
