"""The identity of an encode job: what must not change between a run and its resumption.

Written to ``{output}/_encode/job.json`` before any work. A later run into the same output
compares its own identity field by field and refuses to mix latents of another encoder,
preprocessing, storage format or input list into the corpus. Settings that cannot change the
bytes written (batch size, actor count, threads, progress) are deliberately not part of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
from typing import Any

import fsspec

from pipeline.contracts.layout import MANIFEST_FILE, MANIFEST_VERSION
from pipeline.latents.format import (
    MANIFEST_FORMAT,
    job_url,
    join_url,
    read_json,
    write_json_atomic,
)

log = logging.getLogger(__name__)


class EncodeConflictError(ValueError):
    """The output location holds (part of) a corpus made with different settings."""


def inputs_digest(urls: list[str]) -> str:
    """sha256 of the input list (order matters: a unit is an index into it)."""
    return hashlib.sha256("\n".join(urls).encode("utf-8")).hexdigest()


def job_identity(cfg, sidecar, preprocess, urls: list[str]) -> dict[str, Any]:
    """Everything that determines the bytes of the corpus (see module docstring). The input
    list is named by count and hash: job.json stays small for a million input shards."""
    checkpoint_scale = sidecar.scaling_source == "checkpoint"
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "encoder_sha256": sidecar.onnx_sha256,
        "codebook_sha256": sidecar.vq.codebook_sha256 if sidecar.is_vq else None,
        "scaling": {
            "scaling_source": "checkpoint",
            "scaling_factor": sidecar.scaling_factor,
            "shift_factor": sidecar.shift_factor,
        }
        if checkpoint_scale
        else {"scaling_source": "data"},
        "fp16_model": bool(cfg.fp16_model),
        "preprocess": dataclasses.asdict(preprocess),
        "storage": dataclasses.asdict(cfg.storage),
        "prefix": cfg.prefix,
        "inputs_count": len(urls),
        "inputs_sha256": inputs_digest(urls),
    }


def _describe(name: str, old: Any, new: Any) -> str:
    if name == "inputs_sha256":
        return "inputs (other input shards, or the same in another order)"
    text = f"{name}: {json.dumps(old)} -> {json.dumps(new)}"
    return text if len(text) <= 200 else text[:197] + "..."


def claim_output(output: str, prefix: str, identity: dict[str, Any]) -> bool:
    """Record ``identity`` for a fresh output, or check it against the recorded one.

    Returns True when the output already held this job (a resumption). Raises
    EncodeConflictError, naming what differs, when the output belongs to another job.
    """
    url = job_url(output)
    try:
        recorded = read_json(url)
    except FileNotFoundError:
        _refuse_foreign(output, prefix)
        write_json_atomic(url, identity)
        return False
    changed = [k for k in identity.keys() | recorded.keys() if identity.get(k) != recorded.get(k)]
    if changed:
        details = "; ".join(_describe(k, recorded.get(k), identity.get(k)) for k in sorted(changed))
        raise EncodeConflictError(
            f"{output} holds latents of a different encode job ({details}). Latents of "
            "different settings must not be mixed: choose a new output, or delete this one "
            "to start over"
        )
    return True


def _refuse_foreign(output: str, prefix: str) -> None:
    """An output without job.json must not already hold a corpus (e.g. an older format)."""
    fs, path = fsspec.core.url_to_fs(output)
    found = fs.glob(posixpath.join(path, f"{prefix}-*.tar"))
    if fs.exists(posixpath.join(path, MANIFEST_FILE)) or found:
        raise EncodeConflictError(
            f"{output} already holds latent shards that no encode job of this format recorded "
            f"(no {join_url('_encode', 'job.json')}); choose a new output directory"
        )
