"""Reading and writing the latent-shard format produced by ``encode_corpus``.

A latent corpus is a directory holding WebDataset tar shards (one sample per input image: the
posterior mean under ``latent.npy`` plus the input's non-image fields, unchanged), ``index.json``,
``rejects.jsonl`` and ``manifest.json``. The manifest is written last, so its presence marks a
finished run. ``latent.npy`` is plain ``numpy.lib.format`` (never pickled), which
``webdataset.decode()`` and ``ray.data.read_webdataset`` both read.

VQ encoders store code indices instead: ``indices.npy``, [h, w] uint16 (int32 beyond 65536 codes),
manifest ``latent.kind == "vq_indices"``. The corpus then carries ``codebook.npy`` (float32
[num_codes, code_dim], pinned by ``latent.codebook_sha256``), so it can be turned back into
quantized latents without the encoder: ``lookup_codebook(indices, load_manifest_codebook(dir))``.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np

MANIFEST_FORMAT = "latentpipe.latents"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
REJECTS_FILE = "rejects.jsonl"
LATENT_FIELD = "latent.npy"
INDICES_FIELD = "indices.npy"
VQ_KIND = "vq_indices"
CODEBOOK_FILE = "codebook.npy"


def join_url(base: str, name: str) -> str:
    """Join a directory URL/path and a file name without mangling the ``scheme://`` part."""
    return base.rstrip("/") + "/" + name


def encode_npy(array: np.ndarray) -> bytes:
    """Serialise ``array`` as .npy bytes (pickle disabled: object arrays are refused)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Parse .npy bytes without ever unpickling."""
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def load_manifest(directory: str) -> dict[str, Any]:
    """Read and validate ``{directory}/manifest.json`` of a finished encode run."""
    path = join_url(directory, MANIFEST_FILE)
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a finished latent corpus "
            "(the manifest is written last; an interrupted run has none)"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{path}: not a latentpipe latent manifest (format != {MANIFEST_FORMAT!r})"
        )
    version = manifest.get("format_version")
    if version != MANIFEST_VERSION:
        raise ValueError(
            f"{path}: unsupported format_version {version!r} (this reader knows {MANIFEST_VERSION})"
        )
    for field in ("latent", "shards", "samples"):
        if field not in manifest:
            raise ValueError(f"{path}: missing required field {field!r}")
    return manifest


def iter_latents(directory: str) -> Iterator[tuple[str, np.ndarray, dict[str, bytes]]]:
    """Yield ``(key, latent, extras)`` for every sample of the shards listed in the manifest.

    ``extras`` holds the sample's other fields as raw bytes keyed by extension (json, txt, ...).
    """
    from pipeline.data.tario import iter_tar_samples

    manifest = load_manifest(directory)
    field = manifest["latent"].get("field", LATENT_FIELD)
    for shard in manifest["shards"]:
        url = join_url(directory, shard["name"])
        for sample in iter_tar_samples(url):
            files = dict(sample.files)
            if field not in files:
                raise ValueError(f"{url}: sample {sample.key!r} has no {field!r} member")
            latent = decode_npy(files.pop(field))
            yield sample.key, latent, files


def read_rejects(directory: str) -> list[dict[str, Any]]:
    """Return the records of ``{directory}/rejects.jsonl`` (empty list when nothing was rejected)."""
    path = join_url(directory, REJECTS_FILE)
    fs, fpath = fsspec.core.url_to_fs(path)
    if not fs.exists(fpath):
        return []
    with fs.open(fpath, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_verified(url: str, sha256: str | None = None) -> bytes:
    """The bytes of ``url``; raises ValueError when they do not hash to ``sha256`` (if given)."""
    with fsspec.open(url, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ValueError(
            f"sha256 of {url} is {digest}, expected {sha256}: the codebook was changed or replaced"
        )
    return data


def parse_codebook(data: bytes, where: str = "codebook") -> np.ndarray:
    """.npy bytes -> float32 [num_codes, code_dim], refusing anything else."""
    codebook = decode_npy(data)
    if codebook.ndim != 2 or codebook.dtype != np.float32:
        raise ValueError(
            f"{where}: expected float32 [num_codes, code_dim], got {codebook.dtype}"
            f"{list(codebook.shape)}"
        )
    return codebook


def load_codebook(url: str, sha256: str | None = None) -> np.ndarray:
    """Load a VQ ``codebook.npy`` (local path or fsspec URL), hash-checked when ``sha256`` given."""
    return parse_codebook(read_verified(url, sha256), url)


def load_manifest_codebook(directory: str, manifest: dict[str, Any] | None = None) -> np.ndarray:
    """The hash-checked codebook of a VQ latent corpus (its manifest's ``latent.codebook_file``)."""
    latent = (manifest or load_manifest(directory))["latent"]
    if latent.get("kind") != VQ_KIND:
        raise ValueError(f"{directory} holds {latent.get('kind')!r} latents, not {VQ_KIND!r}")
    return load_codebook(join_url(directory, latent["codebook_file"]), latent["codebook_sha256"])


def lookup_codebook(indices: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Stored indices [h, w] (or [N, h, w]), any integer dtype -> quantized latents [C, h, w]
    (or [N, C, h, w]) in the codebook's dtype: exactly the encoder's ``quantized`` output."""
    if not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"indices must be integers, got {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= len(codebook)):
        raise ValueError(
            f"indices span [{indices.min()}, {indices.max()}] but the codebook has "
            f"{len(codebook)} codes"
        )
    return np.moveaxis(codebook[indices.astype(np.intp)], -1, -3)
