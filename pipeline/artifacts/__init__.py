"""Model artifacts: a trained (or imported) autoencoder as a self-describing directory.

Weights as safetensors plus JSON describing the model (:mod:`pipeline.artifacts.card`); a KL
model's directory is a diffusers ``AutoencoderKL`` directory (``AutoencoderKL.from_pretrained``
loads it), an l2 VQ model's a diffusers ``VQModel`` one. Export, evaluation, the report, verify,
the demo and ``latentpipe import`` read and write these; training checkpoints hold one in
``model/`` with the trainer's own state beside it.

This package imports only ``pipeline.models``, ``pipeline.contracts`` and ``pipeline.config``
(tested). Exports resolve lazily so the torch-free parts (the card, the content hash) import
without torch: ``latentpipe verify`` hashes artifacts before it decides to decode anything.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ArtifactError": "pipeline.artifacts.card",
    "ImageSpec": "pipeline.artifacts.card",
    "LatentScale": "pipeline.artifacts.card",
    "ModelCard": "pipeline.artifacts.card",
    "Provenance": "pipeline.artifacts.card",
    "artifact_sha256": "pipeline.artifacts.card",
    "checkpoint_of": "pipeline.artifacts.card",
    "read_card": "pipeline.artifacts.card",
    "resolve_model_dir": "pipeline.artifacts.card",
    "load_model_artifact": "pipeline.artifacts.store",
    "save_model_artifact": "pipeline.artifacts.store",
    "update_model_artifact": "pipeline.artifacts.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.artifacts' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
