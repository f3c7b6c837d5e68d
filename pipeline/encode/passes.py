"""Passes of the encode job over its pending units through Ray Data, watched by the driver.

One pass: the pending units -> ``map_batches(UnitEncoder)`` on an actor pool -> one small
result row per unit. The driver counts them, logs progress with the cluster's capacity, stops
an encoder that overflows the storage dtype, and runs a stall watchdog. A failure of the
cluster ends a pass; the units still uncommitted (storage says which) run in the next one.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import posixpath
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.encode.actor import UnitEncoder
from pipeline.encode.cluster import actor_capacity, capacity_line
from pipeline.encode.config import EncodeConfig
from pipeline.encode.lease import Lease
from pipeline.encode.plan import Job, encoder_spec, runtime_options, unit_settings
from pipeline.encode.progress import Progress
from pipeline.encode.session import gpu_visible
from pipeline.encode.state import committed_units
from pipeline.encode.unit import STATUS_OK, STATUS_OVERFLOW, STATUS_POISONED

log = logging.getLogger("pipeline.encode.job")


class EncodeOverflowError(RuntimeError):
    """The encoder's latents systematically exceed the storage dtype's finite range."""


class EncodeStalledError(RuntimeError):
    """No unit committed for ``stall_timeout_s``: the job stops and says what it waited for."""


class EncodeIncompleteError(RuntimeError):
    """Some units could not be committed in ``max_passes`` passes."""


class EncodeCapacityError(RuntimeError):
    """The cluster cannot hold ``min_actors`` encoder actors (and none is coming)."""


# ----------------------------------------------------------------------------- one pass


def build_dataset(job: Job, units: list[int]):
    """The lazy Ray Dataset of per-unit result rows for ``units``."""
    cfg = job.cfg
    gpus = _actor_gpus(cfg)
    capacity = wait_for_capacity(cfg, gpus)
    items = [{"unit": u, "url": job.urls[u], "run": job.run, "run_start": job.start} for u in units]
    # One unit per block: units are the grain of scheduling, retry and load balance.
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    fewest, initial, most = pool_bounds(cfg, capacity, len(units), can_grow=_on_cluster())
    ds = ds.map_batches(
        UnitEncoder,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            min_size=fewest,
            max_size=most,
            initial_size=initial,
            # One unit running, one queued: no idle gap between units, and at most two units
            # held by an actor that is lost.
            max_tasks_in_flight_per_actor=2,
        ),
        fn_constructor_kwargs={
            "spec": encoder_spec(job),
            "options": runtime_options(cfg),
            "settings": unit_settings(job),
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
        # Ray Data's own no-progress guard only backs up our watchdog (`_watch`), later: at
        # the same timeout the two raced, and when Ray Data's fired first the pass ended as a
        # cluster failure and the next pass met an empty cluster instead of the stall error
        # that says what the job waits for.
        ds.context.execution_no_progress_timeout_s = cfg.stall_timeout_s + RAY_DATA_GUARD_MARGIN_S
    return ds


RAY_DATA_GUARD_MARGIN_S = 30.0


def pool_bounds(
    cfg: EncodeConfig, capacity: int, units: int, can_grow: bool = False
) -> tuple[int, int, int]:
    """(fewest, initial, most) encoder actors for a pass over ``units`` when the cluster holds
    ``capacity`` now: num_actors (0 = capacity), never more than there are units to own.

    A cluster that ``can_grow`` (an autoscaler behind RAY_ADDRESS) starts with what fits and
    lets Ray Data's pool ask for up to num_actors; embedded Ray cannot grow, so the pool is
    capped at what fits (more would wait for ever as pending actors).
    """
    wanted = min(cfg.num_actors or capacity, units)
    fits = max(capacity, cfg.min_actors)
    most = max(1, wanted if can_grow else min(wanted, fits))
    initial = max(1, min(most, fits))
    return min(cfg.min_actors, initial), initial, most


def _on_cluster() -> bool:
    """Submitted to a Ray cluster (a job's driver), not an embedded Ray of our own."""
    return bool(os.environ.get("RAY_ADDRESS"))


def _actor_gpus(cfg: EncodeConfig) -> float:
    """One GPU per actor for device=cuda, and for device=auto when the cluster has GPUs.

    On a cluster the driver usually runs on a head without a GPU: the cluster's resources say
    whether GPU workers exist (their actors check CUDA when they open the session). Embedded
    Ray is this machine, so there a GPU must also be usable here.
    """
    if cfg.device == "cuda":
        return 1.0
    has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
    if cfg.device == "auto" and has_gpus and (_on_cluster() or gpu_visible()):
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
        if not _on_cluster() or (cfg.stall_timeout_s and waited >= cfg.stall_timeout_s):
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
