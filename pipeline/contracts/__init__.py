"""Typed contracts between the stages: the encoder sidecar and the latent-corpus manifest.

A leaf package (stdlib, numpy and fsspec only; names and paths in ``layout``): export writes a :class:`Sidecar`, encode reads
it and writes a :class:`Manifest` with its ``shards.jsonl`` and ``inputs.jsonl``, and
``pipeline.latents`` and ``latentpipe verify`` read them back, all through these dataclasses,
each validated on load with errors that name the field and the file.
"""

from pipeline.contracts.manifest import (
    CorpusError,
    EncoderRef,
    InputLineage,
    JsonlDigest,
    LatentSpec,
    Manifest,
    ShardEntry,
    check_encoder,
    iter_inputs,
    iter_shard_entries,
    load_manifest,
    manifest_shards,
    write_jsonl,
)
from pipeline.contracts.sidecar import (
    InputSpec,
    ModelRef,
    Sidecar,
    SidecarError,
    VQSpec,
    build_sidecar,
    file_sha256,
    index_dtype,
    load_sidecar,
    sidecar_path,
    vq_fields,
    with_quality,
    write_sidecar,
)

__all__ = [
    "CorpusError",
    "EncoderRef",
    "InputLineage",
    "InputSpec",
    "JsonlDigest",
    "LatentSpec",
    "Manifest",
    "ModelRef",
    "ShardEntry",
    "Sidecar",
    "SidecarError",
    "VQSpec",
    "build_sidecar",
    "check_encoder",
    "file_sha256",
    "index_dtype",
    "iter_inputs",
    "iter_shard_entries",
    "load_manifest",
    "load_sidecar",
    "manifest_shards",
    "sidecar_path",
    "vq_fields",
    "with_quality",
    "write_jsonl",
    "write_sidecar",
]
