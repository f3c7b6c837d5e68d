"""Latent corpora for diffusion training: the on-disk format and its readers.

``LatentDataset`` (torch IterableDataset, DDP- and worker-aware) and ``read_latents`` (Ray Data)
yield latents already shifted and scaled, with captions and size conditioning; both trust only
committed, checksum-verified shards. ``verify_corpus`` checks a corpus against its input.
Exports resolve lazily so ``import pipeline.latents`` pays for neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CorpusError": "pipeline.latents.format",
    "load_manifest": "pipeline.latents.format",
    "iter_latents": "pipeline.latents.format",
    "read_rejects": "pipeline.latents.format",
    "read_commits": "pipeline.latents.format",
    "load_codebook": "pipeline.latents.format",
    "load_manifest_codebook": "pipeline.latents.format",
    "lookup_codebook": "pipeline.latents.format",
    "decode_latent": "pipeline.latents.format",
    "LatentDataset": "pipeline.latents.dataset",
    "read_latents": "pipeline.latents.raydata",
    "VerifyConfig": "pipeline.latents.verify",
    "verify_corpus": "pipeline.latents.verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.latents' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
