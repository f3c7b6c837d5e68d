"""Encode an image shard corpus into latent shards: exactly once, resumable, atomic.

Pipeline (Ray Data, streaming): pending input shards -> flat_map(read tar: one row per group of
members + a trailer row per shard) -> map_batches(decode + resize, CPU tasks) ->
map_batches(OrtEncoder actors, one ONNX Runtime session each) -> the driver. The driver is the
only writer: when a unit's (input shard's) trailer arrives it commits the unit (see
pipeline.encode.units). A re-run of the same command skips committed units, so a killed job
resumes with only the missing work, and the output is byte-identical to an uninterrupted run;
``manifest.json``, written last from all commit records, marks the corpus finished.

VQ encoders (sidecar ``model_kind: "vq"``) store ``indices.npy``; statistics and the
scaling/shift factor are taken on their codebook lookup, and ``codebook.npy`` is copied into the
output so the corpus decodes without the encoder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from typing import Any

import fsspec

from pipeline.config import save_resolved_config
from pipeline.encode.config import EncodeConfig, StorageConfig, validate_config
from pipeline.encode.identity import EncodeConflictError, claim_output, job_identity
from pipeline.encode.stages import is_vq
from pipeline.encode.stats import ChannelStats, CodeUsage
from pipeline.encode.units import StoragePlan, UnitCommitter, rows_from_batch
from pipeline.latents.format import (
    CODEBOOK_FILE,
    INDICES_FIELD,
    LATENT_FIELD,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    MEAN_KIND,
    REJECTS_FILE,
    SAMPLE_KIND,
    SIZES_FIELD,
    STD_FIELD,
    VQ_KIND,
    join_url,
    parse_codebook,
    read_commits,
    read_hashed,
    read_json,
    storage_dtype,
    write_bytes_atomic,
    write_json_atomic,
)

__all__ = ["EncodeConfig", "EncodeConflictError", "StorageConfig", "encode_corpus"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- set-up


def _load_encoder(cfg: EncodeConfig) -> dict[str, Any]:
    from pipeline.export import load_sidecar

    return load_sidecar(cfg.encoder)


def _load_codebook(cfg: EncodeConfig, sidecar: dict[str, Any]) -> tuple[bytes, Any] | None:
    """(raw bytes, float32 array) of a VQ encoder's codebook, hash-checked; None for KL."""
    if not is_vq(sidecar):
        return None
    from pipeline.export.sidecar import codebook_url

    url = codebook_url(cfg.encoder, sidecar)
    raw = read_hashed(url, sidecar["codebook_sha256"])
    codebook = parse_codebook(raw, url)
    expected = (int(sidecar["num_codes"]), int(sidecar["code_dim"]))
    if codebook.shape != expected:
        raise ValueError(f"{url}: codebook shape {codebook.shape}, sidecar says {expected}")
    return raw, codebook


def _resolve_preprocess(cfg: EncodeConfig, sidecar: dict[str, Any]):
    from pipeline.encode.preprocess import resolve_preprocess
    from pipeline.export.sidecar import dynamic_spatial

    return resolve_preprocess(
        cfg.preprocess,
        int(sidecar["input"]["resolution"]),
        int(sidecar["downsample_factor"]),
        dynamic_spatial(sidecar),
    )


def _input_urls(spec: str) -> list[str]:
    """The input shards, each checked to exist before any work starts."""
    from pipeline.data.urls import expand_shard_urls

    urls = expand_shard_urls(spec)
    seen: set[str] = set()
    for url in urls:
        if url in seen:
            raise ValueError(f"encode.input lists {url} twice; every input shard must be unique")
        seen.add(url)
    return urls


def expected_total(urls: list[str]) -> int | None:
    """Sample count of ``urls`` from their directories' index.json files, or None when unknown."""
    import posixpath

    by_dir: dict[str, list[str]] = {}
    for url in urls:
        by_dir.setdefault(posixpath.dirname(url), []).append(posixpath.basename(url))
    total = 0
    for directory, names in by_dir.items():
        try:
            index = read_json(join_url(directory, "index.json"))
            counts = {s["name"]: int(s["samples"]) for s in index["shards"]}
            total += sum(counts[name] for name in names)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # progress then shows done/? instead of a guess
    return total


def _storage_plan(cfg: EncodeConfig, sidecar: dict[str, Any], codebook) -> StoragePlan:
    vq = is_vq(sidecar)
    return StoragePlan(
        field=INDICES_FIELD if vq else LATENT_FIELD,
        dtype=cfg.storage.dtype,
        sample=cfg.storage.latent == "sample" and not vq,
        store_std=cfg.storage.store_std and not vq,
        sample_seed=cfg.storage.sample_seed,
        codebook=None if codebook is None else codebook[1],
    )


def _channels(sidecar: dict[str, Any]) -> int:
    return int(sidecar["code_dim"]) if is_vq(sidecar) else int(sidecar["latent_shape"][0])


# ----------------------------------------------------------------------------- Ray pipeline


def _actor_resources(cfg: EncodeConfig) -> dict[str, float]:
    import ray

    from pipeline.encode.session import gpu_visible

    gpus = 0.0
    if cfg.device == "cuda" or (
        cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1 and gpu_visible()
    ):
        gpus = 1.0
    return {"num_cpus": float(cfg.actor_cpus), "num_gpus": gpus}


def _check_capacity(cfg: EncodeConfig, actor: dict[str, float]) -> None:
    """Fail fast instead of hanging when the actors leave no CPU for the decode tasks."""
    import ray

    resources = ray.cluster_resources()
    gpus_needed = cfg.num_actors * actor["num_gpus"]
    if gpus_needed > resources.get("GPU", 0):
        raise ValueError(
            f"encode.device={cfg.device!r} with {cfg.num_actors} actor(s) needs {gpus_needed:g} "
            f"GPU(s) but the Ray cluster has {resources.get('GPU', 0):g}; lower "
            "encode.num_actors or use encode.device=cpu"
        )
    cpus = resources.get("CPU", 0)
    need = cfg.num_actors * actor["num_cpus"] + cfg.decode_cpus
    if cpus < need:
        raise ValueError(
            f"encode needs {need:g} CPUs ({cfg.num_actors} actor(s) x {actor['num_cpus']:g} + "
            f"{cfg.decode_cpus:g} for decoding) but the Ray cluster has {cpus:g}; lower "
            "encode.num_actors, encode.actor_cpus or encode.decode_cpus"
        )


def build_dataset(cfg: EncodeConfig, units: list[tuple[int, str]], sidecar, preprocess):
    """The lazy Ray Dataset of encoder-stage rows for ``units`` ((index, url) pairs)."""
    import ray

    from pipeline.encode.stages import OrtEncoder, decode_batch, read_shard

    actor = _actor_resources(cfg)
    _check_capacity(cfg, actor)
    task_args = {
        "num_cpus": cfg.decode_cpus,
        # max_calls=0 is Ray's default for CPU tasks (reuse workers), spelled out because
        # differing remote args keep Ray from fusing decoding into the encoder actors, which
        # would serialise it behind the model and leave the decode CPUs idle.
        "max_calls": 0,
    }
    items = [{"unit": unit, "url": url} for unit, url in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(read_shard, **task_args)
    ds = ds.map_batches(
        decode_batch,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        fn_kwargs={"preprocess": dataclasses.asdict(preprocess)},
        **task_args,
    )
    options = {
        "device": cfg.device,
        "threads": cfg.threads_per_actor,
        "fp16": cfg.fp16_model,
        "io_binding": cfg.io_binding,
        "batch_size": cfg.batch_size,
        "need_std": cfg.storage.store_std or cfg.storage.latent == "sample",
    }
    ds = ds.map_batches(
        OrtEncoder,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        fn_constructor_kwargs={"encoder": cfg.encoder, "sidecar": sidecar, "options": options},
        **actor,
    )
    # Our own progress lines replace Ray's bars. Units arrive whole and in input order, so the
    # driver commits them in order and cross-shard duplicates resolve the same on every run.
    ds.context.enable_progress_bars = False
    ds.context.execution_options.preserve_order = True
    return ds


class Progress:
    """images done / total, images/s, ETA and rejects so far, at most every ``every_s``.

    Images count as done when their encoding reaches the driver; rejects are exact for
    committed units plus the rows of the current unit already known to be bad.
    """

    def __init__(self, total: int | None, done: int, rejects: int, every_s: float) -> None:
        self.total = total
        self.start_done = done
        self.done = done
        self.committed_rejects = rejects
        self.pending_rejects = 0  # rows of the unit in progress that carry a reason
        self.every_s = every_s
        self.start = time.monotonic()
        self.last = self.start

    def add_rows(self, rows: int, with_reason: int) -> None:
        self.done += rows
        self.pending_rejects += with_reason
        if time.monotonic() - self.last >= self.every_s:
            self.log()

    def unit_committed(self, rejects: int) -> None:
        self.committed_rejects += rejects
        self.pending_rejects = 0

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def log(self) -> None:
        self.last = time.monotonic()
        total = "?" if self.total is None else str(self.total)
        log.info(
            "encoded %d/%s images (%.1f img/s, ETA %s), %d rejected so far",
            self.done,
            total,
            self.rate(),
            self._eta(),
            self.committed_rejects + self.pending_rejects,
        )

    def _eta(self) -> str:
        rate = self.rate()
        if self.total is None or rate <= 0:
            return "?"
        seconds = int(max(self.total - self.done, 0) / rate)
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _run_units(cfg, pending, sidecar, preprocess, committer, progress, run_info) -> None:
    """Stream the pending units through Ray and commit each as its trailer arrives."""
    ds = build_dataset(cfg, pending, sidecar, preprocess)
    urls = dict(pending)
    current: int | None = None
    rows: list = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        arrived = rows_from_batch(batch)
        samples = [row for _, is_trailer, row in arrived if not is_trailer]
        progress.add_rows(len(samples), sum(1 for row in samples if row.reject))
        for unit, is_trailer, row in arrived:
            if current is not None and unit != current:
                raise RuntimeError(f"unit {current} ended without its trailer (got unit {unit})")
            current = unit
            if not is_trailer:
                rows.append(row)
                continue
            if row.seq != len(rows):  # the trailer counts the unit's rows: none lost in transit
                raise RuntimeError(f"unit {unit}: {len(rows)} rows arrived, {row.seq} were read")
            extra = {**run_info, "elapsed_s": round(time.monotonic() - progress.start, 3)}
            record = committer.commit(unit, urls[unit], rows, extra)
            progress.unit_committed(len(record["rejects"]))
            current, rows = None, []
    if current is not None:
        raise RuntimeError(f"the pipeline ended inside unit {current}")


# ----------------------------------------------------------------------------- finishing


def manifest_scale(stats: dict[str, Any], sidecar: dict[str, Any]) -> dict[str, Any]:
    """scaling/shift factor for the manifest: the corpus's own, unless the encoder was exported
    with published factors (an imported model), which its diffusion model was trained with."""
    if sidecar.get("scaling_source") == "checkpoint":
        return {
            **{k: float(sidecar[k]) for k in ("scaling_factor", "shift_factor")},
            "scaling_source": "checkpoint",
        }
    std = stats["std"]
    # Fall back to the sidecar's estimate when nothing was encoded (or std is degenerate).
    usable = std is not None and std > 0 and math.isfinite(std)
    return {
        "scaling_factor": 1.0 / std if usable else float(sidecar["scaling_factor"]),
        "shift_factor": stats["mean"] if usable else float(sidecar["shift_factor"]),
        "scaling_source": "corpus" if usable else "sidecar",
    }


def latent_spec(cfg: EncodeConfig, sidecar: dict[str, Any], shapes: list[list[int]]) -> dict:
    """The manifest's ``latent`` block: what each sample stores, and how to read it."""
    shape = shapes[0] if len(shapes) == 1 else None
    if not is_vq(sidecar):
        std_field = STD_FIELD if cfg.storage.store_std else None
        return {
            "kind": SAMPLE_KIND if cfg.storage.latent == "sample" else MEAN_KIND,
            "field": LATENT_FIELD,
            "dtype": cfg.storage.dtype,
            "storage_dtype": storage_dtype(cfg.storage.dtype),
            "channels": _channels(sidecar),
            "shape": shape,
            "shapes": shapes,
            "std_field": std_field,
            "sizes_field": SIZES_FIELD,
            "sample_seed": cfg.storage.sample_seed if cfg.storage.latent == "sample" else None,
        }
    return {
        "kind": VQ_KIND,
        "field": INDICES_FIELD,
        "dtype": sidecar["index_dtype"],
        "storage_dtype": sidecar["index_dtype"],
        "channels": _channels(sidecar),
        "shape": shape,
        "shapes": shapes,
        "std_field": None,
        "sizes_field": SIZES_FIELD,
        "num_codes": int(sidecar["num_codes"]),
        "code_dim": int(sidecar["code_dim"]),
        # codebook lookup of the indices: the quantized latent [C, h, w] diffusion reads
        "lookup_shape": [int(sidecar["code_dim"]), *shape] if shape else None,
        "codebook_file": CODEBOOK_FILE,
        "codebook_sha256": sidecar["codebook_sha256"],
    }


def _wall_time(records: list[dict[str, Any]], this_run: str, this_run_s: float) -> float:
    """Sum over runs of the time each spent until its last commit (this run: until now)."""
    per_run: dict[str, float] = {}
    for record in records:
        run = record.get("run", "")
        per_run[run] = max(per_run.get(run, 0.0), float(record.get("elapsed_s", 0.0)))
    per_run[this_run] = this_run_s
    return sum(per_run.values())


def _rejects_bytes(records: list[dict[str, Any]]) -> bytes:
    import json

    lines = [json.dumps(r) + "\n" for record in records for r in record["rejects"]]
    return "".join(lines).encode("utf-8")


def _finalize(cfg, sidecar, preprocess, identity, records, codebook, run_info, wall) -> dict:
    """Write codebook, rejects.jsonl, index.json, the config and, last, manifest.json."""
    from pipeline.data.tario import ShardInfo, write_index

    stats = ChannelStats(_channels(sidecar))
    codes = CodeUsage(len(codebook[1])) if codebook is not None else None
    for record in records:
        stats.merge(ChannelStats.from_state(record["stats"]))
        if codes is not None:
            codes.merge(record["code_counts"])
    summary = stats.summary()
    shards = [entry for record in records for entry in record["shards"]]
    shapes = sorted({tuple(s["latent_shape"]) for s in shards}) or [_native_shape(sidecar)]
    if codebook is not None:
        write_bytes_atomic(join_url(cfg.output, CODEBOOK_FILE), codebook[0])
    write_bytes_atomic(join_url(cfg.output, REJECTS_FILE), _rejects_bytes(records))
    infos = [ShardInfo(s["name"], s["samples"], s["bytes"]) for s in shards]
    field = INDICES_FIELD if codebook is not None else LATENT_FIELD
    write_index(cfg.output, infos, extra={"format": MANIFEST_FORMAT, "latent_field": field})
    save_resolved_config(cfg, cfg.output, "encode-config.yaml")
    rows = sum(r["rows"] for r in records)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "encoder": {"path": cfg.encoder, "sha256": sidecar["onnx_sha256"], "sidecar": sidecar},
        "job": identity,
        "preprocess": dataclasses.asdict(preprocess),
        "storage": dataclasses.asdict(cfg.storage),
        "latent": latent_spec(cfg, sidecar, [list(s) for s in shapes]),
        **manifest_scale(summary, sidecar),
        "measured_mean": summary["mean"],
        "measured_std": summary["std"],
        "channel_mean": summary["channel_mean"],
        "channel_std": summary["channel_std"],
        "values_per_channel": summary["values_per_channel"],
        **({"code_usage": codes.summary()} if codes is not None else {}),
        "shards": shards,
        "inputs": identity["inputs"],
        "input_samples": rows,
        "samples": sum(r["samples"] for r in records),
        "rejects": sum(len(r["rejects"]) for r in records),
        "rejects_file": REJECTS_FILE,
        "merged_keys": sum(r["merged_keys"] for r in records),
        "replaced_fields": sum(r["replaced_fields"] for r in records),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(rows / wall, 3) if wall > 0 else None,
        "runs": len({r.get("run", "") for r in records} | {run_info["run"]}),
    }
    write_json_atomic(join_url(cfg.output, MANIFEST_FILE), manifest)  # last: the corpus is done
    return manifest


def _native_shape(sidecar: dict[str, Any]) -> tuple[int, ...]:
    shape = tuple(int(x) for x in sidecar["latent_shape"])
    return shape[1:] if is_vq(sidecar) else shape


def _finished_manifest(output: str) -> dict[str, Any] | None:
    try:
        return read_json(join_url(output, MANIFEST_FILE))
    except FileNotFoundError:
        return None


def _committed(output: str, n_units: int, urls: list[str]) -> dict[int, dict[str, Any]]:
    """Commit records whose shards are all still there with their recorded sizes."""
    records = {}
    for unit, record in read_commits(output).items():
        if unit >= n_units or record.get("input") != urls[unit]:
            continue
        if all(_present(output, s) for s in record["shards"]):
            records[unit] = record
        else:
            log.warning("unit %d: a committed shard is missing or resized; encoding it again", unit)
    return records


def _present(output: str, entry: dict[str, Any]) -> bool:
    fs, path = fsspec.core.url_to_fs(join_url(output, entry["name"]))
    try:
        return fs.size(path) == entry["bytes"]
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------- entry point


def encode_corpus(cfg: EncodeConfig) -> dict[str, Any]:
    """Encode ``cfg.input`` into latent shards under ``cfg.output``; returns the manifest.

    Re-running after an interruption does only the missing units; re-running a finished job
    does nothing. A different encoder/preprocessing/storage/input list for the same output is
    refused (EncodeConflictError).
    """
    from pipeline.data.urls import absolute_spec

    # Paths go to Ray workers, whose working directory is not ours.
    cfg = dataclasses.replace(
        cfg,
        input=absolute_spec(cfg.input),
        encoder=absolute_spec(cfg.encoder),
        output=absolute_spec(cfg.output),
    )
    validate_config(cfg)
    sidecar = _load_encoder(cfg)
    preprocess = _resolve_preprocess(cfg, sidecar)
    codebook = _load_codebook(cfg, sidecar)
    urls = _input_urls(cfg.input)
    identity = job_identity(cfg, sidecar, preprocess, urls)
    resumed = claim_output(cfg.output, cfg.prefix, identity)
    finished = _finished_manifest(cfg.output) if resumed else None
    if finished is not None:
        log.info(
            "%s is already complete (%d latents); nothing to do", cfg.output, finished["samples"]
        )
        return finished
    records = _committed(cfg.output, len(urls), urls)
    pending = [(u, url) for u, url in enumerate(urls) if u not in records]
    run_info = {"run": uuid.uuid4().hex[:12]}
    start = time.monotonic()
    if pending:
        _encode_pending(cfg, sidecar, preprocess, codebook, urls, records, pending, run_info)
        records = _committed(cfg.output, len(urls), urls)
    missing = [u for u in range(len(urls)) if u not in records]
    if missing:
        raise RuntimeError(f"units {missing[:5]} are not committed after the run; re-run to finish")
    ordered = [records[u] for u in range(len(urls))]
    wall = _wall_time(ordered, run_info["run"], time.monotonic() - start)
    manifest = _finalize(cfg, sidecar, preprocess, identity, ordered, codebook, run_info, wall)
    log.info(
        "wrote %d latents in %d shard(s) to %s (%d rejected, %.1f img/s)",
        manifest["samples"],
        len(manifest["shards"]),
        cfg.output,
        manifest["rejects"],
        manifest["images_per_s"] or 0.0,
    )
    return manifest


def _encode_pending(cfg, sidecar, preprocess, codebook, urls, records, pending, run_info) -> None:
    import ray

    channels = _channels(sidecar)
    plan = _storage_plan(cfg, sidecar, codebook)
    committer = UnitCommitter(cfg.output, cfg.prefix, plan, channels, preprocess.mode == "buckets")
    committer.remember(records)
    done = sum(r["rows"] for r in records.values())
    rejects = sum(len(r["rejects"]) for r in records.values())
    total = expected_total(urls)
    if records:
        log.info("resuming: %d of %d input shards already committed", len(records), len(urls))
    log.info(
        "encoding %d input shard(s), %s images, from %s",
        len(pending),
        "?" if total is None else total - done,
        cfg.input,
    )
    if not ray.is_initialized():
        from pipeline.raysetup import init_ray

        init_ray()
    progress = Progress(total, done, rejects, cfg.progress_every_s)
    _run_units(cfg, pending, sidecar, preprocess, committer, progress, run_info)
    progress.log()
