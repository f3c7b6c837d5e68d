"""Latent corpora for diffusion training: the readers of the on-disk format.

``LatentDataset`` (torch IterableDataset, DDP- and worker-aware) and ``read_latents`` (Ray Data)
yield latents already shifted and scaled, with captions and size conditioning; both trust only
committed, checksum-verified shards. The manifest and its shard list are typed contracts
(:mod:`pipeline.contracts.manifest`). This package imports nothing of encode, export or train;
``latentpipe verify`` lives in :mod:`pipeline.verify`.
Exports resolve lazily so ``import pipeline.latents`` pays for neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CorpusError": "pipeline.contracts.manifest",
    "Manifest": "pipeline.contracts.manifest",
    "ShardEntry": "pipeline.contracts.manifest",
    "InputLineage": "pipeline.contracts.manifest",
    "load_manifest": "pipeline.contracts.manifest",
    "iter_shard_entries": "pipeline.contracts.manifest",
    "iter_inputs": "pipeline.contracts.manifest",
    "manifest_shards": "pipeline.contracts.manifest",
    "iter_latents": "pipeline.latents.format",
    "read_rejects": "pipeline.latents.format",
    "read_commits": "pipeline.latents.format",
    "load_codebook": "pipeline.latents.format",
    "load_manifest_codebook": "pipeline.latents.format",
    "lookup_codebook": "pipeline.latents.format",
    "decode_latent": "pipeline.latents.format",
    "ChannelStats": "pipeline.latents.stats",
    "CodeUsage": "pipeline.latents.stats",
    "LatentDataset": "pipeline.latents.dataset",
    "read_latents": "pipeline.latents.raydata",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.latents' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
