"""What an encode output already holds, read from storage (the truth, whatever any run's
memory says): valid commit records, changed inputs, a finished manifest, attempt counters."""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipeline.contracts.layout import INPUTS_FILE, MANIFEST_FILE
from pipeline.contracts.manifest import Manifest
from pipeline.data.fingerprint import describe_change
from pipeline.encode.plan import Job
from pipeline.encode.unit import ATTEMPTS_DIR
from pipeline.latents.format import commit_url, commits_url, join_url, read_json

log = logging.getLogger("pipeline.encode.job")


@dataclass
class Committed:
    """Units already committed (valid: same input, same fingerprint, shards present)."""

    units: set[int] = field(default_factory=set)
    images: int = 0
    rejects: int = 0
    samples: int = 0
    deduplicated: set[int] = field(default_factory=set)  # units that lost keys to dedup
    changed: list[str] = field(default_factory=list)  # input shards changed since their commit


def listing(url: str) -> dict[str, int]:
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
    names = listing(commits_url(output))
    return {int(n[1:7]) for n in names if n.startswith("u") and n.endswith(".json")}


def _iter_records(output: str, units: list[int]) -> Iterator[dict[str, Any]]:
    with ThreadPoolExecutor(8, thread_name_prefix="records") as pool:
        for start in range(0, len(units), 64):  # a bounded window of records in memory
            yield from pool.map(
                lambda u: read_json(commit_url(output, u)), units[start : start + 64]
            )


def discard(output: str, unit: int) -> None:
    fs, path = fsspec.core.url_to_fs(commit_url(output, unit))
    fs.rm(path)


def scan_committed(job: Job, fingerprints: dict[str, dict]) -> Committed:
    """Check every commit record against the input and the output; discard stale ones."""
    output = job.cfg.output
    found = Committed()
    shards = listing(output)
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
            discard(output, unit)
            continue
        if any(shards.get(s["name"]) != s["bytes"] for s in record["shards"]):
            log.warning("unit %d: a committed shard is missing or resized; encoding it again", unit)
            discard(output, unit)
            continue
        found.units.add(unit)
        found.images += int(record["rows"])
        found.samples += int(record["samples"])
        found.rejects += len(record["rejects"])
        if record.get("dedup_removed"):
            found.deduplicated.add(unit)
    return found


def finished_manifest(job: Job, fingerprints: dict[str, dict]) -> Manifest | None:
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


def clear_attempts(output: str) -> None:
    fs, path = fsspec.core.url_to_fs(join_url(output, ATTEMPTS_DIR))
    names = listing(join_url(output, ATTEMPTS_DIR))
    for name in sorted(names):
        fs.rm(f"{path}/{name}")


def units_with_samples(job: Job) -> list[int]:
    """Units whose shards hold samples: only they can hold a duplicate key."""
    shards = listing(job.cfg.output)
    prefix = f"{job.cfg.prefix}-"
    return sorted(
        {
            int(n[len(prefix) : len(prefix) + 6])
            for n in shards
            if n.startswith(prefix) and n.endswith(".tar")
        }
    )
