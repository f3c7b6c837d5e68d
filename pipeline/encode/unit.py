"""One unit (input shard) end to end, on the worker that owns it: read, resolve, decode, encode,
store, write, commit. Nothing of it but a small result row reaches the driver.

Images are decoded by a thread pool (PIL releases the GIL while decoding and resizing) one
window ahead of the encoder, so decoding overlaps ONNX Runtime and at most two windows of
pixels are in memory. Everything a unit writes depends on its input shard alone: units can
finish in any order, on any node, and the bytes are the same.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.contracts.layout import join_url, read_json
from pipeline.data.fingerprint import fingerprint_of
from pipeline.data.images import BadImageError
from pipeline.encode.preprocess import Prepared, PreprocessConfig, prepare_image
from pipeline.encode.resolve import Candidate, UnitPlan, read_rows, resolve_rows
from pipeline.encode.store import WIDER, NotStorable, StoragePlan, store_sample
from pipeline.encode.writer import (
    FinishedSample,
    ShardLayout,
    group_by_shape,
    unit_statistics,
    write_record,
    write_shards,
)
from pipeline.latents.format import write_json_atomic

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_ERROR = "error"  # the unit raised: not committed, retried in the next pass
STATUS_OVERFLOW = "overflow"  # the encoder systematically overflows the storage dtype
STATUS_POISONED = "poisoned"  # the unit crashed its worker MAX_ATTEMPTS times: skipped
# Tries of one unit in one run. A unit whose input kills the worker process (a decoder crash,
# the OOM killer) would otherwise restart its actor for ever; Ray retries such tasks itself.
MAX_ATTEMPTS = 4
ATTEMPTS_DIR = "_encode/attempts"


@dataclass(frozen=True)
class UnitSettings:
    """Everything about a unit's processing that is the same for every unit of the job."""

    layout: ShardLayout
    storage: StoragePlan
    preprocess: PreprocessConfig
    batch_size: int
    overflow_stop_fraction: float
    overflow_min_samples: int


@dataclass(frozen=True)
class UnitTask:
    unit: int
    url: str
    run: str  # the driver's run id, recorded for wall-time accounting
    run_start: float  # the driver's start (epoch seconds)


@dataclass
class UnitCounts:
    encoded: int = 0  # candidates that reached storage (finite encoder output)
    nonfinite: int = 0
    overflow: int = 0

    def systematic_overflow(self, settings: UnitSettings) -> bool:
        judged = self.encoded
        return (
            self.overflow >= settings.overflow_min_samples
            and self.overflow >= settings.overflow_stop_fraction * judged
        )


@dataclass
class _Encoded:
    candidate: Candidate
    prepared: Prepared | None = None
    outputs: tuple[np.ndarray, np.ndarray | None] | None = None
    reason: str = ""


@dataclass
class UnitOutcome:
    samples: list[FinishedSample] = field(default_factory=list)
    counts: UnitCounts = field(default_factory=UnitCounts)
    replaced: int = (
        0  # samples with an input field that one of ours replaced (counted, never silent)
    )


def _decode(candidate: Candidate, cfg: PreprocessConfig) -> _Encoded:
    try:
        return _Encoded(candidate, prepared=prepare_image(candidate.image, cfg))
    except BadImageError as e:
        return _Encoded(candidate, reason=f"bad image: {e}")


def decoded_windows(
    candidates: list[Candidate], cfg: PreprocessConfig, pool: ThreadPoolExecutor, window: int
) -> Iterator[list[_Encoded]]:
    """Candidates decoded in windows of ``window``, in order, the next window decoding while
    the caller encodes this one."""
    chunks = iter([candidates[i : i + window] for i in range(0, len(candidates), window)])
    pending: deque[list[Future]] = deque()

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append([pool.submit(_decode, c, cfg) for c in chunk])

    submit_next()
    submit_next()
    while pending:
        futures = pending.popleft()
        submit_next()
        yield [f.result() for f in futures]


def _encode_window(items: list[_Encoded], encoder, batch_size: int) -> None:
    """Run the encoder on the decoded items of a window, one stackable shape at a time."""
    by_shape: dict[tuple[int, int], list[_Encoded]] = {}
    for item in items:
        if item.prepared is not None:
            by_shape.setdefault(item.prepared.pixels.shape[:2], []).append(item)
    for _shape, group in sorted(by_shape.items()):
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            outputs = encoder.encode(np.stack([item.prepared.pixels for item in chunk]))
            for item, out in zip(chunk, outputs, strict=True):
                if out is None:
                    item.reason = "encoder produced non-finite values for this image"
                else:
                    item.outputs = out


def _sizes(prepared: Prepared) -> tuple[int, ...]:
    return (*prepared.original_size, *prepared.crop_top_left, *prepared.pixels.shape[:2])


def encode_candidates(
    plan: UnitPlan, shard: str, settings: UnitSettings, encoder, pool: ThreadPoolExecutor
) -> UnitOutcome | None:
    """Decode, encode and store the unit's candidates; rejects go into ``plan``.

    Returns None as soon as the encoder is seen to overflow the storage dtype systematically:
    such a unit is not committed (the job stops and says which dtype to use instead).
    """
    outcome = UnitOutcome()
    window = max(2 * settings.batch_size, 8)
    for items in decoded_windows(plan.candidates, settings.preprocess, pool, window):
        _encode_window(items, encoder, settings.batch_size)
        for item in items:
            _store(item, shard, settings, plan, outcome)
        if outcome.counts.systematic_overflow(settings):
            return None
    return outcome


def _store(
    item: _Encoded, shard: str, settings: UnitSettings, plan: UnitPlan, outcome: UnitOutcome
) -> None:
    c, counts = item.candidate, outcome.counts
    if item.outputs is None:
        counts.nonfinite += item.reason.startswith("encoder produced non-finite")
        plan.reject(c.seq, c.key, shard, item.reason)
        return
    counts.encoded += 1
    latent, std = item.outputs
    try:
        stored = store_sample(settings.storage, c.key, latent, std, c.files, _sizes(item.prepared))
    except NotStorable as e:
        counts.overflow += e.overflow
        counts.nonfinite += not e.overflow
        plan.reject(c.seq, c.key, shard, str(e))
        return
    if stored.replaced:
        log.warning("sample %r had a field the encode job writes; replaced", c.key)
    shape = item.prepared.pixels.shape[:2]
    outcome.samples.append(FinishedSample(c.key, shape, stored.files, stored.values))
    outcome.replaced += int(stored.replaced)


def attempts_url(output: str, unit: int) -> str:
    return join_url(output, f"{ATTEMPTS_DIR}/u{unit:06d}.json")


def count_attempt(output: str, unit: int) -> int:
    """Record one more try of ``unit`` in this run; returns how many there have been."""
    url = attempts_url(output, unit)
    try:
        tries = int(read_json(url)["tries"]) + 1
    except (FileNotFoundError, KeyError, ValueError):
        tries = 1
    write_json_atomic(url, {"unit": unit, "tries": tries})
    return tries


def encode_unit(task: UnitTask, settings: UnitSettings, encoder, codebook, pool) -> dict[str, Any]:
    """Process one unit; returns the result row for the driver (the record is on storage)."""
    fingerprint = fingerprint_of(task.url)  # before reading: what the latents were made from
    plan = resolve_rows(read_rows(task.url), task.url)
    retries_before = encoder.fp16_retries
    outcome = encode_candidates(plan, task.url, settings, encoder, pool)
    if outcome is None:
        return {
            "unit": task.unit,
            "status": STATUS_OVERFLOW,
            "message": _overflow_message(settings),
        }
    groups = group_by_shape(outcome.samples)
    stats, codes = unit_statistics(settings.layout, codebook, groups)
    shards = write_shards(settings.layout, task.unit, task.url, groups)
    plan.rejects.sort(key=lambda item: item[0])
    counts = outcome.counts
    record = {
        "unit": task.unit,
        "input": task.url,
        "fingerprint": fingerprint,
        "rows": plan.rows,
        "samples": len(outcome.samples),
        "shards": shards,
        "rejects": [reject for _, reject in plan.rejects],
        "keys": [s.key for s in outcome.samples],
        "merged_keys": plan.merged,
        "replaced_fields": outcome.replaced,
        "stats": stats.state(),
        "code_counts": codes.counts.tolist() if codes is not None else None,
        "nonfinite_rejects": counts.nonfinite,
        "overflow_rejects": counts.overflow,
        "encoded": counts.encoded,
        "fp16_retries": encoder.fp16_retries - retries_before,
        "duplicate_rejects": 0,
        "run": task.run,
        "elapsed_s": round(time.time() - task.run_start, 3),
    }
    write_record(settings.layout.output, record)
    return {
        "unit": task.unit,
        "status": STATUS_OK,
        "rows": plan.rows,
        "samples": record["samples"],
        "rejects": len(record["rejects"]),
        "encoded": counts.encoded,
        "overflow": counts.overflow,
    }


def _overflow_message(settings: UnitSettings) -> str:
    dtype = settings.storage.dtype
    return (
        f"the encoder's latents systematically exceed the finite range of storage.dtype={dtype} "
        f"(at least {settings.overflow_stop_fraction:.0%} of {settings.overflow_min_samples}+ "
        f"images overflow); re-run with storage.dtype set to {WIDER[dtype]} (a new output "
        "directory: the dtype is part of the corpus's identity)"
    )
