"""The encoder actor of the encode job: one ONNX Runtime session, whole units end to end.

:class:`UnitEncoder` is the stateful ``map_batches`` callable of the job's Ray Data pipeline. It
receives one unit row at a time ({unit, url, ...}), and does all of the unit's work where the
latents are (pipeline.encode.unit); the rows it returns carry counts only. Any error of a unit
is caught and returned as its status, so only system failures (a lost node) make Ray Data
count a block as errored, and the driver re-runs such units in another pass.

:class:`BatchEncoder` runs the session on uint8 image batches. With ``fp16_model`` on CUDA, an
image whose float16 encoding is not finite is re-run through a float32 session before it can be
rejected (the SDXL VAE overflows in float16); such retries are counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from pipeline.encode.session import EncoderRunner, make_session
from pipeline.encode.unit import (
    MAX_ATTEMPTS,
    STATUS_ERROR,
    STATUS_POISONED,
    UnitSettings,
    UnitTask,
    count_attempt,
    encode_unit,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSpec:
    """What the actor needs to know of the encoder (from its sidecar, on the driver)."""

    path: str  # encoder.onnx (local path or fsspec URL)
    onnx_sha256: str
    input_name: str
    scale: float  # pixels / scale + offset = the encoder's input range
    offset: float
    vq: bool
    num_codes: int
    index_dtype: str
    channels: int
    factor: int


@dataclass(frozen=True)
class RuntimeOptions:
    device: str
    threads: int  # ORT intra-op threads (0 = ORT's default)
    fp16: bool
    io_binding: bool
    need_std: bool
    decode_threads: int


def local_model_path(path: str, sha256: str) -> str:
    """A local file for ``path``; remote URLs are downloaded once and hash-checked."""
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


class BatchEncoder:
    """uint8 NHWC image batches -> per-image encoder outputs, None where not finite."""

    def __init__(self, spec: EncoderSpec, options: RuntimeOptions):
        self.spec = spec
        self.options = options
        self.model_path = local_model_path(spec.path, spec.onnx_sha256)
        self.runner = self._runner(options.fp16)
        self.exact: EncoderRunner | None = None  # float32 session for fp16 retries, on demand
        self.fp16_retries = 0  # images re-run in float32 because float16 was not finite

    def _runner(self, fp16: bool) -> EncoderRunner:
        o = self.options
        session = make_session(self.model_path, o.device, o.threads, fp16=fp16)
        # io_binding=None: bind on CUDA sessions only (on CPU it buys nothing).
        return EncoderRunner(session, self.spec.input_name, None if o.io_binding else False)

    @property
    def providers(self) -> list[str]:
        return self.runner.session.get_providers()

    def _output_names(self) -> list[str]:
        if self.spec.vq:
            return ["indices"]
        return ["mean", "logvar"] if self.options.need_std else ["mean"]

    def _run(self, runner: EncoderRunner, images: np.ndarray) -> list[np.ndarray]:
        # HWC uint8 -> NCHW float32 in the sidecar's range (x / scale + offset).
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(self.spec.scale)
        x += np.float32(self.spec.offset)
        out = runner.run(self._output_names(), np.ascontiguousarray(x))
        self._check_shape(out[0], images.shape[1:3])
        return out

    def encode(self, images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray | None] | None]:
        """Per image: (latent, std) for KL (std None unless needed), (indices, None) for VQ."""
        out = self._run(self.runner, images)
        if self.spec.vq:
            return [(self._indices(out[0][j]), None) for j in range(len(images))]
        results = [self._kl(out, j) for j in range(len(images))]
        bad = [j for j, r in enumerate(results) if r is None]
        if bad and self.options.fp16:
            self.fp16_retries += len(bad)
            self.exact = self.exact or self._runner(False)
            # Only the failing images: their float32 outputs depend on them alone.
            again = self._run(self.exact, images[bad])
            for i, j in enumerate(bad):
                results[j] = self._kl(again, i)
        return results

    def _kl(self, out: list[np.ndarray], j: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        mean = np.ascontiguousarray(out[0][j], dtype=np.float32)
        std = np.exp(0.5 * out[1][j]).astype(np.float32) if len(out) > 1 else None
        if not np.isfinite(mean).all() or (std is not None and not np.isfinite(std).all()):
            return None
        return mean, std

    def _check_shape(self, out: np.ndarray, image_hw: tuple[int, int]) -> None:
        h, w = image_hw[0] // self.spec.factor, image_hw[1] // self.spec.factor
        expected = (h, w) if self.spec.vq else (self.spec.channels, h, w)
        if tuple(out.shape[1:]) != expected:
            raise ValueError(f"encoder produced {tuple(out.shape[1:])}, expected {expected}")

    def _indices(self, out: np.ndarray) -> np.ndarray:
        # A narrowing cast would wrap an out-of-range index silently into a wrong code.
        if out.size and (out.min() < 0 or out.max() >= self.spec.num_codes):
            raise ValueError(f"encoder produced code indices outside [0, {self.spec.num_codes})")
        return out.astype(self.spec.index_dtype)


class UnitEncoder:
    """Stateful map_batches stage (actor): each input row is a unit, encoded end to end."""

    def __init__(
        self,
        spec: EncoderSpec,
        options: RuntimeOptions,
        settings: UnitSettings,
        codebook: np.ndarray | None,
    ) -> None:
        self.encoder = BatchEncoder(spec, options)
        self.settings = settings
        self.codebook = codebook
        self.pool = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="decode")
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        log.info("encoder actor ready on %s (%s)", self.encoder.providers, self.where)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        results = [self._one(batch, i) for i in range(len(batch["unit"]))]
        return {
            "unit": np.array([r["unit"] for r in results], dtype=np.int64),
            "status": np.array([r["status"] for r in results], dtype=object),
            "info": np.array([_json(r) for r in results], dtype=object),
        }

    def _one(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        task = UnitTask(
            unit=int(batch["unit"][i]),
            url=str(batch["url"][i]),
            run=str(batch["run"][i]),
            run_start=float(batch["run_start"][i]),
        )
        try:
            tries = count_attempt(self.settings.layout.output, task.unit)
            if tries > MAX_ATTEMPTS:
                message = f"crashed its encoder worker {tries - 1} times; skipped in this run"
                return {"unit": task.unit, "status": STATUS_POISONED, "message": message}
            result = encode_unit(task, self.settings, self.encoder, self.codebook, self.pool)
        except Exception as e:  # noqa: BLE001 - the unit is retried; the driver names the error
            log.warning("unit %d (%s) failed on %s: %s", task.unit, task.url, self.where, e)
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            result = {"unit": task.unit, "status": STATUS_ERROR, "message": last}
        result["worker"] = self.where
        return result


def _json(record: dict[str, Any]) -> str:
    return json.dumps(record)
