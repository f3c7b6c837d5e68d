"""Finishing an encode job: the commit records -> rejects.jsonl, shards.jsonl, inputs.jsonl,
index.json and, last, manifest.json.

Streaming: records are read one at a time in unit order (a small window prefetched by threads,
for object-store latency) and every list goes straight into its file, so finalising holds a
bounded window of records whatever the corpus size; the manifest itself is a summary. Built
from the commit records alone, never from one run's memory, so a corpus finished after several
interrupted runs has the same files, timings aside, as one made in a single run; statistics
are merged in unit order for the same reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec

from pipeline.config import save_resolved_config
from pipeline.contracts.layout import INPUTS_FILE, MANIFEST_FILE, MANIFEST_VERSION, SHARDS_FILE
from pipeline.contracts.manifest import Manifest
from pipeline.latents.format import (
    CODEBOOK_FILE,
    INDICES_FIELD,
    LATENT_FIELD,
    MANIFEST_FORMAT,
    MEAN_KIND,
    REJECTS_FILE,
    SAMPLE_KIND,
    SIZES_FIELD,
    STD_FIELD,
    VQ_KIND,
    commit_url,
    is_local,
    join_url,
    read_json,
    storage_dtype,
    write_bytes_atomic,
    write_json_atomic,
)
from pipeline.latents.stats import ChannelStats, CodeUsage

PREFETCH = 16  # commit records read ahead (object stores: latency, not bandwidth, bounds this)


class AtomicStream:
    """A file written as a stream that appears all at once: temporary name + rename locally,
    a multipart upload (completed on close) on object stores. Hashes what it writes."""

    def __init__(self, url: str):
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        self.local = is_local(url)
        name = posixpath.basename(self.path)
        self.target = (
            posixpath.join(posixpath.dirname(self.path), f".{name}.tmp")
            if self.local
            else self.path
        )
        self.handle: IO[bytes] = self.fs.open(self.target, "wb")
        self.digest = hashlib.sha256()
        self.lines = 0

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.digest.update(data)

    def line(self, record: dict[str, Any]) -> None:
        self.write((json.dumps(record) + "\n").encode("utf-8"))
        self.lines += 1

    def close(self) -> str:
        self.handle.close()
        if self.local:
            self.fs.mv(self.target, self.path)
        return self.digest.hexdigest()


def iter_records(output: str, units: int) -> Iterator[dict[str, Any]]:
    """Commit records 0..units-1 in order, at most PREFETCH of them in memory."""
    with ThreadPoolExecutor(8, thread_name_prefix="records") as pool:
        window = [
            pool.submit(read_json, commit_url(output, u)) for u in range(min(PREFETCH, units))
        ]
        for unit in range(units):
            record = window.pop(0).result()
            ahead = unit + len(window) + 1
            if ahead < units:
                window.append(pool.submit(read_json, commit_url(output, ahead)))
            yield record


@dataclass
class Totals:
    """Everything the manifest sums over units (all O(1) in the corpus size)."""

    stats: ChannelStats
    codes: CodeUsage | None
    shapes: set[tuple[int, ...]] = field(default_factory=set)  # at most the number of buckets
    run_elapsed: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + int(value)


COUNTED = (
    "rows",
    "samples",
    "merged_keys",
    "replaced_fields",
    "nonfinite_rejects",
    "overflow_rejects",
    "duplicate_rejects",
    "fp16_retries",
)


def _fold(totals: Totals, record: dict[str, Any]) -> None:
    totals.stats.merge(ChannelStats.from_state(record["stats"]))
    if totals.codes is not None:
        totals.codes.merge(record["code_counts"])
    for name in COUNTED:
        totals.add(name, record.get(name, 0))
    totals.add("rejects", len(record["rejects"]))
    totals.add("empty_inputs", record["rows"] == 0)
    totals.shapes.update(tuple(s["latent_shape"]) for s in record["shards"])
    run = record.get("run", "")
    totals.run_elapsed[run] = max(totals.run_elapsed.get(run, 0.0), float(record["elapsed_s"]))


def _lineage(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "unit": record["unit"],
        "url": record["input"],
        "fingerprint": record["fingerprint"],
        "rows": record["rows"],
        "samples": record["samples"],
        "rejects": len(record["rejects"]),
        "shards": [s["name"] for s in record["shards"]],
    }


def stream_records(output: str, units: int, totals: Totals, field_name: str) -> dict[str, Any]:
    """Write the per-record lists to their files; returns their hashes and counts."""
    rejects = AtomicStream(join_url(output, REJECTS_FILE))
    shards = AtomicStream(join_url(output, SHARDS_FILE))
    inputs = AtomicStream(join_url(output, INPUTS_FILE))
    index = AtomicStream(join_url(output, "index.json"))
    index.write(b'{"shards": [')
    for record in iter_records(output, units):
        _fold(totals, record)
        for reject in record["rejects"]:
            rejects.line(reject)
        for entry in record["shards"]:
            shards.line(entry)
            brief = {k: entry[k] for k in ("name", "samples", "bytes")}
            index.write((", " if shards.lines > 1 else "").encode() + json.dumps(brief).encode())
        inputs.line(_lineage(record))
    tail = {"samples": totals.counts.get("samples", 0), "format": MANIFEST_FORMAT}
    index.write(f'], {json.dumps(tail)[1:-1]}, "latent_field": "{field_name}"}}\n'.encode())
    index.close()
    rejects.close()
    return {
        "shards_file": SHARDS_FILE,
        "shards_sha256": shards.close(),
        "shard_count": shards.lines,
        "inputs_file": INPUTS_FILE,
        "inputs_sha256": inputs.close(),
        "input_count": inputs.lines,
    }


def manifest_scale(stats: dict[str, Any], sidecar) -> dict[str, Any]:
    """scaling/shift factor for the manifest: the corpus's own, unless the encoder was exported
    with published factors (an imported model), which its diffusion model was trained with."""
    if sidecar.scaling_source == "checkpoint":
        return {
            "scaling_factor": float(sidecar.scaling_factor),
            "shift_factor": float(sidecar.shift_factor),
            "scaling_source": "checkpoint",
        }
    std = stats["std"]
    # Fall back to the sidecar's estimate when nothing was encoded (or std is degenerate).
    usable = std is not None and std > 0 and math.isfinite(std)
    return {
        "scaling_factor": 1.0 / std if usable else float(sidecar.scaling_factor),
        "shift_factor": stats["mean"] if usable else float(sidecar.shift_factor),
        "scaling_source": "corpus" if usable else "sidecar",
    }


def stats_channels(sidecar) -> int:
    """Channels of the latents statistics are taken on (VQ: of the codebook lookup)."""
    return int(sidecar.vq.code_dim) if sidecar.is_vq else int(sidecar.latent_shape[0])


def native_shape(sidecar) -> tuple[int, ...]:
    shape = tuple(int(x) for x in sidecar.latent_shape)
    return shape[1:] if sidecar.is_vq else shape


def latent_spec(storage, sidecar, shapes: list[list[int]]) -> dict[str, Any]:
    """The manifest's ``latent`` block: what each sample stores, and how to read it."""
    shape = shapes[0] if len(shapes) == 1 else None
    if not sidecar.is_vq:
        return {
            "kind": SAMPLE_KIND if storage.latent == "sample" else MEAN_KIND,
            "field": LATENT_FIELD,
            "dtype": storage.dtype,
            "storage_dtype": storage_dtype(storage.dtype),
            "channels": stats_channels(sidecar),
            "shape": shape,
            "shapes": shapes,
            "std_field": STD_FIELD if storage.store_std else None,
            "sizes_field": SIZES_FIELD,
            "sample_seed": storage.sample_seed if storage.latent == "sample" else None,
        }
    vq = sidecar.vq
    return {
        "kind": VQ_KIND,
        "field": INDICES_FIELD,
        "dtype": vq.index_dtype,
        "storage_dtype": vq.index_dtype,
        "channels": stats_channels(sidecar),
        "shape": shape,
        "shapes": shapes,
        "std_field": None,
        "sizes_field": SIZES_FIELD,
        "num_codes": int(vq.num_codes),
        "code_dim": int(vq.code_dim),
        # codebook lookup of the indices: the quantized latent [C, h, w] diffusion reads
        "lookup_shape": [int(vq.code_dim), *shape] if shape else None,
        "codebook_file": CODEBOOK_FILE,
        "codebook_sha256": vq.codebook_sha256,
    }


@dataclass
class FinalizeInputs:
    cfg: Any  # EncodeConfig
    sidecar: Any  # contracts Sidecar
    preprocess: Any  # resolved PreprocessConfig
    identity: dict[str, Any]
    units: int
    codebook: tuple[bytes, Any] | None
    run: str
    run_s: float  # this run's time so far


def finalize(job: FinalizeInputs) -> Manifest:
    """Write the corpus's lists, codebook, config and, last, manifest.json; returns it."""
    cfg, sidecar = job.cfg, job.sidecar
    codes = CodeUsage(len(job.codebook[1])) if job.codebook is not None else None
    totals = Totals(ChannelStats(stats_channels(sidecar)), codes)
    field_name = INDICES_FIELD if job.codebook is not None else LATENT_FIELD
    files = stream_records(cfg.output, job.units, totals, field_name)
    if job.codebook is not None:
        write_bytes_atomic(join_url(cfg.output, CODEBOOK_FILE), job.codebook[0])
    save_resolved_config(cfg, cfg.output, "encode-config.yaml")
    summary = totals.stats.summary()
    shapes = sorted(totals.shapes) or [native_shape(sidecar)]
    totals.run_elapsed[job.run] = max(totals.run_elapsed.get(job.run, 0.0), job.run_s)
    wall = sum(totals.run_elapsed.values())
    counts = totals.counts
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "encoder": {
            "path": cfg.encoder,
            "sha256": sidecar.onnx_sha256,
            "sidecar": sidecar.to_dict(),
        },
        "job": job.identity,
        "preprocess": dataclasses.asdict(job.preprocess),
        "storage": dataclasses.asdict(cfg.storage),
        "latent": latent_spec(cfg.storage, sidecar, [list(s) for s in shapes]),
        **manifest_scale(summary, sidecar),
        "measured_mean": summary["mean"],
        "measured_std": summary["std"],
        "channel_mean": summary["channel_mean"],
        "channel_std": summary["channel_std"],
        "values_per_channel": summary["values_per_channel"],
        **({"code_usage": codes.summary()} if codes is not None else {}),
        **files,
        "input_samples": counts.get("rows", 0),
        "empty_inputs": counts.get("empty_inputs", 0),
        "samples": counts.get("samples", 0),
        "rejects": counts.get("rejects", 0),
        "rejects_file": REJECTS_FILE,
        **{name: counts.get(name, 0) for name in COUNTED[2:]},
        "wall_time_s": round(wall, 3),
        "images_per_s": round(counts.get("rows", 0) / wall, 3) if wall > 0 else None,
        "runs": len(totals.run_elapsed),
    }
    url = join_url(cfg.output, MANIFEST_FILE)
    typed = Manifest.from_dict(manifest, url)  # what readers will accept, checked before writing
    write_json_atomic(url, typed.to_dict())  # last: the corpus is done
    return typed
