"""The latent-corpus format written by ``latentpipe encode`` and read by ``pipeline.latents``.

A latent corpus is a directory (any fsspec URL) holding:

  {prefix}-{unit:06d}.tar            one shard per input shard ("unit") in centre-crop mode, or
  {prefix}-{unit:06d}-h{H}w{W}.tar   one per (unit, bucket) in aspect-ratio-bucket mode, so every
                                     sample of a shard has the same latent shape and batches stack
  _encode/job.json                   the job's identity (encoder, preprocessing, storage, inputs);
                                     a re-run with a different identity is refused
  _encode/commits/u{unit:06d}.json   per-unit commit record, written after the unit's shards
  rejects.jsonl                      {"key", "shard", "reason"} per rejected input sample
  index.json, encode-config.yaml, codebook.npy (VQ)
  manifest.json                      written last: the corpus is finished

Shard samples hold the encoder output (``latent.npy``: KL posterior mean or a per-key seeded
sample; or ``indices.npy``: VQ code indices), optionally ``std.npy``, ``sizes.json``
({"original_size": [h, w], "crop_top_left": [top, left], "target_size": [h, w]}, SDXL's
micro-conditioning) and every non-image field of the input sample, byte for byte.

Arrays are plain ``numpy.lib.format`` (never pickled). bfloat16, which .npy cannot describe, is
stored as its uint16 bit pattern (manifest ``latent.dtype == "bfloat16"``,
``latent.storage_dtype == "uint16"``); :func:`decode_latent` turns it back into float32.

Readers trust only shards listed in a manifest (or, for a partial corpus, in commit records),
and check each one's size and sha256 before yielding any of its samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np

MANIFEST_FORMAT = "latentpipe.latents"
MANIFEST_VERSION = 2
MANIFEST_FILE = "manifest.json"
REJECTS_FILE = "rejects.jsonl"
STATE_DIR = "_encode"
JOB_FILE = "job.json"
COMMITS_DIR = "commits"
LATENT_FIELD = "latent.npy"
STD_FIELD = "std.npy"
SIZES_FIELD = "sizes.json"
INDICES_FIELD = "indices.npy"
VQ_KIND = "vq_indices"
MEAN_KIND = "posterior_mean"
SAMPLE_KIND = "posterior_sample"
CODEBOOK_FILE = "codebook.npy"
STORED_DTYPES = ("float16", "bfloat16", "float32")


class CorpusError(ValueError):
    """A latent corpus is unfinished, inconsistent, or not the one the caller expects."""


# ----------------------------------------------------------------------------- names and paths


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


def is_local(url: str) -> bool:
    """True for local paths/``file://`` (which can rename atomically), False for object stores."""
    fs, _ = fsspec.core.url_to_fs(url)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


# ----------------------------------------------------------------------------- arrays


def encode_npy(array: np.ndarray) -> bytes:
    """Serialise ``array`` as .npy bytes (pickle disabled: object arrays are refused)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Parse .npy bytes without ever unpickling."""
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch does."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    bits = rounded.astype(np.uint16)
    bits[np.isnan(f)] = 0x7FC0  # a quiet NaN (the rounding could carry into the sign bit)
    return bits


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def storage_dtype(dtype: str) -> str:
    """The numpy dtype a stored dtype is written as in .npy (bfloat16 travels as uint16 bits)."""
    if dtype not in STORED_DTYPES:
        raise ValueError(f"latent dtype must be one of {list(STORED_DTYPES)}, got {dtype!r}")
    return "uint16" if dtype == "bfloat16" else dtype


def encode_latent(array: np.ndarray, dtype: str) -> bytes:
    """float latent -> .npy bytes in the stored ``dtype`` (float16 | bfloat16 | float32)."""
    if dtype == "bfloat16":
        return encode_npy(to_bfloat16_bits(array))
    return encode_npy(np.asarray(array).astype(storage_dtype(dtype)))


def stored_values(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values exactly as a reader will see them after storing ``array`` as ``dtype``."""
    if dtype == "bfloat16":
        return from_bfloat16_bits(to_bfloat16_bits(array))
    return np.asarray(array).astype(storage_dtype(dtype)).astype(np.float32)


def decode_latent(data: bytes, dtype: str) -> np.ndarray:
    """.npy bytes written by :func:`encode_latent` -> float32 array."""
    raw = decode_npy(data)
    if raw.dtype != np.dtype(storage_dtype(dtype)):
        raise CorpusError(f"stored latent is {raw.dtype}, the manifest says {dtype}")
    if dtype == "bfloat16":
        return from_bfloat16_bits(raw)
    return raw.astype(np.float32)


# ----------------------------------------------------------------------------- files


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json(url: str) -> dict[str, Any]:
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{url}: expected a JSON object")
    return data


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Make ``url`` hold ``data`` all at once: temporary name + rename on filesystems that have
    rename; one PUT (which object stores apply atomically) elsewhere."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if not is_local(url):
        fs.pipe_file(path, data)
        return
    tmp = posixpath.join(posixpath.dirname(path), "." + posixpath.basename(path) + ".tmp")
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_json_atomic(url: str, data: dict[str, Any]) -> None:
    write_bytes_atomic(url, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def read_verified(url: str, sha256: str | None = None, size: int | None = None) -> bytes:
    """The bytes of ``url``; raises CorpusError when they do not match ``size``/``sha256``."""
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CorpusError(f"{url} is listed as committed but does not exist") from None
    if size is not None and len(data) != size:
        raise CorpusError(f"{url} has {len(data)} bytes, its commit record says {size}")
    digest = sha256_bytes(data)
    if sha256 is not None and digest != sha256:
        raise CorpusError(
            f"sha256 of {url} is {digest}, its commit record says {sha256}: "
            "the file was changed, truncated or replaced after it was committed"
        )
    return data


def iter_tar_bytes(data: bytes, where: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, files) of a latent shard held in memory (written by the encode job: contiguous
    members ``key.ext``). ``where`` names the shard in errors."""
    from pipeline.data.tario import split_member_name

    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                member_key, ext = split_member_name(member.name)
                if member_key is None or ext is None:
                    raise CorpusError(f"{where}: unexpected member {member.name!r}")
                if key is not None and member_key != key:
                    yield key, files
                    files = {}
                key = member_key
                handle = tf.extractfile(member)
                files[ext] = handle.read() if handle is not None else b""
    except tarfile.TarError as e:
        raise CorpusError(f"{where}: not a readable tar: {e}") from None
    if key is not None:
        yield key, files


# ----------------------------------------------------------------------------- manifest


def load_manifest(directory: str, expected_encoder_sha256: str | None = None) -> dict[str, Any]:
    """Read and validate ``{directory}/manifest.json`` of a finished encode run.

    Raises FileNotFoundError for an unfinished corpus (naming how many units are committed),
    CorpusError for an unusable one: wrong format/version, no scaling factor, an encoder other
    than ``expected_encoder_sha256``.
    """
    path = join_url(directory, MANIFEST_FILE)
    try:
        manifest = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a finished latent corpus"
            f"{_progress_hint(directory)}"
        ) from None
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CorpusError(
            f"{path}: not a latentpipe latent manifest (format != {MANIFEST_FORMAT!r})"
        )
    version = manifest.get("format_version")
    if version != MANIFEST_VERSION:
        raise CorpusError(
            f"{path}: format_version {version!r}, this latentpipe reads {MANIFEST_VERSION}; "
            "re-encode the corpus with this version"
        )
    for field in ("latent", "shards", "samples", "encoder"):
        if field not in manifest:
            raise CorpusError(f"{path}: missing required field {field!r}")
    for field in ("scaling_factor", "shift_factor"):
        if not isinstance(manifest.get(field), int | float):
            raise CorpusError(f"{path}: missing or non-numeric {field!r}; cannot scale latents")
    check_encoder(manifest, expected_encoder_sha256, path)
    return manifest


def check_encoder(manifest: dict[str, Any], expected_sha256: str | None, where: str) -> None:
    """Refuse a corpus made by another encoder than the one the caller trains against."""
    actual = manifest.get("encoder", {}).get("sha256")
    if expected_sha256 is not None and actual != expected_sha256:
        raise CorpusError(
            f"{where}: latents were made by encoder sha256 {actual}, expected {expected_sha256}; "
            "a diffusion model must read latents of the autoencoder it will decode with"
        )


def _progress_hint(directory: str) -> str:
    try:
        fs, path = fsspec.core.url_to_fs(commits_url(directory))
        names = sorted(posixpath.basename(p) for p in fs.glob(posixpath.join(path, "u*.json")))
    except (OSError, ValueError):
        return ""
    if not names:
        return " (no unit committed yet)"
    # Name the units so a user can see how far the run got (and which one it stopped after).
    units = ", ".join(n.removesuffix(".json") for n in names[:8])
    units += ", ..." if len(names) > 8 else ""
    return (
        f" ({len(names)} unit(s) committed: {units}; re-run the same encode command to finish it)"
    )


def read_commits(directory: str) -> dict[int, dict[str, Any]]:
    """Commit records of ``directory`` keyed by unit (empty when none)."""
    fs, path = fsspec.core.url_to_fs(commits_url(directory))
    records = {}
    for name in sorted(fs.glob(posixpath.join(path, "u*.json"))):
        with fs.open(name, "rt", encoding="utf-8") as f:
            record = json.load(f)
        records[int(record["unit"])] = record
    return records


def read_rejects(directory: str) -> list[dict[str, Any]]:
    """The records of ``{directory}/rejects.jsonl`` (empty list when nothing was rejected)."""
    path = join_url(directory, REJECTS_FILE)
    fs, fpath = fsspec.core.url_to_fs(path)
    if not fs.exists(fpath):
        return []
    with fs.open(fpath, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def iter_shard(directory: str, entry: dict[str, Any]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, files) of one committed shard, after checking its size and sha256."""
    url = join_url(directory, entry["name"])
    data = read_verified(url, entry.get("sha256"), entry.get("bytes"))
    count = 0
    for key, files in iter_tar_bytes(data, url):
        count += 1
        yield key, files
    if count != entry["samples"]:
        raise CorpusError(f"{url} holds {count} samples, its commit record says {entry['samples']}")


def iter_latents(directory: str) -> Iterator[tuple[str, np.ndarray, dict[str, bytes]]]:
    """``(key, stored, extras)`` for every sample of a finished corpus, in manifest order.

    ``stored`` is the raw encoder output (float32 latent, unscaled; or integer VQ indices);
    ``extras`` holds every other field as bytes keyed by extension (txt, json, sizes.json, ...).
    For scaled training batches use :class:`pipeline.latents.LatentDataset`.
    """
    manifest = load_manifest(directory)
    latent = manifest["latent"]
    field = latent["field"]
    for entry in manifest["shards"]:
        for key, files in iter_shard(directory, entry):
            if field not in files:
                raise CorpusError(f"{entry['name']}: sample {key!r} has no {field!r} member")
            raw = files.pop(field)
            stored = (
                decode_npy(raw)
                if latent["kind"] == VQ_KIND
                else decode_latent(raw, latent["dtype"])
            )
            yield key, stored, files


# ----------------------------------------------------------------------------- VQ codebooks


def read_hashed(url: str, sha256: str | None = None) -> bytes:
    """The bytes of ``url``; raises ValueError when they do not hash to ``sha256`` (if given)."""
    with fsspec.open(url, "rb") as f:
        data = f.read()
    digest = sha256_bytes(data)
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
    return parse_codebook(read_hashed(url, sha256), url)


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


# ----------------------------------------------------------------------------- training readers
# Shared by LatentDataset (torch) and read_latents (Ray Data): numpy only, so a Ray task that
# decodes shards needs neither torch nor the manifest's full shard list.

VQ_OUTPUTS = ("latents", "indices")


def select_shards(
    manifest: dict[str, Any], directory: str, names: list[str] | None = None
) -> list[dict[str, Any]]:
    """The manifest's shard entries, or the ones called ``names`` (in that order).

    Only committed shards can be selected: a file that merely sits in the directory may be a
    leftover of an interrupted run and is refused.
    """
    entries = list(manifest["shards"])
    if names is None:
        return entries
    by_name = {entry["name"]: entry for entry in entries}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise CorpusError(f"{unknown[0]!r} is not a committed shard of {directory}")
    if len(set(names)) != len(names):
        raise ValueError(f"shards= names a shard twice: {names}")
    return [by_name[name] for name in names]


def read_shard(directory: str, entry: dict[str, Any]) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of one committed shard, read whole: size, sha256 and sample count are all
    checked before the caller sees any sample, so a damaged shard yields nothing."""
    return list(iter_shard(directory, entry))


def reader_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a manifest that :func:`decode_sample` needs (small enough to ship to tasks)."""
    return {k: manifest[k] for k in ("latent", "scaling_factor", "shift_factor")}


def decode_stored(files: dict[str, bytes], latent: dict[str, Any], where: str) -> np.ndarray:
    """The stored encoder output of one sample: float32 latent [C, h, w] (unscaled) or integer
    VQ indices [h, w]. ``latent`` is the manifest's ``latent`` section."""
    field = latent["field"]
    if field not in files:
        raise CorpusError(f"{where}: no {field!r} member")
    if latent["kind"] != VQ_KIND:
        return decode_latent(files[field], latent["dtype"])
    indices = decode_npy(files[field])
    if indices.dtype != np.dtype(latent["dtype"]):
        raise CorpusError(
            f"{where}: indices are {indices.dtype}, the manifest says {latent['dtype']}"
        )
    return indices


def sample_caption(files: dict[str, bytes]) -> str:
    """The ``txt`` field (UTF-8), else the ``caption`` of the ``json`` field, else ""."""
    if "txt" in files:
        return files["txt"].decode("utf-8", errors="replace")
    try:
        meta = json.loads(files.get("json", b"{}"))
    except ValueError:  # metadata is passed through byte for byte and may be anything
        return ""
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return caption if isinstance(caption, str) else ""


def sample_sizes(files: dict[str, bytes], where: str) -> dict[str, np.ndarray]:
    """SDXL size conditioning of one sample: original_size, crop_top_left, target_size as int64
    arrays of shape [2]."""
    try:
        sizes = json.loads(files[SIZES_FIELD])
        return {
            name: np.asarray(sizes[name], dtype=np.int64).reshape(2)
            for name in ("original_size", "crop_top_left", "target_size")
        }
    except (KeyError, ValueError, TypeError) as e:
        raise CorpusError(f"{where}: missing or malformed {SIZES_FIELD}: {e!r}") from None


def scale_latent(latent: np.ndarray, manifest: dict[str, Any]) -> np.ndarray:
    """Encoder latent -> diffusion input: (latent - shift_factor) * scaling_factor, float32."""
    shift = np.float32(manifest["shift_factor"])
    scale = np.float32(manifest["scaling_factor"])
    return ((latent.astype(np.float32) - shift) * scale).astype(np.float32)


def decode_sample(
    key: str,
    files: dict[str, bytes],
    manifest: dict[str, Any],
    entry: dict[str, Any],
    codebook: np.ndarray | None = None,
    vq_output: str = "latents",
) -> dict[str, Any]:
    """One shard sample -> training fields (numpy): key, caption, the sizes, and ``latent``
    (float32, shifted and scaled) or, for VQ with ``vq_output="indices"``, ``indices`` (int64,
    unscaled); plus ``std`` (scaled) when the corpus stores it. VQ latents need ``codebook``."""
    where = f"{entry['name']}: sample {key!r}"
    latent_meta = manifest["latent"]
    stored = decode_stored(files, latent_meta, where)
    if list(stored.shape) != list(entry["latent_shape"]):
        raise CorpusError(
            f"{where}: stored shape {list(stored.shape)}, the shard's is {entry['latent_shape']}"
        )
    out: dict[str, Any] = {"key": key, "caption": sample_caption(files)}
    out.update(sample_sizes(files, where))
    if latent_meta["kind"] == VQ_KIND and vq_output == "indices":
        out["indices"] = stored.astype(np.int64)
        return out
    if latent_meta["kind"] == VQ_KIND:
        if codebook is None:
            raise ValueError("VQ latents need the corpus codebook (load_manifest_codebook)")
        stored = lookup_codebook(stored, codebook)
    out["latent"] = scale_latent(stored, manifest)
    std_field = latent_meta.get("std_field")
    if std_field and std_field in files:
        std = decode_latent(files[std_field], latent_meta["dtype"])
        out["std"] = (std * np.float32(manifest["scaling_factor"])).astype(np.float32)
    return out
