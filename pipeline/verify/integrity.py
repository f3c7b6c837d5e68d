"""(a) Integrity: the corpus holds what its manifest, shards.jsonl and inputs.jsonl say.

Every committed shard has its recorded size, sha256 and sample count; every sample holds a
readable, finite latent of the shard's shape (VQ: code indices inside the codebook) and its size
conditioning; the lineage in inputs.jsonl agrees with the shards; shard-named files the corpus
does not list are reported (a warning: leftovers of an interrupted run, which no reader touches).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

import fsspec
import numpy as np

from pipeline.contracts.manifest import (
    CorpusError,
    InputLineage,
    LatentSpec,
    Manifest,
    ShardEntry,
    iter_inputs,
    iter_shard_entries,
)
from pipeline.latents.format import decode_latent, decode_stored, read_shard, sample_sizes
from pipeline.verify.findings import Findings, listed

# Output files named like shards: {prefix}-{unit:06d}.tar or {prefix}-{unit:06d}-h{H}w{W}.tar.
SHARD_NAME = re.compile(r"^[A-Za-z0-9_-]+-\d{6}(-h\d+w\d+)?\.tar$")


@dataclass
class OutputIndex:
    """The shard entries (shards.jsonl order) and where each key sits: key -> entry positions."""

    entries: list[ShardEntry] = field(default_factory=list)
    shards_of: dict[str, list[int]] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(len(where) for where in self.shards_of.values())


def scan_shards(directory: str, manifest: Manifest, findings: Findings) -> OutputIndex:
    """Read every committed shard whole (size, sha256, sample count) and check every sample; a
    damaged shard is one error and its keys count as absent."""
    index = OutputIndex()
    try:
        for position, entry in enumerate(iter_shard_entries(directory, manifest)):
            index.entries.append(entry)
            try:
                samples = read_shard(directory, entry)
            except CorpusError as e:
                findings.error(str(e))
                continue
            for key, files in samples:
                index.shards_of.setdefault(key, []).append(position)
                check_sample(key, files, manifest.latent, entry, findings)
    except CorpusError as e:  # shards.jsonl itself is damaged or not the one the manifest pins
        findings.error(str(e))
    return index


def check_sample(
    key: str, files: dict[str, bytes], latent: LatentSpec, entry: ShardEntry, findings: Findings
) -> None:
    """One sample: readable, of the shard's shape, finite (in range for VQ), with its sizes."""
    where = f"{entry.name}: sample {key!r}"
    try:
        stored = decode_stored(files, latent, where)
        sample_sizes(files, where)
        std = _std(files, latent, where)
    except (CorpusError, ValueError) as e:
        findings.error(str(e))
        return
    if list(stored.shape) != list(entry.latent_shape):
        findings.error(f"{where}: latent shape {list(stored.shape)}, expected {entry.latent_shape}")
    if latent.is_vq:
        _check_indices(stored, latent, where, findings)
        return
    _check_finite(stored, latent.field, where, findings)
    if std is not None:
        _check_finite(std, latent.std_field, where, findings)


def _std(files: dict[str, bytes], latent: LatentSpec, where: str) -> np.ndarray | None:
    if not latent.std_field:
        return None
    if latent.std_field not in files:
        raise CorpusError(f"{where}: no {latent.std_field!r} member (the manifest stores std)")
    return decode_latent(files[latent.std_field], latent.dtype)


def _check_finite(values: np.ndarray, name: str, where: str, findings: Findings) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        nan, count = int(np.isnan(values).sum()), int(bad.sum())
        findings.error(
            f"{where}: {name} holds {count} non-finite value(s) ({nan} NaN, {count - nan} inf) "
            f"of {values.size}"
        )


def _check_indices(indices: np.ndarray, latent: LatentSpec, where: str, findings: Findings) -> None:
    if not indices.size:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= latent.num_codes:
        outside = int(((indices < 0) | (indices >= latent.num_codes)).sum())
        findings.error(
            f"{where}: {outside} code index(es) outside the codebook's [0, {latent.num_codes}) "
            f"(they span [{low}, {high}])"
        )


def find_uncommitted(directory: str, outputs: OutputIndex, findings: Findings) -> list[str]:
    """Shard-named files in ``directory`` that shards.jsonl does not list."""
    fs, path = fsspec.core.url_to_fs(directory)
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    committed = {entry.name for entry in outputs.entries}
    stray = sorted(n for n in names if SHARD_NAME.match(n) and n not in committed)
    if stray:
        findings.warn(
            f"{len(stray)} shard-named file(s) not in shards.jsonl (ignored by readers; "
            f"leftovers of an interrupted run?): {listed(stray)}"
        )
    return stray


def check_totals(
    manifest: Manifest, outputs: OutputIndex, rejects: list[dict], findings: Findings
) -> None:
    """The manifest's counts agree with the shard entries and rejects.jsonl."""
    listed_samples = sum(entry.samples for entry in outputs.entries)
    if listed_samples != manifest.samples:
        findings.error(f"manifest samples={manifest.samples} but its shards hold {listed_samples}")
    if manifest.rejects != len(rejects):
        findings.error(
            f"manifest rejects={manifest.rejects} but rejects.jsonl has {len(rejects)} lines"
        )
    duplicated = sorted(key for key, where in outputs.shards_of.items() if len(where) > 1)
    if duplicated:
        findings.error(
            f"{len(duplicated)} key(s) appear more than once in the latent shards: "
            f"{listed(duplicated)}"
        )


def read_lineage(directory: str, manifest: Manifest, findings: Findings) -> list[InputLineage]:
    """The records of inputs.jsonl (as many as could be read when it is damaged)."""
    records: list[InputLineage] = []
    try:
        records.extend(iter_inputs(directory, manifest))
    except CorpusError as e:
        findings.error(str(e))
    return records


def check_lineage(lineage: list[InputLineage], outputs: OutputIndex, findings: Findings) -> None:
    """inputs.jsonl and shards.jsonl tell the same story: each input's shards exist, come from
    it, and hold the samples it says it became. One error per kind of disagreement."""
    by_name = {entry.name: entry for entry in outputs.entries}
    owner = {record.unit: record for record in lineage}
    unlisted = [name for record in lineage for name in record.shards if name not in by_name]
    if unlisted:
        findings.error(
            f"inputs.jsonl names {len(unlisted)} shard(s) that shards.jsonl does not list: "
            f"{listed(unlisted)}"
        )
    miscounted = [
        f"{record.url} ({record.samples} vs {held})"
        for record in lineage
        if (held := sum(by_name[n].samples for n in record.shards if n in by_name))
        != record.samples
    ]
    if miscounted:
        findings.error(
            f"{len(miscounted)} input(s) in inputs.jsonl record another number of latents than "
            f"their shards hold (recorded vs held): {', '.join(miscounted[:10])}"
        )
    orphans = [
        entry.name
        for entry in outputs.entries
        if (record := owner.get(entry.unit)) is None
        or record.url != entry.source
        or entry.name not in record.shards
    ]
    if orphans:
        findings.error(
            f"{len(orphans)} shard(s) in shards.jsonl come from an input (unit, url) that "
            f"inputs.jsonl does not record them for: {listed(orphans)}"
        )
