"""Worker-side stages of the encode pipeline: read shards, decode images, run the ONNX encoder.

The unit of work is one input shard ("unit"). Rows travel through Ray/Arrow as plain columns
(nothing is pickled):
  unit: int      index of the input shard in the job's input list
  seq: int       position of the row within its unit
  end: bool      the unit's last row, a trailer carrying no sample: its ``seq`` is the number of
                 sample rows before it, so the driver knows the unit is complete and whole
  key: str       sample key ("" when a truncated shard lost a sample whose key is unknown)
  has_image: bool the group of tar members holds an image (a sample whose files are not
                 contiguous in the tar arrives as several rows with one key; the driver merges them)
  extras: str    JSON object {ext: base64(bytes)} of the non-image fields, carried verbatim
  reject: str    "" for good rows, otherwise why the sample is rejected
  image: bytes   raw image bytes (read stage only)
  pixels: bytes  raw uint8 HWC pixels with height/width: int columns; orig_h, orig_w, crop_top,
                 crop_left: int size conditioning (decode stage)
  latent, std: bytes  C-order buffers of the encoder outputs (encoder stage): float32
                 [C, h, w] posterior mean (std: b"" unless stored or sampled), or VQ code indices
                 [h, w] in the sidecar's index dtype; shapes follow from height/width. Binary columns carry the differently shaped rows of
                 aspect-ratio buckets without ragged-tensor types.
Every input row reaches the driver, which records each key exactly once, in a latent shard or
in rejects.jsonl. Images cross the object store as uint8 (4x smaller than float32).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np

from pipeline.encode.inputs import (  # noqa: F401  (re-exported for the tests)
    SAFE_EXT,
    image_field,
    iter_input_samples,
    key_problem,
    split_dotted_keys,
)

log = logging.getLogger(__name__)

UNKNOWN_KEY = ""
SIZE_COLUMNS = ("orig_h", "orig_w", "crop_top", "crop_left")
PASS_THROUGH = ("unit", "seq", "end", "key", "has_image", "extras", "reject")


def pack_extras(files: dict[str, bytes]) -> str:
    """Encode non-image fields as a JSON string (base64 values) for an Arrow string column."""
    return json.dumps({ext: base64.b64encode(data).decode("ascii") for ext, data in files.items()})


def unpack_extras(text: str) -> dict[str, bytes]:
    """Inverse of :func:`pack_extras`."""
    return {ext: base64.b64decode(data) for ext, data in json.loads(text).items()}


def _row(unit: int, seq: int, key: str, **fields: Any) -> dict[str, Any]:
    row = {"unit": unit, "seq": seq, "end": False, "key": key, "has_image": False}
    row.update({"extras": "{}", "reject": "", "image": b""})
    row.update(fields)
    return row


def _sample_row(unit: int, seq: int, key: str, files: dict[str, bytes]) -> dict[str, Any]:
    problem = key_problem(key)
    if problem:
        return _row(unit, seq, key, reject=problem)
    ext = image_field(files)
    extras = {e: data for e, data in files.items() if e != ext}
    bad = sorted(e for e in extras if not SAFE_EXT.match(e))
    if bad:
        return _row(unit, seq, key, reject=f"unsupported field name(s) {bad}")
    image = files[ext] if ext is not None else b""
    return _row(unit, seq, key, has_image=ext is not None, image=image, extras=pack_extras(extras))


def read_shard(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """flat_map stage: ``{"unit", "url"}`` -> one row per group of tar members, then the trailer.

    A truncated or corrupt tar yields its complete samples, then one reject row for the sample
    that was being read (its key, or "" when unknown) naming the shard and the error.
    """
    from pipeline.data.tario import TruncatedShardError

    unit, url = int(row["unit"]), row["url"]
    seq = 0
    try:
        for key, files in iter_input_samples(url):
            yield _sample_row(unit, seq, key, files)
            seq += 1
    except TruncatedShardError as e:
        log.warning("truncated shard %s after key %r: %s", url, e.last_good_key, e)
        yield _row(unit, seq, e.partial_key or UNKNOWN_KEY, reject=f"truncated shard: {e}")
        seq += 1
    except tarfile.TarError as e:
        # Defensive: iter_tar_samples should wrap these, but never let one shard kill the job.
        log.warning("unreadable shard %s: %s", url, e)
        yield _row(unit, seq, UNKNOWN_KEY, reject=f"unreadable shard: {e}")
        seq += 1
    yield _row(unit, seq, UNKNOWN_KEY, end=True)


def decode_batch(batch: dict[str, np.ndarray], preprocess: dict[str, Any]) -> dict[str, Any]:
    """map_batches stage (CPU tasks): image bytes -> uint8 pixels + size conditioning.

    ``preprocess`` is the resolved PreprocessConfig as a dict (plain data crosses to workers).
    Pixels travel as raw HWC bytes with ``height``/``width`` columns: aspect-ratio buckets give
    rows of different shapes, which a plain binary column carries without ragged-tensor types.
    Bad images become rejects with the reason.
    """
    from pipeline.data.images import BadImageError
    from pipeline.encode.preprocess import PreprocessConfig, prepare_image

    cfg = PreprocessConfig(**preprocess)
    n = len(batch["key"])
    rejects = [str(r) for r in batch["reject"]]
    pixels = [b""] * n
    sizes = np.zeros((len(SIZE_COLUMNS) + 2, n), dtype=np.int64)
    for i in range(n):
        if not batch["has_image"][i] or rejects[i]:
            continue
        try:
            prepared = prepare_image(batch["image"][i], cfg)
        except BadImageError as e:
            rejects[i] = f"bad image: {e}"
            continue
        pixels[i] = prepared.pixels.tobytes()
        sizes[:, i] = (
            *prepared.original_size,
            *prepared.crop_top_left,
            *prepared.pixels.shape[:2],
        )
    out = {name: batch[name] for name in PASS_THROUGH}
    out["reject"] = np.array(rejects, dtype=object)
    out["pixels"] = np.array(pixels, dtype=object)
    out.update({name: sizes[j] for j, name in enumerate((*SIZE_COLUMNS, "height", "width"))})
    return out


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


def is_vq(sidecar: dict[str, Any]) -> bool:
    return sidecar.get("model_kind") == "vq"


class OrtEncoder:
    """Stateful map_batches stage (actor): normalise pixels and run the ONNX encoder.

    Rows are grouped by pixel shape (aspect-ratio buckets) so every ONNX call gets a stackable
    batch. KL encoders emit the posterior mean (and std when ``need_std``); VQ encoders emit code
    indices narrowed to the sidecar's index dtype, so rows cross the object store small.
    """

    def __init__(self, encoder: str, sidecar: dict[str, Any], options: dict[str, Any]) -> None:
        from pipeline.encode.session import EncoderRunner, make_session

        spec = sidecar["input"]
        self.input_name = spec.get("name", "image")
        norm = spec["normalization"]
        self.scale = np.float32(norm["scale"])
        self.offset = np.float32(norm["offset"])
        self.vq = is_vq(sidecar)
        self.need_std = bool(options["need_std"]) and not self.vq
        self.num_codes = int(sidecar.get("num_codes") or 0)
        self.index_dtype = np.dtype(sidecar.get("index_dtype", "int64"))
        self.channels = int(sidecar["latent_shape"][0])
        self.factor = int(sidecar["downsample_factor"])
        self.batch_size = int(options["batch_size"])
        session = make_session(
            _local_model_path(encoder, sidecar["onnx_sha256"]),
            options["device"],
            int(options["threads"]),
            fp16=bool(options["fp16"]),
        )
        # io_binding=None: bind on CUDA sessions only (on CPU it buys nothing).
        binding = None if options["io_binding"] else False
        self.runner = EncoderRunner(session, self.input_name, io_binding=binding)
        log.info("encoder actor ready on %s", session.get_providers())

    def _outputs(self) -> list[str]:
        if self.vq:
            return ["indices"]
        return ["mean", "logvar"] if self.need_std else ["mean"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["key"])
        rejects = [str(r) for r in batch["reject"]]
        latents = [b""] * n
        stds = [b""] * n
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i in range(n):
            if batch["has_image"][i] and not rejects[i]:
                shape = (int(batch["height"][i]), int(batch["width"][i]))
                by_shape.setdefault(shape, []).append(i)
        for shape, rows in sorted(by_shape.items()):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                self._encode(batch["pixels"], shape, chunk, latents, stds, rejects)
        out = {name: batch[name] for name in PASS_THROUGH}
        out.update({name: batch[name] for name in (*SIZE_COLUMNS, "height", "width")})
        out["reject"] = np.array(rejects, dtype=object)
        out["latent"] = np.array(latents, dtype=object)
        out["std"] = np.array(stds, dtype=object)
        return out

    def _encode(self, pixels, shape, rows: list[int], latents, stds, rejects: list[str]) -> None:
        h, w = shape
        images = np.stack([np.frombuffer(pixels[i], np.uint8).reshape(h, w, 3) for i in rows])
        # HWC uint8 -> NCHW float32 in the sidecar's range (x / scale + offset).
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / self.scale + self.offset
        results = self.runner.run(self._outputs(), np.ascontiguousarray(x))
        self._check_shape(results[0], shape)
        for j, i in enumerate(rows):
            if self.vq:
                latents[i] = self._indices(results[0][j]).tobytes()
                continue
            mean = results[0][j]
            std = np.exp(0.5 * results[1][j]).astype(np.float32) if self.need_std else None
            if not np.isfinite(mean).all() or (std is not None and not np.isfinite(std).all()):
                rejects[i] = "encoder produced non-finite values for this image"
                continue
            # Bare C-order buffers: the driver knows their shape and dtype (LatentLayout).
            latents[i] = np.ascontiguousarray(mean, dtype=np.float32).tobytes()
            stds[i] = std.tobytes() if std is not None else b""

    def _check_shape(self, out: np.ndarray, image_hw: tuple[int, int]) -> None:
        h, w = image_hw[0] // self.factor, image_hw[1] // self.factor
        expected = (h, w) if self.vq else (self.channels, h, w)
        if tuple(out.shape[1:]) != expected:
            raise ValueError(f"encoder produced {tuple(out.shape[1:])}, expected {expected}")

    def _indices(self, out: np.ndarray) -> np.ndarray:
        # A narrowing cast would wrap an out-of-range index silently into a wrong code.
        if out.size and (out.min() < 0 or out.max() >= self.num_codes):
            raise ValueError(f"encoder produced code indices outside [0, {self.num_codes})")
        return out.astype(self.index_dtype)
