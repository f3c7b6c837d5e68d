"""Turn image shards into latent shards with a Ray Data pipeline around an ONNX encoder.

Exports are resolved lazily so that importing ``pipeline.encode.session`` (or the CLI's help)
does not pay for importing Ray.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "EncodeConfig": "pipeline.encode.job",
    "encode_corpus": "pipeline.encode.job",
    "load_manifest": "pipeline.encode.latents",
    "iter_latents": "pipeline.encode.latents",
    "load_codebook": "pipeline.encode.latents",
    "load_manifest_codebook": "pipeline.encode.latents",
    "lookup_codebook": "pipeline.encode.latents",
    "read_rejects": "pipeline.encode.latents",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.encode' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
