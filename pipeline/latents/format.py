"""Reading and writing the pieces of a latent corpus: .npy arrays, latent shards, codebooks.

The corpus layout and the manifest are contracts of :mod:`pipeline.contracts` (``layout`` names
every file; ``manifest`` types and reads ``manifest.json``, ``shards.jsonl`` and
``inputs.jsonl``); their names are re-exported here for readers that import them from
``pipeline.latents``.

Arrays are plain ``numpy.lib.format`` (never pickled). bfloat16, which .npy cannot describe, is
stored as its uint16 bit pattern (manifest ``latent.dtype == "bfloat16"``,
``latent.storage_dtype == "uint16"``); :func:`decode_latent` turns it back into float32.

Readers trust only shards listed in a manifest's ``shards.jsonl`` (or, for a partial corpus, in
commit records), and check each one's size and sha256 before yielding any of its samples.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec
import ml_dtypes  # bfloat16 for numpy: onnx already depends on it
import numpy as np

from pipeline.contracts.layout import (  # noqa: F401  (re-exported: the corpus's names)
    CODEBOOK_FILE,
    COMMITS_DIR,
    INDICES_FIELD,
    INPUTS_FILE,
    JOB_FILE,
    LATENT_FIELD,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    MEAN_KIND,
    REJECTS_FILE,
    SAMPLE_KIND,
    SHARDS_FILE,
    SIZES_FIELD,
    STATE_DIR,
    STD_FIELD,
    STORED_DTYPES,
    VQ_KIND,
    commit_url,
    commits_url,
    is_local,
    job_url,
    join_url,
    read_json,
    shard_name,
    storage_dtype,
)
from pipeline.contracts.manifest import (  # noqa: F401  (re-exported)
    CorpusError,
    LatentSpec,
    Manifest,
    ShardEntry,
    check_encoder,
    iter_shard_entries,
    load_manifest,
    manifest_shards,
)
from pipeline.data.tario import split_member_name

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
    return np.ascontiguousarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return np.ascontiguousarray(bits, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)


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


# ----------------------------------------------------------------------------- corpus files


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


def iter_shard(directory: str, entry: ShardEntry) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, files) of one committed shard, after checking its size and sha256."""
    url = join_url(directory, entry.name)
    data = read_verified(url, entry.sha256, entry.bytes)
    count = 0
    for key, files in iter_tar_bytes(data, url):
        count += 1
        yield key, files
    if count != entry.samples:
        raise CorpusError(f"{url} holds {count} samples, its shard entry says {entry.samples}")


def iter_latents(directory: str) -> Iterator[tuple[str, np.ndarray, dict[str, bytes]]]:
    """``(key, stored, extras)`` for every sample of a finished corpus, in shards.jsonl order.

    ``stored`` is the raw encoder output (float32 latent, unscaled; or integer VQ indices);
    ``extras`` holds every other field as bytes keyed by extension (txt, json, sizes.json, ...).
    For scaled training batches use :class:`pipeline.latents.LatentDataset`.
    """
    manifest = load_manifest(directory)
    # Check shards.jsonl whole before yielding anything, without holding the shard list: one
    # streaming pass to verify it, a second to read.
    collections.deque(iter_shard_entries(directory, manifest), maxlen=0)
    for entry in iter_shard_entries(directory, manifest):
        for key, files in iter_shard(directory, entry):
            stored = decode_stored(files, manifest.latent, f"{entry.name}: sample {key!r}")
            del files[manifest.latent.field]
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


def load_manifest_codebook(directory: str, manifest: Manifest | None = None) -> np.ndarray:
    """The hash-checked codebook of a VQ latent corpus (its manifest's ``latent.codebook_file``)."""
    latent = (manifest or load_manifest(directory)).latent
    if not latent.is_vq:
        raise ValueError(f"{directory} holds {latent.kind!r} latents, not {VQ_KIND!r}")
    return load_codebook(join_url(directory, latent.codebook_file), latent.codebook_sha256)


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
# decodes shards needs no torch; the (summary-only) manifest is small enough to ship to tasks.

VQ_OUTPUTS = ("latents", "indices")


def select_shards(
    entries: list[ShardEntry], directory: str, names: list[str] | None = None
) -> list[ShardEntry]:
    """The corpus's shard entries (``manifest_shards``), or the ones called ``names`` (in that
    order).

    Only committed shards can be selected: a file that merely sits in the directory may be a
    leftover of an interrupted run and is refused.
    """
    if names is None:
        return list(entries)
    by_name = {entry.name: entry for entry in entries}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise CorpusError(f"{unknown[0]!r} is not a committed shard of {directory}")
    if len(set(names)) != len(names):
        raise ValueError(f"shards= names a shard twice: {names}")
    return [by_name[name] for name in names]


def read_shard(directory: str, entry: ShardEntry) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of one committed shard, read whole: size, sha256 and sample count are all
    checked before the caller sees any sample, so a damaged shard yields nothing."""
    return list(iter_shard(directory, entry))


def decode_stored(files: dict[str, bytes], latent: LatentSpec, where: str) -> np.ndarray:
    """The stored encoder output of one sample: float32 latent [C, h, w] (unscaled) or integer
    VQ indices [h, w]. ``latent`` is the manifest's ``latent`` section."""
    if latent.field not in files:
        raise CorpusError(f"{where}: no {latent.field!r} member")
    if not latent.is_vq:
        return decode_latent(files[latent.field], latent.dtype)
    indices = decode_npy(files[latent.field])
    if indices.dtype != np.dtype(latent.dtype):
        raise CorpusError(f"{where}: indices are {indices.dtype}, the manifest says {latent.dtype}")
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


def scale_latent(latent: np.ndarray, manifest: Manifest) -> np.ndarray:
    """Encoder latent -> diffusion input: (latent - shift_factor) * scaling_factor, float32."""
    shift = np.float32(manifest.shift_factor)
    scale = np.float32(manifest.scaling_factor)
    return ((latent.astype(np.float32) - shift) * scale).astype(np.float32)


def decode_sample(
    key: str,
    files: dict[str, bytes],
    manifest: Manifest,
    entry: ShardEntry,
    codebook: np.ndarray | None = None,
    vq_output: str = "latents",
) -> dict[str, Any]:
    """One shard sample -> training fields (numpy): key, caption, the sizes, and ``latent``
    (float32, shifted and scaled) or, for VQ with ``vq_output="indices"``, ``indices`` (int64,
    unscaled); plus ``std`` (scaled) when the corpus stores it. VQ latents need ``codebook``."""
    where = f"{entry.name}: sample {key!r}"
    latent = manifest.latent
    stored = decode_stored(files, latent, where)
    if list(stored.shape) != list(entry.latent_shape):
        raise CorpusError(
            f"{where}: stored shape {list(stored.shape)}, the shard's is {entry.latent_shape}"
        )
    out: dict[str, Any] = {"key": key, "caption": sample_caption(files)}
    out.update(sample_sizes(files, where))
    if latent.is_vq and vq_output == "indices":
        out["indices"] = stored.astype(np.int64)
        return out
    if latent.is_vq:
        if codebook is None:
            raise ValueError("VQ latents need the corpus codebook (load_manifest_codebook)")
        stored = lookup_codebook(stored, codebook)
    out["latent"] = scale_latent(stored, manifest)
    if latent.std_field and latent.std_field in files:
        std = decode_latent(files[latent.std_field], latent.dtype)
        out["std"] = (std * np.float32(manifest.scaling_factor)).astype(np.float32)
    return out
