"""ONNX Runtime session construction with honest GPU detection.

onnxruntime-gpu lists CUDAExecutionProvider as *available* even on machines without a GPU and then
logs loud errors when a session asks for it. We therefore only request CUDA when a device is really
visible, and for ``device="cuda"`` verify that the session did not silently fall back to CPU.
Depends on onnxruntime and the standard library only.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any

import onnxruntime as ort

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


def _cuda_driver_device_count() -> int:
    """Ask the CUDA driver API how many devices it sees; 0 when there is no usable driver."""
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except (AttributeError, OSError):
            return 0
    return 0


def gpu_visible() -> bool:
    """True only if an NVIDIA GPU is actually usable by this process (quietly False otherwise)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return False
    return _cuda_driver_device_count() > 0


def _cuda_provider_available() -> bool:
    return CUDA_PROVIDER in ort.get_available_providers()


def providers_for(device: str) -> list[Any]:
    """Execution providers for ``device`` in priority order ("auto", "cpu" or "cuda")."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if device == "cpu":
        return [CPU_PROVIDER]
    # HEURISTIC avoids cuDNN's exhaustive benchmark on every new input shape.
    cuda = (CUDA_PROVIDER, {"cudnn_conv_algo_search": "HEURISTIC"})
    if device == "cuda":
        if not _cuda_provider_available():
            raise RuntimeError(
                "device='cuda' requested but onnxruntime has no CUDAExecutionProvider "
                f"(available: {ort.get_available_providers()}); install onnxruntime-gpu"
            )
        if not gpu_visible():
            raise RuntimeError(
                "device='cuda' requested but no NVIDIA GPU is visible to this process "
                "(no CUDA driver / device, or CUDA_VISIBLE_DEVICES hides it); use device='cpu'"
            )
        return [cuda]
    if _cuda_provider_available() and gpu_visible():
        return [cuda, CPU_PROVIDER]
    return [CPU_PROVIDER]


def make_session(path: str, device: str = "auto", threads: int = 0) -> ort.InferenceSession:
    """Open an ONNX model at local ``path`` on ``device``; ``threads`` > 0 caps intra-op threads."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path}")
    providers = providers_for(device)
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: keep provider chatter out of worker logs
    session = ort.InferenceSession(path, sess_options=opts, providers=providers)
    active = session.get_providers()
    if device == "cuda" and CUDA_PROVIDER not in active:
        raise RuntimeError(
            f"device='cuda' requested for {path} but onnxruntime fell back to {active} "
            "(CUDA/cuDNN libraries missing or incompatible?)"
        )
    if device == "auto" and len(providers) > 1 and CUDA_PROVIDER not in active:
        log.warning("CUDA provider failed to initialise for %s; running on %s", path, active)
    log.debug("ONNX session for %s on %s", path, active)
    return session
