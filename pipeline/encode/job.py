"""Encode an image shard corpus into latent shards: exactly once, resumable, atomic, distributed.

Pipeline (Ray Data): pending input shards ("units") -> map_batches(UnitEncoder actors, one unit
per call) -> per-unit result rows to the driver. Each actor owns its unit end to end (reads,
decodes, encodes, writes the shards and the commit record; pipeline.encode.unit), so latent
bytes never pass through the driver, whose work is per unit, not per image. Units finish in any
order; everything a unit writes depends on its input alone, so the output is byte-identical
whatever the order, batch size, actor or node count.

After the passes (a unit whose task died with a node runs again in the next pass), cross-shard
duplicate keys are resolved (pipeline.encode.dedup) and the corpus is finalised from the commit
records (pipeline.encode.finalize): ``manifest.json``, written last, marks it finished.

A re-run of the same command resumes: committed units whose input is unchanged (fingerprint)
and whose shards are present are skipped; a changed input shard is encoded again, also in a
finished corpus. A lease (pipeline.encode.lease) keeps a second job off the same output.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import posixpath
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import ray

from pipeline.contracts.layout import INPUTS_FILE, MANIFEST_FILE
from pipeline.contracts.manifest import Manifest
from pipeline.contracts.sidecar import Sidecar, load_sidecar
from pipeline.data.fingerprint import describe_change, input_fingerprints
from pipeline.data.urls import absolute_spec, expand_shard_urls
from pipeline.encode.actor import EncoderSpec, RuntimeOptions, UnitEncoder
from pipeline.encode.cluster import actor_capacity, capacity_line
from pipeline.encode.config import EncodeConfig, StorageConfig, decode_threads, validate_config
from pipeline.encode.dedup import RewriteSpec, resolve_duplicates
from pipeline.encode.finalize import (
    FinalizeInputs,
    finalize,
    latent_spec,
    stats_channels,
)
from pipeline.encode.identity import EncodeConflictError, claim_output, job_identity
from pipeline.encode.lease import Lease, LeaseOwner
from pipeline.encode.preprocess import resolve_preprocess
from pipeline.encode.progress import Progress
from pipeline.encode.session import gpu_visible
from pipeline.encode.store import StoragePlan
from pipeline.encode.unit import (
    ATTEMPTS_DIR,
    STATUS_OK,
    STATUS_OVERFLOW,
    STATUS_POISONED,
    UnitSettings,
)
from pipeline.encode.writer import ShardLayout
from pipeline.latents.format import (
    INDICES_FIELD,
    LATENT_FIELD,
    commit_url,
    commits_url,
    join_url,
    parse_codebook,
    read_hashed,
    read_json,
)
from pipeline.raysetup import init_ray

__all__ = [
    "EncodeConfig",
    "EncodeCapacityError",
    "EncodeConflictError",
    "EncodeIncompleteError",
    "EncodeOverflowError",
    "EncodeStalledError",
    "StorageConfig",
    "encode_corpus",
]

log = logging.getLogger(__name__)


class EncodeOverflowError(RuntimeError):
    """The encoder's latents systematically exceed the storage dtype's finite range."""


class EncodeStalledError(RuntimeError):
    """No unit committed for ``stall_timeout_s``: the job stops and says what it waited for."""


class EncodeIncompleteError(RuntimeError):
    """Some units could not be committed in ``max_passes`` passes."""


class EncodeCapacityError(RuntimeError):
    """The cluster cannot hold ``min_actors`` encoder actors (and none is coming)."""


# ----------------------------------------------------------------------------- set-up


@dataclass
class Job:
    """Everything fixed for the whole run (built once on the driver)."""

    cfg: EncodeConfig
    sidecar: Sidecar
    preprocess: Any
    codebook: tuple[bytes, Any] | None
    urls: list[str]
    identity: dict[str, Any]
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    start: float = field(default_factory=time.time)


def _load_codebook(cfg: EncodeConfig, sidecar: Sidecar) -> tuple[bytes, Any] | None:
    """(raw bytes, float32 array) of a VQ encoder's codebook, hash-checked; None for KL."""
    if not sidecar.is_vq:
        return None
    url = sidecar.codebook_url(cfg.encoder)
    raw = read_hashed(url, sidecar.vq.codebook_sha256)
    codebook = parse_codebook(raw, url)
    expected = (sidecar.vq.num_codes, sidecar.vq.code_dim)
    if codebook.shape != expected:
        raise ValueError(f"{url}: codebook shape {codebook.shape}, sidecar says {expected}")
    return raw, codebook


def _input_urls(spec: str) -> list[str]:
    """The input shards, each checked to exist before any work starts."""
    urls = expand_shard_urls(spec)
    if len(set(urls)) != len(urls):
        twice = next(u for i, u in enumerate(urls) if u in urls[:i])
        raise ValueError(f"encode.input lists {twice} twice; every input shard must be unique")
    return urls


def expected_total(urls: list[str]) -> int | None:
    """Sample count of ``urls`` from their directories' index.json files, or None when unknown."""
    by_dir: dict[str, set[str]] = {}
    for url in urls:
        by_dir.setdefault(posixpath.dirname(url), set()).add(posixpath.basename(url))
    total = 0
    for directory, names in by_dir.items():
        try:
            index = read_json(join_url(directory, "index.json"))
            counts = {s["name"]: int(s["samples"]) for s in index["shards"]}
            total += sum(counts[name] for name in names)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # progress then shows done/? instead of a guess
    return total


def _check_shared(urls: list[str], output: str) -> None:
    """Inputs and output must be storage every Ray worker sees: workers read and write them."""
    for url in (output, *urls[:1]):
        fs, _ = fsspec.core.url_to_fs(url)
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if "memory" in protocols:
            raise ValueError(
                f"{url}: memory:// is private to one process, but the encode job's Ray workers "
                "read the input shards and write the latent shards themselves; use a local path "
                "every worker can see, or an object store (s3://, gs://)"
            )


def _prepare(cfg: EncodeConfig) -> Job:
    # Paths go to Ray workers, whose working directory is not ours.
    cfg = dataclasses.replace(
        cfg,
        input=absolute_spec(cfg.input),
        encoder=absolute_spec(cfg.encoder),
        output=absolute_spec(cfg.output),
    )
    validate_config(cfg)
    sidecar = load_sidecar(cfg.encoder)
    preprocess = resolve_preprocess(
        cfg.preprocess,
        sidecar.input.resolution,
        sidecar.downsample_factor,
        sidecar.dynamic_spatial,
    )
    codebook = _load_codebook(cfg, sidecar)
    urls = _input_urls(cfg.input)
    _check_shared(urls, cfg.output)
    identity = job_identity(cfg, sidecar, preprocess, urls)
    return Job(cfg, sidecar, preprocess, codebook, urls, identity)


def _layout(job: Job) -> ShardLayout:
    return ShardLayout(
        output=job.cfg.output,
        prefix=job.cfg.prefix,
        buckets=job.preprocess.mode == "buckets",
        channels=stats_channels(job.sidecar),
        factor=job.sidecar.downsample_factor,
        latent_channels=int(job.sidecar.latent_shape[0]),
        vq=job.sidecar.is_vq,
    )


def _unit_settings(job: Job) -> UnitSettings:
    cfg, vq = job.cfg, job.sidecar.is_vq
    storage = StoragePlan(
        field=INDICES_FIELD if vq else LATENT_FIELD,
        dtype=cfg.storage.dtype,
        sample=cfg.storage.latent == "sample" and not vq,
        store_std=cfg.storage.store_std and not vq,
        sample_seed=cfg.storage.sample_seed,
        vq=vq,
    )
    return UnitSettings(
        layout=_layout(job),
        storage=storage,
        preprocess=job.preprocess,
        batch_size=cfg.batch_size,
        overflow_stop_fraction=cfg.overflow_stop_fraction,
        overflow_min_samples=cfg.overflow_min_samples,
    )


def _encoder_spec(job: Job) -> EncoderSpec:
    sidecar = job.sidecar
    norm = sidecar.input.normalization
    return EncoderSpec(
        path=job.cfg.encoder,
        onnx_sha256=sidecar.onnx_sha256,
        input_name=sidecar.input.name,
        scale=float(norm["scale"]),
        offset=float(norm["offset"]),
        vq=sidecar.is_vq,
        num_codes=sidecar.vq.num_codes if sidecar.is_vq else 0,
        index_dtype=sidecar.vq.index_dtype if sidecar.is_vq else "int64",
        channels=int(sidecar.latent_shape[0]),
        factor=sidecar.downsample_factor,
    )


def _runtime_options(cfg: EncodeConfig) -> RuntimeOptions:
    return RuntimeOptions(
        device=cfg.device,
        threads=cfg.threads_per_actor,
        fp16=cfg.fp16_model,
        io_binding=cfg.io_binding,
        need_std=cfg.storage.store_std or cfg.storage.latent == "sample",
        decode_threads=decode_threads(cfg),
    )


# ----------------------------------------------------------------------------- what is done


@dataclass
class Committed:
    """Units already committed (valid: same input, same fingerprint, shards present)."""

    units: set[int] = field(default_factory=set)
    images: int = 0
    rejects: int = 0
    samples: int = 0
    deduplicated: set[int] = field(default_factory=set)  # units that lost keys to dedup
    changed: list[str] = field(default_factory=list)  # input shards changed since their commit


def _listing(url: str) -> dict[str, int]:
    """name -> size of the files directly in ``url`` (one listing; empty if it does not exist)."""
    fs, path = fsspec.core.url_to_fs(url)
    # Object-store clients cache listings (sizes, ETags), but workers write here while we run:
    # a stale cached ETag would make a later read of a rewritten object fail its precondition.
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    finally:
        fs.invalidate_cache(path)
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries}


def committed_units(output: str) -> set[int]:
    """Units with a commit record (one listing of the commits directory)."""
    names = _listing(commits_url(output))
    return {int(n[1:7]) for n in names if n.startswith("u") and n.endswith(".json")}


def _iter_records(output: str, units: list[int]) -> Iterator[dict[str, Any]]:
    with ThreadPoolExecutor(8, thread_name_prefix="records") as pool:
        for start in range(0, len(units), 64):  # a bounded window of records in memory
            yield from pool.map(
                lambda u: read_json(commit_url(output, u)), units[start : start + 64]
            )


def _discard(output: str, unit: int) -> None:
    fs, path = fsspec.core.url_to_fs(commit_url(output, unit))
    fs.rm(path)


def scan_committed(job: Job, fingerprints: dict[str, dict]) -> Committed:
    """Check every commit record against the input and the output; discard stale ones."""
    output = job.cfg.output
    found = Committed()
    shards = _listing(output)
    units = sorted(u for u in committed_units(output) if u < len(job.urls))
    for record in _iter_records(output, units):
        unit, url = int(record["unit"]), job.urls[int(record["unit"])]
        if record.get("input") != url:
            continue  # an input list of another job cannot get here (identity); be safe
        if record.get("fingerprint") != fingerprints[url]:
            change = describe_change(record.get("fingerprint") or {}, fingerprints[url])
            log.warning(
                "input shard %s changed since it was encoded (%s); encoding it again", url, change
            )
            found.changed.append(url)
            _discard(output, unit)
            continue
        if any(shards.get(s["name"]) != s["bytes"] for s in record["shards"]):
            log.warning("unit %d: a committed shard is missing or resized; encoding it again", unit)
            _discard(output, unit)
            continue
        found.units.add(unit)
        found.images += int(record["rows"])
        found.samples += int(record["samples"])
        found.rejects += len(record["rejects"])
        if record.get("dedup_removed"):
            found.deduplicated.add(unit)
    return found


def _finished_manifest(job: Job, fingerprints: dict[str, dict]) -> Manifest | None:
    """The manifest of a finished corpus whose inputs are all unchanged, else None (a finished
    corpus with a changed input shard is reopened: that shard is encoded again)."""
    url = join_url(job.cfg.output, MANIFEST_FILE)
    try:
        manifest = Manifest.from_dict(read_json(url), url)
    except FileNotFoundError:
        return None
    fs, path = fsspec.core.url_to_fs(join_url(job.cfg.output, INPUTS_FILE))
    changed = []
    with fs.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            lineage = json.loads(line)
            if lineage["fingerprint"] != fingerprints.get(lineage["url"]):
                changed.append(lineage["url"])
    if not changed:
        return manifest
    log.warning(
        "%d input shard(s) changed since the corpus was finished (e.g. %s): reopening it",
        len(changed),
        changed[0],
    )
    fs.rm(fsspec.core.url_to_fs(url)[1])
    return None


# ----------------------------------------------------------------------------- one pass


def build_dataset(job: Job, units: list[int]):
    """The lazy Ray Dataset of per-unit result rows for ``units``."""
    cfg = job.cfg
    gpus = _actor_gpus(cfg)
    capacity = wait_for_capacity(cfg, gpus)
    items = [{"unit": u, "url": job.urls[u], "run": job.run, "run_start": job.start} for u in units]
    # One unit per block: units are the grain of scheduling, retry and load balance.
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    most = min(cfg.num_actors, max(capacity, cfg.min_actors))
    ds = ds.map_batches(
        UnitEncoder,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            min_size=min(cfg.min_actors, most),
            max_size=most,
            initial_size=most,
            # One unit running, one queued: no idle gap between units, and at most two units
            # held by an actor that is lost.
            max_tasks_in_flight_per_actor=2,
        ),
        fn_constructor_kwargs={
            "spec": _encoder_spec(job),
            "options": _runtime_options(cfg),
            "settings": _unit_settings(job),
            "codebook": None if job.codebook is None else job.codebook[1],
        },
        num_cpus=cfg.actor_cpus,
        num_gpus=gpus,
    )
    # Ray Data's defaults for actors are what a lost node needs: the actor is restarted
    # (elsewhere, or on a replacement node) and its units are retried there, while the other
    # actors go on; units run twice at worst, and every write of a unit is idempotent.
    ds.context.enable_progress_bars = False  # our own progress lines replace Ray's bars
    ds.context.execution_options.preserve_order = False  # no head-of-line blocking
    if cfg.stall_timeout_s:
        ds.context.execution_no_progress_timeout_s = cfg.stall_timeout_s
    return ds


def _actor_gpus(cfg: EncodeConfig) -> float:
    if cfg.device == "cuda":
        return 1.0
    if cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1 and gpu_visible():
        return 1.0
    return 0.0


def wait_for_capacity(cfg: EncodeConfig, gpus: float) -> int:
    """How many encoder actors the cluster holds, once it holds at least ``min_actors``.

    Embedded Ray (no RAY_ADDRESS) cannot grow: too little there fails at once. On a cluster an
    autoscaler may be adding nodes, so the job waits, saying for what, up to stall_timeout_s.
    """
    start = last_warn = time.monotonic()
    while True:
        capacity = actor_capacity(ray.cluster_resources(), cfg.actor_cpus, gpus)
        if capacity >= cfg.min_actors:
            return capacity
        waited = time.monotonic() - start
        on_cluster = bool(os.environ.get("RAY_ADDRESS"))
        if not on_cluster or (cfg.stall_timeout_s and waited >= cfg.stall_timeout_s):
            raise EncodeCapacityError(_no_capacity(cfg, gpus, capacity))
        if time.monotonic() - last_warn >= cfg.stall_warn_s:
            last_warn = time.monotonic()
            log.warning(
                "waiting %.0f s for capacity: %s", waited, _no_capacity(cfg, gpus, capacity)
            )
        time.sleep(1.0)


def _no_capacity(cfg: EncodeConfig, gpus: float, capacity: int) -> str:
    have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    need = f"{cfg.actor_cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    return (
        f"the encode job needs at least encode.min_actors={cfg.min_actors} encoder actor(s) of "
        f"{need} each, but the Ray cluster holds {capacity} (resources {have}); add nodes, or "
        "lower encode.min_actors / encode.actor_cpus"
    )


class ResultStream:
    """Iterates the dataset in a thread, so the driver can watch the clock while it waits."""

    DONE = object()

    def __init__(self, ds) -> None:
        self.items: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(ds,), daemon=True)
        self.thread.start()

    def _pump(self, ds) -> None:
        try:
            for row in ds.iter_rows():
                self.items.put(row)
        except BaseException as e:  # noqa: BLE001 - handed to the driver thread
            self.items.put(e)
        self.items.put(self.DONE)

    def get(self, timeout: float):
        try:
            return self.items.get(timeout=timeout)
        except queue.Empty:
            return None


@dataclass
class PassState:
    pending: set[int]
    errors: dict[int, str] = field(default_factory=dict)
    poisoned: dict[int, str] = field(default_factory=dict)  # crashed their worker repeatedly
    encoded: int = 0  # images that reached storage this run, and how many overflowed
    overflow: int = 0
    last_warn: float = 0.0


def _check_overflow(cfg: EncodeConfig, state: PassState) -> None:
    if state.overflow >= cfg.overflow_min_samples and state.overflow >= (
        cfg.overflow_stop_fraction * state.encoded
    ):
        raise EncodeOverflowError(
            f"{state.overflow} of {state.encoded} encoded images exceed the finite range of "
            f"storage.dtype={cfg.storage.dtype}; the encoder overflows it systematically. Re-run "
            "with a wider storage.dtype (bfloat16 or float32) into a new output directory"
        )


def _handle(row: dict[str, Any], job: Job, state: PassState, progress: Progress) -> None:
    info = json.loads(row["info"])
    unit = int(row["unit"])
    if row["status"] == STATUS_OK:
        state.pending.discard(unit)
        state.errors.pop(unit, None)
        state.encoded += info["encoded"]
        state.overflow += info["overflow"]
        progress.unit_committed(info["rows"], info["rejects"])
        _check_overflow(job.cfg, state)
    elif row["status"] == STATUS_OVERFLOW:
        raise EncodeOverflowError(f"input shard {job.urls[unit]}: {info['message']}")
    elif row["status"] == STATUS_POISONED:
        state.pending.discard(unit)
        state.poisoned[unit] = info["message"]
        log.error("input shard %s is skipped: %s", job.urls[unit], info["message"])
    else:
        state.errors[unit] = info.get("message", "unknown error")
        log.warning(
            "input shard %s failed on %s: %s",
            job.urls[unit],
            info.get("worker"),
            info.get("message"),
        )


def _watch(job: Job, state: PassState, progress: Progress) -> None:
    """The stall watchdog: say what the job waits for, and give up after stall_timeout_s."""
    cfg = job.cfg
    quiet = time.monotonic() - progress.last_commit
    if quiet >= cfg.stall_warn_s and time.monotonic() - state.last_warn >= cfg.stall_warn_s:
        state.last_warn = time.monotonic()
        log.warning("no input shard committed for %.0f s: %s", quiet, _waiting_for(job, state))
    if cfg.stall_timeout_s and quiet >= cfg.stall_timeout_s:
        raise EncodeStalledError(
            f"no input shard committed for {quiet:.0f} s (encode.stall_timeout_s="
            f"{cfg.stall_timeout_s:g}): {_waiting_for(job, state)}. Committed work is kept: "
            "re-run the same command once the cluster has capacity"
        )


def _waiting_for(job: Job, state: PassState) -> str:
    pending = sorted(state.pending)
    named = ", ".join(posixpath.basename(job.urls[u]) for u in pending[:3])
    resources = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    return (
        f"waiting for {len(pending)} input shard(s) ({named}{', ...' if len(pending) > 3 else ''}); "
        f"{capacity_line()}; free resources {resources}"
    )


SYSTEM_ERRORS = ("RayActorError", "RaySystemError", "ExecutionTimeoutError", "ObjectLostError")


def _is_system_error(error: BaseException) -> bool:
    """A failure of the cluster (lost actor, node or object; no progress), not of our code."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & set(SYSTEM_ERRORS))


def run_pass(job: Job, units: list[int], progress: Progress, lease: Lease) -> PassState:
    """Encode ``units`` once through Ray Data; returns what is still pending afterwards.

    A failure of the cluster ends the pass (logged); the caller runs what is left again.
    """
    state = PassState(pending=set(units))
    stream = ResultStream(build_dataset(job, units))
    while True:
        item = stream.get(timeout=1.0)
        if item is ResultStream.DONE:
            break
        if isinstance(item, BaseException):
            if not _is_system_error(item):
                raise item
            log.warning("the pass was interrupted by the cluster: %s", str(item).splitlines()[0])
            break
        if item is not None:
            _handle(item, job, state, progress)
        progress.maybe_log(capacity_line)
        _watch(job, state, progress)
        lease.check()
    del stream
    gc.collect()  # drop the pass's actor handles now, so the next pass gets their resources
    return state


def run_passes(job: Job, pending: list[int], progress: Progress, lease: Lease) -> None:
    """Passes over the pending units until all are committed (bounded by max_passes)."""
    poisoned: dict[int, str] = {}
    errors: dict[int, str] = {}
    for attempt in range(1, job.cfg.max_passes + 1):
        state = run_pass(job, pending, progress, lease)
        poisoned.update(state.poisoned)
        errors.update(state.errors)
        done = committed_units(job.cfg.output)  # storage is the truth, not the result rows
        pending = [u for u in pending if u not in done and u not in poisoned]
        if not pending:
            break
        log.warning(
            "pass %d left %d input shard(s) uncommitted (%s)%s",
            attempt,
            len(pending),
            posixpath.basename(job.urls[pending[0]]),
            "; running them again" if attempt < job.cfg.max_passes else "",
        )
    failed = {u: errors.get(u, "its worker was lost") for u in pending} | poisoned
    if failed:
        named = "; ".join(f"{job.urls[u]}: {failed[u]}" for u in sorted(failed)[:3])
        raise EncodeIncompleteError(
            f"{len(failed)} input shard(s) could not be encoded ({named}). Committed work is "
            "kept: re-run the same command to retry them"
        )


# ----------------------------------------------------------------------------- entry point


def _rewrite_spec(job: Job) -> RewriteSpec:
    latent = latent_spec(job.cfg.storage, job.sidecar, [])
    return RewriteSpec(
        layout=_layout(job),
        latent_kind=latent["kind"],
        field=latent["field"],
        dtype=latent["dtype"],
        codebook=None if job.codebook is None else job.codebook[1],
    )


def encode_corpus(cfg: EncodeConfig) -> Manifest:
    """Encode ``cfg.input`` into latent shards under ``cfg.output``; returns the manifest.

    Re-running after an interruption does only the missing units; re-running a finished job
    does nothing unless an input shard changed. A different encoder/preprocessing/storage/input
    list for the same output is refused (EncodeConflictError), and so is a second job while one
    holds the output's lease (LeaseHeldError).
    """
    job = _prepare(cfg)
    with Lease.acquire(job.cfg.output, LeaseOwner.current(job.run), job.cfg.lease_ttl_s) as lease:
        resumed = claim_output(job.cfg.output, job.cfg.prefix, job.identity)
        fingerprints = input_fingerprints(job.urls)
        finished = _finished_manifest(job, fingerprints) if resumed else None
        if finished is not None:
            log.info(
                "%s is already complete (%d latents); nothing to do",
                job.cfg.output,
                finished.samples,
            )
            return finished
        return _encode_and_finalize(job, fingerprints, lease)


def _encode_and_finalize(job: Job, fingerprints: dict[str, dict], lease: Lease) -> Manifest:
    cfg = job.cfg
    done = scan_committed(job, fingerprints)
    if done.changed:  # a key that moved may free one that dedup took from a later unit
        for unit in sorted(done.deduplicated):
            _discard(cfg.output, unit)
        done.units -= done.deduplicated
    pending = [u for u in range(len(job.urls)) if u not in done.units]
    _clear_attempts(cfg.output)  # every run gives every unit its full number of tries
    progress = Progress(expected_total(job.urls), len(job.urls), cfg.progress_every_s)
    progress.resumed(done.images, len(done.units), done.rejects)
    init_ray()
    if pending:
        if done.units:
            log.info(
                "resuming: %d of %d input shards already committed", len(done.units), len(job.urls)
            )
        log.info(
            "encoding %d input shard(s) from %s with up to %d actor(s)",
            len(pending),
            cfg.input,
            cfg.num_actors,
        )
        run_passes(job, pending, progress, lease)
        _clear_attempts(cfg.output)
        progress.log(capacity_line())
    total_keys = progress.done  # an upper bound on the keys stored: sizes the dedup partitions
    resolve_duplicates(_units_with_samples(job), total_keys, _rewrite_spec(job))
    lease.check()
    manifest = finalize(
        FinalizeInputs(
            cfg=cfg,
            sidecar=job.sidecar,
            preprocess=job.preprocess,
            identity=job.identity,
            units=len(job.urls),
            codebook=job.codebook,
            run=job.run,
            run_s=time.time() - job.start,
        )
    )
    log.info(
        "wrote %d latents in %d shard(s) to %s (%d rejected, %.1f img/s)",
        manifest.samples,
        manifest.shard_count,
        cfg.output,
        manifest.rejects,
        manifest.images_per_s or 0.0,
    )
    return manifest


def _clear_attempts(output: str) -> None:
    fs, path = fsspec.core.url_to_fs(join_url(output, ATTEMPTS_DIR))
    names = _listing(join_url(output, ATTEMPTS_DIR))
    for name in sorted(names):
        fs.rm(f"{path}/{name}")


def _units_with_samples(job: Job) -> list[int]:
    """Units whose shards hold samples: only they can hold a duplicate key."""
    shards = _listing(job.cfg.output)
    prefix = f"{job.cfg.prefix}-"
    return sorted(
        {
            int(n[len(prefix) : len(prefix) + 6])
            for n in shards
            if n.startswith(prefix) and n.endswith(".tar")
        }
    )
