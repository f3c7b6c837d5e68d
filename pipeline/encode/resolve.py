"""One input shard -> the samples to encode and the keys rejected before any pixel is decoded.

Runs on the worker that owns the unit (see pipeline.encode.actor). Every group of tar members
becomes an :class:`InputRow`; rows that share a key (a sample whose members are not contiguous
in the tar) are merged, and every key is decided exactly once: a :class:`Candidate` to decode
and encode, or a reject with the reason. Cross-shard duplicates are resolved later, at finalise
(pipeline.encode.dedup), because no single process may hold every key of the corpus.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.tario import TruncatedShardError
from pipeline.encode.inputs import SAFE_EXT, image_field, iter_input_samples, key_problem

log = logging.getLogger(__name__)

UNKNOWN_KEY = ""


@dataclass
class InputRow:
    """One group of tar members as the reader yields it (``seq``: its position in the shard)."""

    seq: int
    key: str
    image: bytes | None = None  # the image field's bytes; None when the group has none
    files: dict[str, bytes] = field(default_factory=dict)  # the other fields, verbatim
    reject: str = ""  # why the group is unusable ("" when it is fine so far)


@dataclass
class Candidate:
    """A key that survived every check that needs no decoding."""

    seq: int  # of the key's first row: rejects found later sort where the key began
    key: str
    image: bytes
    files: dict[str, bytes]


@dataclass
class UnitPlan:
    rows: int  # tar member groups read (the trailer's count in older versions)
    candidates: list[Candidate] = field(default_factory=list)
    rejects: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (seq, record)
    merged: int = 0  # keys whose members were spread over several rows

    def reject(self, seq: int, key: str, shard: str, reason: str) -> None:
        self.rejects.append((seq, reject_record(key, shard, reason)))


def reject_record(key: str, shard: str, reason: str) -> dict[str, Any]:
    return {"key": key or None, "shard": shard, "reason": reason}


def _row(seq: int, key: str, files: dict[str, bytes]) -> InputRow:
    problem = key_problem(key)
    if problem:
        return InputRow(seq, key, reject=problem)
    ext = image_field(files)
    extras = {e: data for e, data in files.items() if e != ext}
    bad = sorted(e for e in extras if not SAFE_EXT.match(e))
    if bad:
        return InputRow(seq, key, reject=f"unsupported field name(s) {bad}")
    return InputRow(seq, key, image=files[ext] if ext is not None else None, files=extras)


def read_rows(url: str) -> list[InputRow]:
    """Every group of tar members of the shard at ``url``, in tar order.

    A truncated or corrupt tar yields its complete samples, then one row for the sample that was
    being read (its key, or "" when unknown) rejected with the shard's error. A missing or
    unreadable file raises (OSError): the unit is not committed and the job names it.
    """
    rows: list[InputRow] = []
    try:
        for key, files in iter_input_samples(url):
            rows.append(_row(len(rows), key, files))
    except TruncatedShardError as e:
        log.warning("truncated shard %s after key %r: %s", url, e.last_good_key, e)
        rows.append(
            InputRow(len(rows), e.partial_key or UNKNOWN_KEY, reject=f"truncated shard: {e}")
        )
    except tarfile.TarError as e:
        # Defensive: iter_tar_samples should wrap these, but never let one shard kill the job.
        log.warning("unreadable shard %s: %s", url, e)
        rows.append(InputRow(len(rows), UNKNOWN_KEY, reject=f"unreadable shard: {e}"))
    return rows


def resolve_rows(rows: list[InputRow], shard: str) -> UnitPlan:
    """Decide every key of one unit once: a candidate, or a reject (rows in ``seq`` order)."""
    plan = UnitPlan(rows=len(rows))
    groups: dict[str, list[InputRow]] = {}
    for row in rows:
        if not row.key:  # a truncated shard's unknown sample: nothing to merge it with
            plan.reject(row.seq, row.key, shard, row.reject or "empty key")
            continue
        groups.setdefault(row.key, []).append(row)
    for key, group in groups.items():
        if len(group) > 1:
            plan.merged += 1
        _resolve_key(key, group, shard, plan)
    return plan


def _resolve_key(key: str, group: list[InputRow], shard: str, plan: UnitPlan) -> None:
    images = [row for row in group if row.image is not None]
    for extra in images[1:]:
        # Two images under one key in one shard: the first wins, the later one is recorded.
        plan.reject(extra.seq, key, shard, "duplicate key within the shard")
    parts = sorted([row for row in group if row.image is None] + images[:1], key=lambda r: r.seq)
    problem = next((row.reject for row in parts if row.reject), "")
    if not problem and not images:
        fields = sorted({ext for row in parts for ext in row.files})
        problem = f"no image field (fields: {fields})"
    if problem:
        plan.reject(parts[0].seq, key, shard, problem)
        return
    files: dict[str, bytes] = {}
    for row in parts:
        for ext, data in row.files.items():
            files.setdefault(ext, data)  # first occurrence wins, like a duplicate tar member
    plan.candidates.append(Candidate(parts[0].seq, key, images[0].image or b"", files))
