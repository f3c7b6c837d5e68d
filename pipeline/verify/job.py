"""``latentpipe verify``: check a finished latent corpus against its manifest, input and decoder.

Three groups of checks, each adding errors (the corpus is wrong) or warnings (worth knowing):

(a) integrity (:mod:`pipeline.verify.integrity`): sizes, sha256 and sample counts of every
    shard listed in shards.jsonl (itself pinned by the manifest); every sample readable, of its
    shard's shape and finite (no NaN/inf in latents or std; VQ indices inside the codebook);
    inputs.jsonl agrees with shards.jsonl; stray shard-named files are a warning;
(b) the input (:mod:`pipeline.verify.inputs`): each input shard's fingerprint equals the one
    recorded when it was encoded (``check_fingerprints``), and, reading the inputs
    (``check_input``), every input key is decided exactly once;
(c) decoding (:mod:`pipeline.verify.decode`): ``samples`` seeded random latents are decoded and
    compared with their source images; a mean PSNR more than ``psnr_margin_db`` below the
    held-out PSNR the encoder's sidecar records is an error.

The report is returned and written to ``{output}/verify.json``; ``ok`` is False on any error
(``latentpipe verify`` then exits 1). Run: ``latentpipe verify output=DIR`` (CPU is enough).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import MISSING

from pipeline.contracts.layout import join_url
from pipeline.contracts.manifest import load_manifest
from pipeline.latents.format import read_rejects, write_json_atomic
from pipeline.verify.decode import check_quality, decode_check
from pipeline.verify.findings import Findings
from pipeline.verify.inputs import check_exactly_once, check_fingerprints, scan_inputs
from pipeline.verify.integrity import (
    check_lineage,
    check_totals,
    find_uncommitted,
    read_lineage,
    scan_shards,
)

REPORT_FILE = "verify.json"


@dataclass
class VerifyConfig:
    output: str = MISSING  # the latent corpus directory (local path or fsspec URL)
    decoder: str = ""  # model artifact (or checkpoint) dir; "" = the encoder sidecar's model.path
    samples: int = 16  # latents decoded and compared with their source images; 0 skips
    seed: int = 0  # which latents are decoded
    check_input: bool = True  # read the input shards to check every key is decided once
    check_fingerprints: bool = True  # input shards unchanged since they were encoded
    psnr_margin_db: float = 3.0  # decoded PSNR may fall this far below the sidecar's


def verify_corpus(cfg: VerifyConfig) -> dict[str, Any]:
    """Check the corpus at ``cfg.output``; returns the report (also written to verify.json)."""
    _validate(cfg)
    manifest = load_manifest(cfg.output)
    findings = Findings()
    outputs = scan_shards(cfg.output, manifest, findings)
    uncommitted = find_uncommitted(cfg.output, outputs, findings)
    rejects = read_rejects(cfg.output)
    check_totals(manifest, outputs, rejects, findings)
    lineage = read_lineage(cfg.output, manifest, findings)
    check_lineage(lineage, outputs, findings)
    changed = check_fingerprints(lineage, findings) if cfg.check_fingerprints else None
    input_keys = input_samples = None
    if cfg.check_input:
        urls = [record.url for record in lineage]
        inputs = scan_inputs(urls, findings)
        check_exactly_once(urls, inputs, outputs, rejects, findings)
        input_keys = len(inputs.occurrences)
        input_samples = sum(inputs.shard_count().values())
    decoded = []
    if cfg.samples:
        decoded = decode_check(
            cfg.output, cfg.decoder, manifest, outputs.entries, cfg.samples, cfg.seed, findings
        )
        check_quality(decoded, manifest.sidecar, cfg.psnr_margin_db, findings)
    report = {
        "ok": not findings.errors,
        "errors": findings.errors,
        "warnings": findings.warnings,
        "shards": len(outputs.entries),
        "samples": outputs.samples,
        "rejects": len(rejects),
        "inputs": len(lineage),
        "changed_inputs": changed,
        "input_keys": input_keys,
        "input_samples": input_samples,
        "psnr_db": float(np.mean(decoded)) if decoded else None,
        "psnr_db_min": float(np.min(decoded)) if decoded else None,
        "psnr_db_recorded": manifest.sidecar.quality_psnr_db(),
        "decoded": len(decoded),
        "uncommitted_files": uncommitted,
    }
    write_json_atomic(join_url(cfg.output, REPORT_FILE), report)
    return report


def _validate(cfg: VerifyConfig) -> None:
    if cfg.samples < 0:
        raise ValueError(f"verify.samples must be >= 0, got {cfg.samples}")
    if cfg.psnr_margin_db < 0:
        raise ValueError(f"verify.psnr_margin_db must be >= 0, got {cfg.psnr_margin_db}")
