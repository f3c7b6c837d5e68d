"""Reading and writing the latent-shard format produced by ``encode_corpus``.

A latent corpus is a directory holding WebDataset tar shards (one sample per input image: the
posterior mean under ``latent.npy`` plus the input's non-image fields, unchanged), ``index.json``,
``rejects.jsonl`` and ``manifest.json``. The manifest is written last, so its presence marks a
finished run. ``latent.npy`` is plain ``numpy.lib.format`` (never pickled), which
``webdataset.decode()`` and ``ray.data.read_webdataset`` both read.
"""

from __future__ import annotations

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
