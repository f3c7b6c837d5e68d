"""Names and paths of a latent corpus directory (format v3): what sits where, and what it is called.

A latent corpus is a directory (any fsspec URL) holding:

  {prefix}-{unit:06d}.tar            one shard per input shard ("unit") in centre-crop mode, or
  {prefix}-{unit:06d}-h{H}w{W}.tar   one per (unit, bucket) in aspect-ratio-bucket mode, so every
                                     sample of a shard has the same latent shape and batches stack
  _encode/job.json                   the job's identity (encoder, preprocessing, storage, and the
                                     inputs as a count and a sha256); a re-run with a different
                                     identity is refused
  _encode/commits/u{unit:06d}.json   per-unit commit record, written after the unit's shards
  _encode/lease.json                 the running job's lease
  rejects.jsonl                      {"key", "shard", "reason"} per rejected input sample
  shards.jsonl                       one :class:`~pipeline.contracts.manifest.ShardEntry` a line
  inputs.jsonl                       one :class:`~pipeline.contracts.manifest.InputLineage` a line
  index.json, encode-config.yaml, codebook.npy (VQ)
  manifest.json                      written last (summary only, pins the two .jsonl files by
                                     sha256): the corpus is finished

Shard samples hold the encoder output (``latent.npy``: KL posterior mean or a per-key seeded
sample; or ``indices.npy``: VQ code indices), optionally ``std.npy``, ``sizes.json``
({"original_size": [h, w], "crop_top_left": [top, left], "target_size": [h, w]}, SDXL's
micro-conditioning) and every non-image field of the input sample, byte for byte.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec

MANIFEST_FORMAT = "latentpipe.latents"
MANIFEST_VERSION = 3
MANIFEST_FILE = "manifest.json"
SHARDS_FILE = "shards.jsonl"
INPUTS_FILE = "inputs.jsonl"
REJECTS_FILE = "rejects.jsonl"
INDEX_FILE = "index.json"
CODEBOOK_FILE = "codebook.npy"
STATE_DIR = "_encode"
JOB_FILE = "job.json"
COMMITS_DIR = "commits"

LATENT_FIELD = "latent.npy"
STD_FIELD = "std.npy"
SIZES_FIELD = "sizes.json"
INDICES_FIELD = "indices.npy"

MEAN_KIND = "posterior_mean"
SAMPLE_KIND = "posterior_sample"
VQ_KIND = "vq_indices"
LATENT_KINDS = (MEAN_KIND, SAMPLE_KIND, VQ_KIND)

STORED_DTYPES = ("float16", "bfloat16", "float32")  # KL latents
INDEX_DTYPES = ("uint16", "int32")  # VQ code indices


def join_url(base: str, name: str) -> str:
    """Join a directory URL/path and a relative name without mangling the ``scheme://`` part."""
    return base.rstrip("/") + "/" + name


def shard_name(prefix: str, unit: int, bucket: tuple[int, int] | None = None) -> str:
    """Output shard of input shard ``unit`` (and ``bucket`` = (height, width) in bucket mode)."""
    if bucket is None:
        return f"{prefix}-{unit:06d}.tar"
    return f"{prefix}-{unit:06d}-h{bucket[0]}w{bucket[1]}.tar"


def job_url(directory: str) -> str:
    return join_url(directory, f"{STATE_DIR}/{JOB_FILE}")


def commits_url(directory: str) -> str:
    return join_url(directory, f"{STATE_DIR}/{COMMITS_DIR}")


def commit_url(directory: str, unit: int) -> str:
    return join_url(commits_url(directory), f"u{unit:06d}.json")


def storage_dtype(dtype: str) -> str:
    """The numpy dtype a stored dtype is written as in .npy (bfloat16 travels as uint16 bits)."""
    if dtype not in STORED_DTYPES:
        raise ValueError(f"latent dtype must be one of {list(STORED_DTYPES)}, got {dtype!r}")
    return "uint16" if dtype == "bfloat16" else dtype


def is_local(url: str) -> bool:
    """True for local paths/``file://`` (which can rename atomically), False for object stores."""
    fs, _ = fsspec.core.url_to_fs(url)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def read_json(url: str) -> dict[str, Any]:
    """A JSON object from ``url`` (FileNotFoundError / json.JSONDecodeError pass through)."""
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{url}: expected a JSON object")
    return data
