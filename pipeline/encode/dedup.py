"""Cross-shard duplicate keys, resolved at finalise without any process holding every key.

WebDataset consumers address samples by key, so a key that an earlier input shard (by input
order) already provided is rejected in every later one. Units are encoded independently and
finish in any order, so this is decided once all are committed, as a Ray Data job:

  units -> rows (part = crc32(key) % P, key, unit)   one task per unit reads its commit record
        -> groupby(part): keys of one hash partition, ~KEYS_PER_PARTITION at most, find the
           (key, unit) pairs whose key a smaller unit also holds
        -> groupby(unit): rewrite each affected unit's shard(s) without those keys, atomically,
           and its commit record (rejects, keys, statistics).

The outcome depends on the set of commit records alone: the same output and rejects.jsonl
whatever order units finished in. A rewrite first removes the unit's commit record, so a job
killed in the middle of one redoes that unit on the next run and resolves it again.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import ray.data
from ray.data.context import ShuffleStrategy

from pipeline.encode.writer import (
    FinishedSample,
    ShardLayout,
    group_by_shape,
    unit_statistics,
    write_record,
    write_shards,
)
from pipeline.latents.format import (
    VQ_KIND,
    commit_url,
    decode_latent,
    decode_npy,
    iter_tar_bytes,
    join_url,
    read_json,
    read_verified,
)

log = logging.getLogger("pipeline.encode.job")

KEYS_PER_PARTITION = 1_000_000  # keys one partition task holds (~100 MB)
# Commit records read per map call: few, large map outputs keep the sort shuffle's per-block
# bookkeeping on the driver small (docs/benchmarks.md: 8 per call cost ~54 KiB of driver RSS
# per unit, mostly in this pass).
UNITS_PER_KEY_BATCH = 256
DUPLICATE_REASON = "duplicate key (an earlier input shard already provided it)"


@dataclass(frozen=True)
class RewriteSpec:
    """What a rewrite task needs to re-create a unit's shards and statistics."""

    layout: ShardLayout
    latent_kind: str  # the manifest's latent.kind
    field: str
    dtype: str
    codebook: np.ndarray | None


def partitions_for(total_keys: int) -> int:
    return max(1, math.ceil(total_keys / KEYS_PER_PARTITION))


def _key_rows(batch: dict[str, np.ndarray], output: str, partitions: int) -> dict[str, np.ndarray]:
    """map_batches over units: every key of each unit's commit record, with its partition."""
    keys, units = [], []
    for unit in batch["unit"]:
        record_keys = read_json(commit_url(output, int(unit)))["keys"]
        keys.extend(record_keys)
        units.extend([int(unit)] * len(record_keys))
    parts = [zlib.crc32(k.encode("utf-8")) % partitions for k in keys]
    return {
        "part": np.asarray(parts, dtype=np.int64),
        "key": np.asarray(keys, dtype=object),
        "unit": np.asarray(units, dtype=np.int64),
    }


def later_duplicates(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """map_groups over one partition: (key, unit) for every unit but the first holding a key."""
    keys = np.asarray(group["key"]).astype(str)
    units = np.asarray(group["unit"], dtype=np.int64)
    order = np.lexsort((units, keys))
    keys, units = keys[order], units[order]
    repeated = np.zeros(len(keys), dtype=bool)
    repeated[1:] = keys[1:] == keys[:-1]  # sorted by (key, unit): the first of a key is kept
    return {
        "unit": units[repeated],
        "key": keys[repeated].astype(object),
    }


def _stored_values(files: dict[str, bytes], spec: RewriteSpec) -> np.ndarray:
    raw = files[spec.field]
    return decode_npy(raw) if spec.latent_kind == VQ_KIND else decode_latent(raw, spec.dtype)


def _surviving_samples(record: dict[str, Any], drop: set[str], spec: RewriteSpec) -> list:
    """The unit's samples (from its committed shards, hash-checked) whose key is not dropped."""
    kept = []
    for entry in record["shards"]:
        url = join_url(spec.layout.output, entry["name"])
        data = read_verified(url, entry["sha256"], entry["bytes"])
        shape = _image_shape(entry, spec.layout)
        for key, files in iter_tar_bytes(data, url):
            if key not in drop:
                kept.append(FinishedSample(key, shape, files, _stored_values(files, spec)))
    return kept


def _image_shape(entry: dict[str, Any], layout: ShardLayout) -> tuple[int, int]:
    h, w = entry["latent_shape"][-2:]
    return (int(h) * layout.factor, int(w) * layout.factor)


def rewrite_unit(group: dict[str, np.ndarray], spec: RewriteSpec) -> dict[str, np.ndarray]:
    """map_groups over one unit's duplicate keys: its shards and record without them."""
    unit = int(group["unit"][0])
    drop = {str(k) for k in group["key"]}
    output = spec.layout.output
    record = read_json(commit_url(output, unit))
    samples = _surviving_samples(record, drop, spec)
    removed = [k for k in record["keys"] if k in drop]
    _remove_record(output, unit)  # from here until the new record, the unit is uncommitted
    old_names = {entry["name"] for entry in record["shards"]}
    groups = group_by_shape(samples)
    record["shards"] = write_shards(spec.layout, unit, record["input"], groups)
    _delete_emptied(output, old_names - {entry["name"] for entry in record["shards"]})
    stats, codes = unit_statistics(spec.layout, spec.codebook, groups)
    record["stats"] = stats.state()
    record["code_counts"] = codes.counts.tolist() if codes is not None else None
    record["keys"] = [s.key for s in samples]
    record["samples"] = len(samples)
    record["rejects"] += [
        {"key": k, "shard": record["input"], "reason": DUPLICATE_REASON} for k in removed
    ]
    record["duplicate_rejects"] = int(record.get("duplicate_rejects", 0)) + len(removed)
    record["dedup_removed"] = sorted(set(record.get("dedup_removed", [])) | set(removed))
    write_record(output, record)
    return {"unit": np.array([unit], dtype=np.int64), "removed": np.array([len(removed)])}


def _remove_record(output: str, unit: int) -> None:
    fs, path = fsspec.core.url_to_fs(commit_url(output, unit))
    fs.rm(path)


def _delete_emptied(output: str, names: set[str]) -> None:
    for name in sorted(names):
        fs, path = fsspec.core.url_to_fs(join_url(output, name))
        if fs.exists(path):
            fs.rm(path)


def resolve_duplicates(units: list[int], total_keys: int, spec: RewriteSpec) -> int:
    """Reject, in every later unit, the keys an earlier unit holds; returns how many."""
    if len(units) < 2:
        return 0
    partitions = partitions_for(total_keys)
    ds = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=min(len(units), 200))
    # Sort-based shuffle: ~1 s for small corpora, where the hash shuffle's aggregator actors
    # cost ~5 s; both scale out with the partitions.
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ds.context.enable_progress_bars = False
    rows = ds.map_batches(
        _key_rows,
        batch_size=UNITS_PER_KEY_BATCH,
        batch_format="numpy",
        fn_kwargs={"output": spec.layout.output, "partitions": partitions},
    )
    dups = (
        rows.groupby("part", num_partitions=partitions)
        .map_groups(later_duplicates, batch_format="numpy")
        .materialize()
    )
    if dups.count() == 0:
        return 0
    rewritten = dups.groupby("unit", num_partitions=max(1, min(partitions, 64))).map_groups(
        rewrite_unit, batch_format="numpy", fn_kwargs={"spec": spec}
    )
    removed = sum(int(row["removed"]) for row in rewritten.iter_rows())
    log.info("rejected %d key(s) that an earlier input shard already provided", removed)
    return removed
