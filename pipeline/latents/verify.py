"""``latentpipe verify``: check a finished latent corpus against its manifest, input and decoder.

Three checks, each adding errors (the corpus is wrong) or warnings (worth knowing):

(a) integrity: every committed shard has its recorded size, sha256 and sample count, and every
    sample holds a readable latent of the shard's shape and its size conditioning; shard-named
    files the manifest does not list are reported as ``uncommitted_files`` (a warning: leftovers
    of an interrupted run, which no reader will touch);
(b) exactly once (``check_input``): every input key is decided, as a latent or a reject, once
    per input shard that holds it; no key has two latents; no latent or reject names a key the
    input does not have;
(c) decoding: ``samples`` seeded random latents are decoded with the autoencoder's checkpoint
    and compared with their source images, preprocessed exactly as the encode job did (PSNR).

The report is returned and written to ``{output}/verify.json``; ``ok`` is False on any error.
"""

from __future__ import annotations

import logging
import math
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from omegaconf import MISSING

from pipeline.latents.format import (
    VQ_KIND,
    CorpusError,
    decode_stored,
    join_url,
    load_manifest,
    load_manifest_codebook,
    read_rejects,
    read_shard,
    sample_sizes,
    write_json_atomic,
)

log = logging.getLogger("latentpipe.verify")

REPORT_FILE = "verify.json"
# Output files named like shards: {prefix}-{unit:06d}.tar or {prefix}-{unit:06d}-h{H}w{W}.tar.
SHARD_NAME = re.compile(r"^[A-Za-z0-9_-]+-\d{6}(-h\d+w\d+)?\.tar$")
# A reject whose key is unknown is legitimate only when the input shard itself was damaged.
KEYLESS_REASONS = ("truncated shard", "unreadable shard")
PSNR_CAP_DB = 100.0  # identical images: report a finite number (JSON has no infinity)
MAX_LISTED = 10  # keys named per error message; the count is always complete


@dataclass
class VerifyConfig:
    output: str = MISSING  # the latent corpus directory (local path or fsspec URL)
    decoder: str = ""  # autoencoder checkpoint dir; "" = the encoder sidecar's checkpoint.path
    samples: int = 16  # latents decoded and compared with their source images; 0 skips
    seed: int = 0  # which latents are decoded
    check_input: bool = True  # read the input shards to check every key is decided once


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        log.error("%s", message)
        self.errors.append(message)

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)


@dataclass
class OutputIndex:
    """Where each key of the latent shards sits: key -> indices of the shard entries."""

    shards_of: dict[str, list[int]] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(len(where) for where in self.shards_of.values())


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


def verify_corpus(cfg: VerifyConfig) -> dict[str, Any]:
    """Check the corpus at ``cfg.output``; returns the report (also written to verify.json)."""
    if cfg.samples < 0:
        raise ValueError(f"verify.samples must be >= 0, got {cfg.samples}")
    manifest = load_manifest(cfg.output)
    findings = Findings()
    outputs = scan_shards(cfg.output, manifest, findings)
    uncommitted = find_uncommitted(cfg.output, manifest, findings)
    rejects = read_rejects(cfg.output)
    check_totals(manifest, outputs, rejects, findings)
    input_keys = input_samples = None
    if cfg.check_input:
        inputs = scan_inputs(manifest["inputs"], findings)
        check_exactly_once(manifest, inputs, outputs, rejects, findings)
        input_keys = len(inputs.occurrences)
        input_samples = sum(inputs.shard_count().values())
    decoded = decode_check(cfg, manifest, findings) if cfg.samples else []
    report = {
        "ok": not findings.errors,
        "errors": findings.errors,
        "warnings": findings.warnings,
        "shards": len(manifest["shards"]),
        "samples": outputs.samples,
        "rejects": len(rejects),
        "input_keys": input_keys,
        "input_samples": input_samples,
        "psnr_db": float(np.mean(decoded)) if decoded else None,
        "psnr_db_min": float(np.min(decoded)) if decoded else None,
        "decoded": len(decoded),
        "uncommitted_files": uncommitted,
    }
    write_json_atomic(join_url(cfg.output, REPORT_FILE), report)
    return report


# ----------------------------------------------------------------------------- (a) integrity


def scan_shards(directory: str, manifest: dict[str, Any], findings: Findings) -> OutputIndex:
    """Read every committed shard whole (size, sha256, sample count) and every sample's latent
    and sizes; a damaged shard is one error and its keys count as absent."""
    index = OutputIndex()
    for position, entry in enumerate(manifest["shards"]):
        try:
            samples = read_shard(directory, entry)
        except CorpusError as e:
            findings.error(str(e))
            continue
        for key, files in samples:
            index.shards_of.setdefault(key, []).append(position)
            _check_sample(key, files, manifest, entry, findings)
    return index


def _check_sample(
    key: str, files: dict[str, bytes], manifest: dict[str, Any], entry: dict, findings: Findings
) -> None:
    where = f"{entry['name']}: sample {key!r}"
    try:
        stored = decode_stored(files, manifest["latent"], where)
        sample_sizes(files, where)
    except (CorpusError, ValueError) as e:
        findings.error(str(e))
        return
    if list(stored.shape) != list(entry["latent_shape"]):
        findings.error(
            f"{where}: latent shape {list(stored.shape)}, expected {entry['latent_shape']}"
        )


def find_uncommitted(directory: str, manifest: dict[str, Any], findings: Findings) -> list[str]:
    """Shard-named files in ``directory`` that the manifest does not list."""
    fs, path = fsspec.core.url_to_fs(directory)
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    committed = {entry["name"] for entry in manifest["shards"]}
    stray = sorted(n for n in names if SHARD_NAME.match(n) and n not in committed)
    if stray:
        findings.warn(
            f"{len(stray)} shard-named file(s) not in the manifest (ignored by readers; "
            f"leftovers of an interrupted run?): {_listed(stray)}"
        )
    return stray


def check_totals(
    manifest: dict[str, Any], outputs: OutputIndex, rejects: list[dict], findings: Findings
) -> None:
    """The manifest's counts agree with its shard entries and rejects.jsonl."""
    listed = sum(int(entry["samples"]) for entry in manifest["shards"])
    if listed != manifest["samples"]:
        findings.error(f"manifest samples={manifest['samples']} but its shards hold {listed}")
    recorded = manifest.get("rejects")
    if isinstance(recorded, int) and recorded != len(rejects):
        findings.error(f"manifest rejects={recorded} but rejects.jsonl has {len(rejects)} lines")
    duplicated = sorted(key for key, where in outputs.shards_of.items() if len(where) > 1)
    if duplicated:
        findings.error(
            f"{len(duplicated)} key(s) appear more than once in the latent shards: "
            f"{_listed(duplicated)}"
        )


# ----------------------------------------------------------------------------- (b) exactly once


def scan_inputs(urls: list[str], findings: Findings) -> InputIndex:
    """Keys of every input shard, as the job read them (a truncated shard: its complete
    samples plus the partial one, which the job rejects under its key)."""
    from pipeline.data.tario import TruncatedShardError
    from pipeline.encode.inputs import iter_input_samples

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
    manifest: dict[str, Any],
    inputs: InputIndex,
    outputs: OutputIndex,
    rejects: list[dict],
    findings: Findings,
) -> None:
    """Every input key decided once per input shard holding it; nothing invented."""
    latents = Counter({key: len(where) for key, where in outputs.shards_of.items()})
    rejected = Counter(r["key"] for r in rejects if r.get("key") is not None)
    _check_keyless_rejects(rejects, manifest["inputs"], findings)
    needed = inputs.shard_count()
    missing = sorted(k for k, n in needed.items() if latents[k] + rejected[k] < n)
    if missing:
        findings.error(
            f"{len(missing)} input key(s) are neither in a latent shard nor in rejects.jsonl: "
            f"{_listed(missing)}"
        )
    excess = sorted(k for k, n in inputs.occurrences.items() if latents[k] + rejected[k] > n)
    if excess:
        findings.error(
            f"{len(excess)} key(s) are decided (latent + rejects) more often than the input "
            f"holds them: {_listed(excess)}"
        )
    invented = sorted((set(latents) | set(rejected)) - set(inputs.occurrences))
    if invented:
        findings.error(
            f"{len(invented)} key(s) in the corpus or rejects.jsonl are not in the input: "
            f"{_listed(invented)}"
        )
    _check_sources(manifest, inputs, outputs, findings)


def _check_keyless_rejects(rejects: list[dict], inputs: list[str], findings: Findings) -> None:
    for record in rejects:
        if record.get("shard") not in inputs:
            findings.error(f"reject {record} names a shard that is not an input of the corpus")
        elif record.get("key") is None and not str(record.get("reason", "")).startswith(
            KEYLESS_REASONS
        ):
            findings.error(f"reject without a key for a sound shard: {record}")


def _check_sources(
    manifest: dict[str, Any], inputs: InputIndex, outputs: OutputIndex, findings: Findings
) -> None:
    """Each latent comes from the input shard its shard entry names."""
    entries = manifest["shards"]
    wrong = sorted(
        key
        for key, where in outputs.shards_of.items()
        for position in where
        if key in inputs.occurrences
        and key not in inputs.keys_by_shard.get(entries[position]["source"], set())
    )
    if wrong:
        findings.error(
            f"{len(wrong)} latent(s) sit in a shard whose source input does not hold their key: "
            f"{_listed(wrong)}"
        )


def _listed(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:MAX_LISTED])
    return shown + (f" (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


# ----------------------------------------------------------------------------- (c) decoding


def decode_check(cfg: VerifyConfig, manifest: dict[str, Any], findings: Findings) -> list[float]:
    """PSNR (dB) of ``cfg.samples`` seeded random latents, decoded, vs their preprocessed
    source images; an empty list when nothing could be decoded (with the reason recorded)."""
    checkpoint = manifest["encoder"].get("sidecar", {}).get("checkpoint") or {}
    decoder = cfg.decoder or checkpoint.get("path") or ""
    if not decoder:
        findings.warn("no decoder: the sidecar names no checkpoint and verify.decoder is empty")
        return []
    if not _decoder_matches(decoder, checkpoint.get("sha256"), findings):
        return []
    from pipeline.train.checkpoint import load_model

    model, _ = load_model(decoder)
    picks = pick_samples(manifest, cfg.samples, cfg.seed)
    latents = _picked_latents(cfg.output, manifest, picks, findings)
    sources = _source_images(latents, manifest, findings)
    codebook = _codebook(cfg.output, manifest)
    scores = []
    for (key, _), (stored, files) in latents.items():
        if key not in sources:
            continue
        score = _compare(model, stored, files, sources[key], manifest, codebook, findings, key)
        if score is not None:
            scores.append(score)
    return scores


def _decoder_matches(decoder: str, expected: str | None, findings: Findings) -> bool:
    """The decoder is the checkpoint the encoder was exported from (when the sidecar says)."""
    if not expected:
        return True
    from pipeline.export.sidecar import file_sha256
    from pipeline.train.checkpoint import STATE_FILE

    state = join_url(decoder, STATE_FILE)
    try:
        actual = file_sha256(state)
    except FileNotFoundError:
        findings.error(f"decoder checkpoint {state} not found")
        return False
    if actual != expected:
        findings.error(
            f"sha256 of {state} is {actual}, the encoder sidecar records {expected}: "
            "this is not the checkpoint the encoder was exported from"
        )
        return False
    return True


def pick_samples(manifest: dict[str, Any], count: int, seed: int) -> list[tuple[int, int]]:
    """(shard position, sample position) of ``count`` distinct samples drawn with ``seed``."""
    sizes = np.array([int(e["samples"]) for e in manifest["shards"]], dtype=np.int64)
    total = int(sizes.sum())
    chosen = np.random.default_rng(seed).choice(total, size=min(count, total), replace=False)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    shard = np.searchsorted(starts, chosen, side="right") - 1
    return sorted(zip(shard.tolist(), (chosen - starts[shard]).tolist(), strict=True))


def _picked_latents(
    directory: str, manifest: dict[str, Any], picks: list[tuple[int, int]], findings: Findings
) -> dict[tuple[str, int], tuple[np.ndarray, dict[str, bytes]]]:
    """(key, shard position) -> (stored latent, files) for the picked samples."""
    out = {}
    wanted: dict[int, set[int]] = {}
    for position, sample in picks:
        wanted.setdefault(position, set()).add(sample)
    for position, samples in wanted.items():
        entry = manifest["shards"][position]
        try:
            shard = read_shard(directory, entry)
            for i in sorted(samples):
                key, files = shard[i]
                stored = decode_stored(files, manifest["latent"], f"{entry['name']}: {key!r}")
                out[key, position] = (stored, files)
        except CorpusError:
            continue  # already an error of the integrity scan
    return out


def _source_images(
    latents: dict[tuple[str, int], Any], manifest: dict[str, Any], findings: Findings
) -> dict[str, bytes]:
    """key -> image bytes from the input shard each picked latent came from (the first
    image-bearing sample of that key, as the job takes)."""
    from pipeline.data.tario import TruncatedShardError
    from pipeline.encode.inputs import image_field, iter_input_samples

    by_source: dict[str, set[str]] = {}
    for key, position in latents:
        by_source.setdefault(manifest["shards"][position]["source"], set()).add(key)
    images: dict[str, bytes] = {}
    for url, keys in by_source.items():
        try:
            for key, files in iter_input_samples(url):
                ext = image_field(files)
                if key in keys and ext is not None and key not in images:
                    images[key] = files[ext]
        except (TruncatedShardError, OSError):
            pass  # complete samples were seen; the input scan reports the damage
        for key in sorted(keys - images.keys()):
            findings.error(f"source image of {key!r} not found in {url}")
    return images


def _codebook(directory: str, manifest: dict[str, Any]) -> np.ndarray | None:
    if manifest["latent"]["kind"] != VQ_KIND:
        return None
    return load_manifest_codebook(directory, manifest)


def _compare(
    model,
    stored: np.ndarray,
    files: dict[str, bytes],
    image: bytes,
    manifest: dict[str, Any],
    codebook: np.ndarray | None,
    findings: Findings,
    key: str,
) -> float | None:
    """PSNR of one decoded latent against its source image, preprocessed like the job did."""
    from pipeline.encode.preprocess import PreprocessConfig, prepare_image

    try:
        prepared = prepare_image(image, PreprocessConfig(**manifest["preprocess"]))
    except ValueError as e:
        findings.error(f"source image of {key!r} no longer preprocesses: {e}")
        return None
    _check_sizes(key, files, prepared, findings)
    try:
        decoded = decode_pixels(model, stored, codebook)
    except RuntimeError as e:
        findings.error(f"the decoder cannot decode {key!r}: {e}")
        return None
    if decoded.shape != prepared.pixels.shape:
        findings.error(
            f"{key!r} decodes to {list(decoded.shape)} but its source preprocesses to "
            f"{list(prepared.pixels.shape)}"
        )
        return None
    return psnr_db(decoded, prepared.pixels)


def _check_sizes(key: str, files: dict[str, bytes], prepared, findings: Findings) -> None:
    try:
        stored = {name: value.tolist() for name, value in sample_sizes(files, key).items()}
    except CorpusError:
        return  # already an error of the integrity scan
    fresh = {
        "original_size": list(prepared.original_size),
        "crop_top_left": list(prepared.crop_top_left),
        "target_size": list(prepared.target_size),
    }
    if stored != fresh:
        findings.error(f"{key!r}: sizes.json says {stored}, preprocessing the source gives {fresh}")


def decode_pixels(model, stored: np.ndarray, codebook: np.ndarray | None) -> np.ndarray:
    """Stored (unscaled) latent [C, h, w] or VQ indices [h, w] -> decoded uint8 [H, W, 3]."""
    import torch

    from pipeline.data.images import denormalize
    from pipeline.latents.format import lookup_codebook

    latent = lookup_codebook(stored, codebook) if codebook is not None else stored
    with torch.inference_mode():
        out = model.decode(torch.from_numpy(np.ascontiguousarray(latent, np.float32))[None])
    return denormalize(out[0].float().numpy())


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images in dB (peak 255), capped at PSNR_CAP_DB for identical ones."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))
