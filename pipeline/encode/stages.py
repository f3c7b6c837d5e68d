"""Worker-side stages of the encode pipeline: read shards, decode images, run the ONNX encoder.

Rows travel through Ray/Arrow as plain columns only (nothing is pickled):
  key: str       sample key ("" when a truncated shard lost a sample whose key is unknown)
  shard: str     URL of the input shard
  extras: str    JSON object {ext: base64(bytes)} of the sample's non-image fields, carried verbatim
  reject: str    "" for good rows, otherwise the reason the sample is rejected
  image: bytes   raw image bytes (read stage only)
  pixels: uint8 [R, R, 3]       resized, centre-cropped image (decode stage; zeros on rejects)
  latent: float32 [C, h, w]     posterior mean (encoder stage; zeros on rejects), or for VQ
          encoders uint16/int32 [h, w] code indices (the sidecar's index_dtype)
Rejected samples stay in the stream as rows with a reason, so the driver sees every input key
exactly once and records it either in a latent shard or in rejects.jsonl.
Images cross the object store as uint8 (4x smaller than float32); the encoder actor normalises.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np

log = logging.getLogger(__name__)

UNKNOWN_KEY = ""
MAX_KEY_LEN = 512
SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
SAFE_EXT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def pack_extras(files: dict[str, bytes]) -> str:
    """Encode non-image fields as a JSON string (base64 values) for an Arrow string column."""
    return json.dumps({ext: base64.b64encode(data).decode("ascii") for ext, data in files.items()})


def unpack_extras(text: str) -> dict[str, bytes]:
    """Inverse of :func:`pack_extras`."""
    return {ext: base64.b64decode(data) for ext, data in json.loads(text).items()}


def _row(key: str, shard: str, image: bytes, extras: str, reject: str) -> dict[str, Any]:
    return {"key": key, "shard": shard, "image": image, "extras": extras, "reject": reject}


def key_problem(key: str) -> str:
    """Why ``key`` cannot name output tar members ("" when it is safe).

    Safe keys are what ``sanitize_key`` produces, optionally "/"-separated into sub-paths as
    WebDataset corpora often use (each segment [A-Za-z0-9_-]+, so never "..", "." or absolute).
    """
    from pipeline.data.keys import sanitize_key

    if not key:
        return "empty key"
    if len(key) > MAX_KEY_LEN or not SAFE_KEY.match(key):
        safe = sanitize_key(key)
        return f"unsafe key (not [A-Za-z0-9_-] path segments; sanitize_key gives {safe!r})"
    return ""


def _sample_row(key: str, files: dict[str, bytes], shard: str) -> dict[str, Any]:
    from pipeline.data.images import find_image_field

    problem = key_problem(key)
    if problem:
        return _row(key, shard, b"", "{}", problem)
    ext = find_image_field(files)
    if ext is None:
        return _row(key, shard, b"", "{}", f"no image field (fields: {sorted(files)})")
    extras = {e: data for e, data in files.items() if e != ext}
    bad = sorted(e for e in extras if not SAFE_EXT.match(e))
    if bad:
        return _row(key, shard, b"", "{}", f"unsupported field name(s) {bad}")
    return _row(key, shard, files[ext], pack_extras(extras), "")


def read_shard(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """flat_map stage: one input row ``{"url": ...}`` -> one row per sample of that shard.

    A truncated or corrupt tar yields its complete samples, then one reject row for the sample
    that was being read (its key, or "" when unknown) naming the shard and the error.
    """
    from pipeline.data.tario import TruncatedShardError, iter_tar_samples

    url = row["url"]
    try:
        for sample in iter_tar_samples(url):
            yield _sample_row(sample.key, sample.files, url)
    except TruncatedShardError as e:
        log.warning("truncated shard %s after key %r: %s", url, e.last_good_key, e)
        yield _row(e.partial_key or UNKNOWN_KEY, url, b"", "{}", f"truncated shard: {e}")
    except tarfile.TarError as e:
        # Defensive: iter_tar_samples should wrap these, but never let one shard kill the job.
        log.warning("unreadable shard %s: %s", url, e)
        yield _row(UNKNOWN_KEY, url, b"", "{}", f"unreadable shard: {e}")


def decode_batch(batch: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
    """map_batches stage (CPU tasks): image bytes -> uint8 [R, R, 3]; bad images become rejects."""
    from pipeline.data.images import BadImageError, decode_image, resize_center_crop

    n = len(batch["key"])
    pixels = np.zeros((n, resolution, resolution, 3), dtype=np.uint8)
    rejects = [str(r) for r in batch["reject"]]
    for i in range(n):
        if rejects[i]:
            continue
        try:
            pixels[i] = resize_center_crop(decode_image(batch["image"][i]), resolution)
        except BadImageError as e:
            rejects[i] = f"bad image: {e}"
    return {
        "key": batch["key"],
        "shard": batch["shard"],
        "extras": batch["extras"],
        "reject": np.array(rejects, dtype=object),
        "pixels": pixels,
    }


def _local_model_path(path: str, sha256: str) -> str:
    """Return a local file for ``path``; remote URLs are downloaded once and hash-checked."""
    fs, fpath = fsspec.core.url_to_fs(path)
    if "file" in fs.protocol or "local" in fs.protocol:
        return fpath
    data = fs.cat_file(fpath)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{path}: sha256 {digest} does not match the sidecar's {sha256}")
    fd, local = tempfile.mkstemp(suffix=".onnx", prefix="latentpipe-encoder-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return local


def encoder_output(sidecar: dict[str, Any]) -> tuple[str, tuple[int, ...], str]:
    """(graph output to run, per-sample shape, dtype) of what the encoder stage emits.

    KL: the posterior ``mean`` as float32 (the sink casts to the stored dtype). VQ: the code
    ``indices``, narrowed here to the stored dtype so rows cross the object store 4x smaller.
    """
    shape = tuple(int(x) for x in sidecar["latent_shape"])
    if sidecar.get("model_kind") == "vq":
        return "indices", shape[1:], str(sidecar["index_dtype"])
    return "mean", shape, "float32"


class OrtEncoder:
    """Stateful map_batches stage (actor): normalise pixels and run the encoder's ``mean`` output
    (``indices`` for VQ encoders)."""

    def __init__(self, encoder: str, sidecar: dict[str, Any], device: str, threads: int) -> None:
        from pipeline.encode.session import make_session

        spec = sidecar["input"]
        self.input_name = spec.get("name", "image")
        norm = spec["normalization"]
        self.scale = np.float32(norm["scale"])
        self.offset = np.float32(norm["offset"])
        self.output, self.latent_shape, self.dtype = encoder_output(sidecar)
        self.num_codes = int(sidecar.get("num_codes") or 0)
        self.session = make_session(
            _local_model_path(encoder, sidecar["onnx_sha256"]), device, threads
        )
        log.info("encoder actor ready on %s", self.session.get_providers())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch["pixels"]
        good = np.array([not r for r in batch["reject"]], dtype=bool)
        latent = np.zeros((len(good), *self.latent_shape), dtype=self.dtype)
        if good.any():
            # HWC uint8 -> NCHW float32 in the sidecar's range (x / scale + offset).
            x = pixels[good].astype(np.float32).transpose(0, 3, 1, 2) / self.scale + self.offset
            (out,) = self.session.run([self.output], {self.input_name: np.ascontiguousarray(x)})
            latent[good] = self._checked(out)
        return {
            "key": batch["key"],
            "shard": batch["shard"],
            "extras": batch["extras"],
            "reject": batch["reject"],
            "latent": latent,
        }

    def _checked(self, out: np.ndarray) -> np.ndarray:
        if tuple(out.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"encoder produced {self.output} {out.shape[1:]}, sidecar says {self.latent_shape}"
            )
        # A narrowing cast would wrap an out-of-range index silently into a wrong code.
        if self.num_codes and out.size and (out.min() < 0 or out.max() >= self.num_codes):
            raise ValueError(f"encoder produced code indices outside [0, {self.num_codes})")
        return out
