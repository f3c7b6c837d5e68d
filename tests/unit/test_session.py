"""Tests for pipeline.encode.session: IO binding, float16 conversion and its CUDA-only guard.

This machine has no GPU: the CUDA paths are checked through their refusals and a CPU session
with IO binding forced on.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pipeline.encode import session as session_mod
from pipeline.encode.session import (
    EncoderRunner,
    convert_to_fp16,
    fp16_model_path,
    gpu_visible,
    make_session,
    providers_for,
)
from pipeline.export import export_encoder_onnx
from pipeline.models import ModelConfig, VQConfig, build_model

RES = 16
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
needs_no_gpu = pytest.mark.skipif(gpu_visible(), reason="GPU visible: CPU-only expectations")


def _tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        kind=kind,
        ch=8,
        ch_mult=[1, 2, 2],
        z_channels=4,
        groups=4,
        attention=True,
        vq=VQConfig(num_codes=32, code_dim=4),
    )
    return build_model(cfg).eval()


@pytest.fixture(scope="module", params=["kl", "vq"])
def encoder(request, tmp_path_factory) -> tuple[str, str, torch.nn.Module]:
    """(kind, path of the exported fp32 encoder, torch model)."""
    model = _tiny(request.param)
    path = str(tmp_path_factory.mktemp(request.param) / "encoder.onnx")
    export_encoder_onnx(model, RES, path)
    return request.param, path, model


def _outputs(kind: str) -> list[str]:
    return ["indices", "quantized"] if kind == "vq" else ["mean", "logvar"]


def _batch(height: int = RES, width: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (3, 3, height, width)).astype(np.float32)


def test_io_binding_equals_session_run(encoder):
    kind, path, _ = encoder
    sess = make_session(path, device="cpu")
    names = _outputs(kind)
    plain = EncoderRunner(sess, "image")
    assert plain.io_binding is False  # default follows the provider: off on CPU
    bound = EncoderRunner(sess, "image", io_binding=True)
    for x in (_batch(), _batch(24, 8, seed=1)):
        expected = sess.run(names, {"image": x})
        for runner in (plain, bound):
            got = runner.run(names, x)
            assert len(got) == len(expected)
            for g, e in zip(got, expected, strict=True):
                assert g.dtype == e.dtype
                np.testing.assert_array_equal(g, e)


def test_runner_takes_a_single_output_and_strided_input(encoder):
    kind, path, _ = encoder
    sess = make_session(path, device="cpu")
    name = _outputs(kind)[0]
    x = np.asfortranarray(_batch())  # not C-contiguous: the runner must copy, not misread
    (got,) = EncoderRunner(sess, "image", io_binding=True).run([name], x)
    np.testing.assert_array_equal(got, sess.run([name], {"image": np.ascontiguousarray(x)})[0])


def test_runner_rejects_wrong_input(encoder):
    _, path, _ = encoder
    runner = EncoderRunner(make_session(path, device="cpu"), "image")
    with pytest.raises(ValueError, match="float32 NCHW"):
        runner.run(["mean"], _batch().astype(np.float64))
    with pytest.raises(ValueError, match="float32 NCHW"):
        runner.run(["mean"], _batch()[0])


def test_fp16_refused_on_cpu(encoder, monkeypatch):
    _, path, _ = encoder

    def no_conversion(*args, **kwargs):
        raise AssertionError("fp16 must be refused before converting anything")

    monkeypatch.setattr(session_mod, "fp16_model_path", no_conversion)
    with pytest.raises(ValueError, match="encode.fp16_model needs the CUDA execution provider"):
        make_session(path, device="cpu", fp16=True)
    if not gpu_visible():
        with pytest.raises(ValueError, match="encode.fp16_model needs the CUDA"):
            make_session(path, device="auto", fp16=True)


@needs_no_gpu
def test_cuda_requested_without_gpu_is_an_error(encoder):
    _, path, _ = encoder
    for fp16 in (False, True):
        with pytest.raises(RuntimeError, match="device='cuda' requested"):
            make_session(path, device="cuda", fp16=fp16)


def test_cuda_provider_options(monkeypatch):
    # Pretend a GPU is there: only the option list is checked, no session is created.
    monkeypatch.setattr(session_mod, "gpu_visible", lambda: True)
    monkeypatch.setattr(session_mod, "_cuda_provider_available", lambda: True)
    (cuda,) = providers_for("cuda")
    assert cuda == (
        "CUDAExecutionProvider",
        {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True},
    )
    assert providers_for("auto") == [cuda, "CPUExecutionProvider"]


def _elem_types(values) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in values}


def test_fp16_conversion_structure(encoder, tmp_path):
    kind, path, model = encoder
    dst = str(tmp_path / "fp16.onnx")
    convert_to_fp16(path, dst)
    converted = onnx.load(dst)
    onnx.checker.check_model(converted)
    assert _elem_types(converted.graph.input) == {"image": FLOAT}
    if kind == "vq":
        expected = {"indices": onnx.TensorProto.INT64, "quantized": FLOAT}
    else:
        expected = {"mean": FLOAT, "logvar": FLOAT}
    assert _elem_types(converted.graph.output) == expected
    # Declared shapes survive, so consumers still read the symbolic dims.
    original = onnx.load(path)
    assert [o.type for o in converted.graph.output] == [o.type for o in original.graph.output]
    types = {t.name: t.data_type for t in converted.graph.initializer}
    conv_weights = [n for n in types if n.endswith(".weight") and "encoder." in n]
    assert conv_weights and all(types[n] == FLOAT16 for n in conv_weights)
    if kind == "vq":  # the codebook lookup and code distances stay float32
        assert types["model.quantize.codebook"] == FLOAT


def test_fp16_model_runs_close_to_fp32(encoder, tmp_path):
    """The CPU provider runs the converted graph (its float16 kernels or inserted casts), which
    is enough to check the conversion numerically; make_session only refuses it for speed."""
    kind, path, model = encoder
    dst = str(tmp_path / "fp16.onnx")
    convert_to_fp16(path, dst)
    fp16 = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    fp32 = make_session(path, device="cpu")
    names = _outputs(kind)
    x = _batch(24, 16, seed=3)
    got, ref = fp16.run(names, {"image": x}), fp32.run(names, {"image": x})
    assert [g.dtype for g in got] == [r.dtype for r in ref]
    if kind == "kl":
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(g, r, atol=5e-3, rtol=5e-3)
        return
    indices, quantized = got
    assert (indices == ref[0]).mean() > 0.9  # float16 trunk may flip near-tie codes only
    codes = model.quantize.codes().detach().numpy()
    # The lookup stays exact float32: quantized is the codebook row of each chosen index.
    np.testing.assert_array_equal(quantized, np.moveaxis(codes[indices], -1, 1))


def test_fp16_cache_keyed_by_source_hash(encoder, tmp_path):
    _, path, _ = encoder
    cache = str(tmp_path / "cache")
    first = fp16_model_path(path, cache)
    mtime = os.stat(first).st_mtime_ns
    assert fp16_model_path(path, cache) == first and os.stat(first).st_mtime_ns == mtime
    assert os.listdir(cache) == [os.path.basename(first)]  # no leftover partial files
    changed = str(tmp_path / "changed.onnx")
    proto = onnx.load(path)
    proto.doc_string = "different bytes, same graph"
    onnx.save(proto, changed)
    assert fp16_model_path(changed, cache) != first
