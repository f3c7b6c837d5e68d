"""Turn image shards into latent shards with a Ray Data pipeline around an ONNX encoder.

Exports are resolved lazily so that importing ``pipeline.encode.session`` (or the CLI's help)
does not pay for importing Ray.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "EncodeConfig": "pipeline.encode.config",
    "StorageConfig": "pipeline.encode.config",
    "PreprocessConfig": "pipeline.encode.preprocess",
    "EncodeConflictError": "pipeline.encode.identity",
    "encode_corpus": "pipeline.encode.job",
    "EncodeCapacityError": "pipeline.encode.job",
    "EncodeIncompleteError": "pipeline.encode.job",
    "EncodeOverflowError": "pipeline.encode.job",
    "EncodeStalledError": "pipeline.encode.job",
    "LeaseHeldError": "pipeline.encode.lease",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.encode' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
