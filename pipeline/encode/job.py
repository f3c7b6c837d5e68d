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
import time
import uuid
from typing import Any

import fsspec

from pipeline.encode.config import EncodeConfig, StorageConfig, validate_config
from pipeline.encode.identity import EncodeConflictError, claim_output, job_identity
from pipeline.encode.manifest import channels, finalize, wall_time
from pipeline.encode.progress import Progress
from pipeline.encode.stages import is_vq
from pipeline.encode.units import LatentLayout, StoragePlan, UnitCommitter, rows_from_batch
from pipeline.latents.format import (
    INDICES_FIELD,
    LATENT_FIELD,
    MANIFEST_FILE,
    join_url,
    parse_codebook,
    read_commits,
    read_hashed,
    read_json,
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
        layout=LatentLayout(
            channels=int(sidecar["latent_shape"][0]),
            factor=int(sidecar["downsample_factor"]),
            dtype=str(sidecar["index_dtype"]) if vq else "float32",
            vq=vq,
        ),
        codebook=None if codebook is None else codebook[1],
    )


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


def _run_units(cfg, pending, sidecar, preprocess, committer, progress, run_info) -> None:
    """Stream the pending units through Ray and commit each as its trailer arrives."""
    ds = build_dataset(cfg, pending, sidecar, preprocess)
    urls = dict(pending)
    current: int | None = None
    rows: list = []
    # No prefetch: Ray would hold each block back until the next ones exist, and a unit is only
    # committed when its trailer reaches us.
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
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
    wall = wall_time(ordered, run_info["run"], time.monotonic() - start)
    manifest = finalize(cfg, sidecar, preprocess, identity, ordered, codebook, run_info, wall)
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

    plan = _storage_plan(cfg, sidecar, codebook)
    committer = UnitCommitter(
        cfg.output, cfg.prefix, plan, channels(sidecar), preprocess.mode == "buckets"
    )
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
