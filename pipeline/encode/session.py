"""ONNX Runtime session construction with honest GPU detection.

onnxruntime-gpu lists CUDAExecutionProvider as *available* even on machines without a GPU and then
logs loud errors when a session asks for it. We therefore only request CUDA when a device is really
visible, and for ``device="cuda"`` verify that the session did not silently fall back to CPU.

``fp16=True`` runs a float16 copy of the model (float32 inputs/outputs kept, so callers do not
change), converted once per source file and cached on local disk; it is CUDA-only.
:class:`EncoderRunner` runs a session with IO binding so outputs are fetched in one copy.
Depends on onnxruntime (and, for fp16 conversion, onnx), numpy and the standard library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import sys
import tempfile
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
# Bump when convert_to_fp16 changes, so cached conversions made by older code are not reused.
FP16_CACHE_TAG = "fp16v1"
FP16_NEEDS_CUDA = (
    "encode.fp16_model needs the CUDA execution provider (device='cuda', or 'auto' with a "
    "visible GPU): float16 kernels on the CPU provider are missing or slower than float32"
)


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
    # HEURISTIC avoids cuDNN's exhaustive benchmark on every new input shape (aspect buckets).
    # Copies on the compute stream: ORT's default, pinned because separate streams can race.
    cuda = (
        CUDA_PROVIDER,
        {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True},
    )
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


def _provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def make_session(
    path: str, device: str = "auto", threads: int = 0, fp16: bool = False
) -> ort.InferenceSession:
    """Open an ONNX model at local ``path`` on ``device``; ``threads`` > 0 caps intra-op threads.

    ``fp16=True`` runs the cached float16 conversion of ``path`` (see :func:`fp16_model_path`)
    and raises ValueError unless the session runs on the CUDA provider.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path}")
    providers = providers_for(device)
    if fp16 and _provider_name(providers[0]) != CUDA_PROVIDER:
        raise ValueError(f"{FP16_NEEDS_CUDA}; device={device!r} resolves to {providers}")
    model_path = fp16_model_path(path) if fp16 else path
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: keep provider chatter out of worker logs
    session = ort.InferenceSession(model_path, sess_options=opts, providers=providers)
    active = session.get_providers()
    if device == "cuda" and CUDA_PROVIDER not in active:
        raise RuntimeError(
            f"device='cuda' requested for {path} but onnxruntime fell back to {active} "
            "(CUDA/cuDNN libraries missing or incompatible?)"
        )
    if fp16 and CUDA_PROVIDER not in active:
        raise ValueError(f"{FP16_NEEDS_CUDA}; the CUDA provider failed to initialise ({active})")
    if device == "auto" and len(providers) > 1 and CUDA_PROVIDER not in active:
        log.warning("CUDA provider failed to initialise for %s; running on %s", path, active)
    log.debug("ONNX session for %s on %s (fp16=%s)", path, active, fp16)
    return session


class EncoderRunner:
    """Run an encoder session on float32 NCHW batches, with IO binding where it pays off.

    With ``io_binding`` (default: on when the session's first provider is CUDA) the input is
    bound from host memory and outputs are allocated on the session's device, then copied to
    host once. ``io_binding=True`` on a CPU session binds outputs to "cpu" (same results; it
    keeps that code path testable without a GPU).
    """

    def __init__(
        self, session: ort.InferenceSession, input_name: str, io_binding: bool | None = None
    ):
        self.session = session
        self.input_name = input_name
        on_cuda = session.get_providers()[0] == CUDA_PROVIDER
        self.io_binding = on_cuda if io_binding is None else io_binding
        self.output_device = "cuda" if on_cuda else "cpu"

    def run(self, output_names: list[str], x: np.ndarray) -> list[np.ndarray]:
        """The named outputs for the float32 NCHW batch ``x``, as host numpy arrays."""
        if x.dtype != np.float32 or x.ndim != 4:
            raise ValueError(f"expected a float32 NCHW batch, got {x.dtype} {x.shape}")
        x = np.ascontiguousarray(x)
        if not self.io_binding:
            return self.session.run(output_names, {self.input_name: x})
        # A fresh binding per call: nothing is shared if actors call run() from several threads.
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, x)
        for name in output_names:
            binding.bind_output(name, self.output_device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fp16_model_path(src: str, cache_dir: str | None = None) -> str:
    """Local path of the float16 conversion of ``src``, converting it on first use.

    Cached in ``cache_dir`` (default ``<tmp>/latentpipe-fp16``) under the source's sha256, so
    every actor on a node converts a given model once and a changed model is never served stale.
    """
    directory = cache_dir or os.path.join(tempfile.gettempdir(), "latentpipe-fp16")
    os.makedirs(directory, exist_ok=True)
    dst = os.path.join(directory, f"{_sha256(src)}-{FP16_CACHE_TAG}.onnx")
    if os.path.isfile(dst):
        return dst
    fd, tmp = tempfile.mkstemp(suffix=".onnx.part", dir=directory)
    os.close(fd)
    try:
        convert_to_fp16(src, tmp)
        os.replace(tmp, dst)  # atomic: a concurrent reader sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("converted %s to float16 at %s", src, dst)
    return dst


def _ancestors(nodes: list[Any], index: int) -> set[int]:
    """Indices of node ``index`` and every node it (transitively) reads from."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    found: set[int] = set()
    stack = [index]
    while stack:
        i = stack.pop()
        if i not in found:
            found.add(i)
            stack.extend(producer[name] for name in nodes[i].input if name in producer)
    return found


def split_at_last_conv(graph: Any) -> tuple[str | None, list[int]]:
    """(output of the last Conv, indices of the nodes after it) or (None, []) if no clean split.

    In our encoders the last Conv is the 1x1 quant conv; the nodes after it are the posterior
    split/clamp (KL) or the code distances, argmin and codebook lookup (VQ). The split is clean
    when those nodes read nothing computed before the Conv except its output.
    """
    nodes = list(graph.node)
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    if not convs:
        return None, []
    trunk = _ancestors(nodes, convs[-1])
    link = nodes[convs[-1]].output[0]
    trunk_values = {out for i in trunk for out in nodes[i].output} - {link}
    tail = [i for i in range(len(nodes)) if i not in trunk]
    if any(name in trunk_values for i in tail for name in nodes[i].input):
        return None, []
    return link, tail


def _sort_nodes(graph: Any) -> None:
    """Topologically sort ``graph``'s nodes in place.

    The converter appends its input Casts at the end of the node list; ORT copes, but the ONNX
    checker (and other tools) require producers before consumers.
    """
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [all(name in known for name in node.input) for node in pending]
        if not any(ready):
            raise ValueError("ONNX graph has a cycle or an input no node produces")
        for node in (node for node, ok in zip(pending, ready, strict=True) if ok):
            known.update(node.output)
            ordered.append(type(node).FromString(node.SerializeToString()))
        pending = [node for node, ok in zip(pending, ready, strict=True) if not ok]
    del graph.node[:]
    graph.node.extend(ordered)


def _convert_trunk(model: Any, link: str, tail: list[int]) -> Any:
    """``model`` with the nodes feeding ``link`` in float16 and the ``tail`` nodes untouched.

    The converter's own ``node_block_list`` is no substitute: it round-trips every blocked
    node's output through float16, which would still compute VQ distances at float16 precision.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    nodes, in_tail = list(model.graph.node), set(tail)
    tail_nodes = [nodes[i] for i in tail]
    trunk = onnx.ModelProto()
    trunk.CopyFrom(model)
    graph = trunk.graph
    del graph.node[:], graph.output[:], graph.value_info[:]
    graph.node.extend(node for i, node in enumerate(nodes) if i not in in_tail)
    graph.output.append(onnx.helper.make_tensor_value_info(link, onnx.TensorProto.FLOAT, None))
    _keep_initializers(graph, {name for node in graph.node for name in node.input})
    merged = convert_float_to_float16(trunk, keep_io_types=True)
    _append_tail(merged.graph, model.graph, tail_nodes)
    return merged


def _keep_initializers(graph: Any, used: set[str]) -> None:
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _append_tail(graph: Any, source: Any, tail_nodes: list[Any]) -> None:
    """Add the float32 ``tail_nodes`` of ``source`` (and their initializers) to the converted
    trunk ``graph``, whose output becomes ``source``'s outputs."""
    used = {name for node in tail_nodes for name in node.input}
    present = {t.name for t in graph.initializer}
    for tensor in source.initializer:
        if tensor.name in used and tensor.name in present:
            # Shared with the trunk, whose copy may now be float16: the tail needs the original.
            raise ValueError(f"initializer {tensor.name!r} is shared across the float16 split")
        if tensor.name in used:
            graph.initializer.append(tensor)
    graph.node.extend(tail_nodes)
    del graph.output[:]
    graph.output.extend(source.output)
    _sort_nodes(graph)


def convert_to_fp16(src: str, dst: str) -> None:
    """Write a float16 version of the ONNX model ``src`` to ``dst``.

    Graph inputs/outputs stay float32 (``keep_io_types``), so callers feed and read float32.
    Everything up to the last Conv computes in float16; the nodes after it stay float32 (see
    :func:`split_at_last_conv`): float16 distances would flip nearest-code choices and the
    lookup would round the codebook, while that tail costs next to nothing in float32. Graphs
    without a clean split are converted whole.
    """
    import onnx  # lazy: only fp16 conversion needs it
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(src)
    link, tail = split_at_last_conv(model.graph)
    if link is None:
        converted = convert_float_to_float16(model, keep_io_types=True)
        _sort_nodes(converted.graph)
    else:
        converted = _convert_trunk(model, link, tail)
    onnx.checker.check_model(converted)
    onnx.save(converted, dst)
