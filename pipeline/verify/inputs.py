"""(b) The corpus against its input: unchanged input shards, and every key decided exactly once.

Fingerprints (cheap: one listing per input directory): each input shard's current fingerprint
must equal the one recorded in inputs.jsonl when it was encoded, else its latents may be stale.

Exactly once (reads every input shard): every input key is decided, as a latent or a reject,
once per input shard that holds it; no key has two latents; no latent or reject names a key the
input does not have. Memory is O(keys): the key indexes are held whole.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pipeline.contracts.manifest import InputLineage
from pipeline.data.fingerprint import describe_change, fingerprint_of, input_fingerprints
from pipeline.data.tario import TruncatedShardError
from pipeline.encode.inputs import iter_input_samples
from pipeline.verify.findings import Findings, listed
from pipeline.verify.integrity import OutputIndex

# A reject whose key is unknown is legitimate only when the input shard itself was damaged.
KEYLESS_REASONS = ("truncated shard", "unreadable shard")


@dataclass
class InputIndex:
    """Keys of the input shards: per shard (as the job saw them) and their occurrences."""

    keys_by_shard: dict[str, set[str]] = field(default_factory=dict)
    # Tar sample groups per key over all shards: the most decisions a key can legitimately get
    # (the job rejects a second image under one key in a shard as a duplicate).
    occurrences: Counter = field(default_factory=Counter)

    def shard_count(self) -> Counter:
        """Per key, the number of input shards holding it: the fewest decisions it needs."""
        return Counter(key for keys in self.keys_by_shard.values() for key in keys)


# ----------------------------------------------------------------------------- fingerprints


def check_fingerprints(lineage: list[InputLineage], findings: Findings) -> int:
    """Compare every input shard's fingerprint now with the one recorded when it was encoded;
    returns how many changed (or disappeared)."""
    current = _current_fingerprints([record.url for record in lineage])
    changed = 0
    for record in lineage:
        now = current.get(record.url)
        if now == record.fingerprint:
            continue
        changed += 1
        what = "it no longer exists" if now is None else describe_change(record.fingerprint, now)
        findings.error(
            f"input shard {record.url} changed after it was encoded: {what} (its latents may be "
            "stale; re-run the encode command to re-encode it)"
        )
    return changed


def _current_fingerprints(urls: list[str]) -> dict[str, dict]:
    """url -> fingerprint now; urls that no longer exist are left out."""
    try:
        return input_fingerprints(urls)
    except FileNotFoundError:  # some are gone: find out which, one by one
        found = {}
        for url in urls:
            try:
                found[url] = fingerprint_of(url)
            except FileNotFoundError:
                continue
        return found


# ----------------------------------------------------------------------------- exactly once


def scan_inputs(urls: list[str], findings: Findings) -> InputIndex:
    """Keys of every input shard, as the job read them (a truncated shard: its complete
    samples plus the partial one, which the job rejects under its key)."""
    index = InputIndex()
    for url in urls:
        keys = index.keys_by_shard.setdefault(url, set())
        try:
            for key, _files in iter_input_samples(url):
                keys.add(key)
                index.occurrences[key] += 1
        except TruncatedShardError as e:
            findings.warn(f"input shard {url} is truncated: {e.reason}")
            if e.partial_key is not None:
                keys.add(e.partial_key)
                index.occurrences[e.partial_key] += 1
        except OSError as e:  # missing or unreadable: its keys cannot be checked
            findings.error(f"cannot read input shard {url}: {type(e).__name__}: {e}")
    return index


def check_exactly_once(
    input_urls: list[str],
    inputs: InputIndex,
    outputs: OutputIndex,
    rejects: list[dict],
    findings: Findings,
) -> None:
    """Every input key decided once per input shard holding it; nothing invented."""
    latents = Counter({key: len(where) for key, where in outputs.shards_of.items()})
    rejected = Counter(r["key"] for r in rejects if r.get("key") is not None)
    _check_keyless_rejects(rejects, set(input_urls), findings)
    needed = inputs.shard_count()
    missing = sorted(k for k, n in needed.items() if latents[k] + rejected[k] < n)
    if missing:
        findings.error(
            f"{len(missing)} input key(s) are neither in a latent shard nor in rejects.jsonl: "
            f"{listed(missing)}"
        )
    excess = sorted(k for k, n in inputs.occurrences.items() if latents[k] + rejected[k] > n)
    if excess:
        findings.error(
            f"{len(excess)} key(s) are decided (latent + rejects) more often than the input "
            f"holds them: {listed(excess)}"
        )
    invented = sorted((set(latents) | set(rejected)) - set(inputs.occurrences))
    if invented:
        findings.error(
            f"{len(invented)} key(s) in the corpus or rejects.jsonl are not in the input: "
            f"{listed(invented)}"
        )
    _check_sources(inputs, outputs, findings)


def _check_keyless_rejects(rejects: list[dict], inputs: set[str], findings: Findings) -> None:
    for record in rejects:
        if record.get("shard") not in inputs:
            findings.error(f"reject {record} names a shard that is not an input of the corpus")
        elif record.get("key") is None and not str(record.get("reason", "")).startswith(
            KEYLESS_REASONS
        ):
            findings.error(f"reject without a key for a sound shard: {record}")


def _check_sources(inputs: InputIndex, outputs: OutputIndex, findings: Findings) -> None:
    """Each latent comes from the input shard its shard entry names."""
    entries = outputs.entries
    wrong = sorted(
        key
        for key, where in outputs.shards_of.items()
        for position in where
        if key in inputs.occurrences
        and key not in inputs.keys_by_shard.get(entries[position].source, set())
    )
    if wrong:
        findings.error(
            f"{len(wrong)} latent(s) sit in a shard whose source input does not hold their key: "
            f"{listed(wrong)}"
        )
