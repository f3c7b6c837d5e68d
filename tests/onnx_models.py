"""Hand-built ONNX encoders for tests: tiny graphs whose outputs are chosen per image (finite,
overflowing float16, NaN or inf), run by real ONNX Runtime sessions. All are f2 KL encoders
with 3 latent channels over the [-1, 1] input range of the sidecar's normalisation."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from pipeline.encode.actor import EncoderSpec


def pool_model(path, tail: list, inits: dict[str, float] | None = None) -> EncoderSpec:
    """A hand-built f2 encoder: pool = AveragePool2x2(image) in [-1, 1] (3 channels), then the
    ``tail`` nodes make "mean" from it; "logvar" is zero."""
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        *tail,
        helper.make_node("Mul", ["pool", "zero"], ["logvar"]),
    ]
    constants = {"zero": 0.0, **(inits or {})}
    graph = helper.make_graph(
        nodes,
        "pool",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3, "h", "w"])
            for name in ("mean", "logvar")
        ],
        [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return EncoderSpec(
        path=str(path),
        onnx_sha256="",
        input_name="image",
        scale=127.5,
        offset=-1.0,
        vq=False,
        num_codes=0,
        index_dtype="int64",
        channels=3,
        factor=2,
    )


def scaled(path, factor: float) -> EncoderSpec:
    """mean = pool * factor: overflows float16 only where pool is near +-1 (white/black)."""
    return pool_model(path, [helper.make_node("Mul", ["pool", "k"], ["mean"])], {"k": factor})


def shifted(path, shift: float) -> EncoderSpec:
    """mean = pool + shift: every image overflows float16 when shift > 65,504."""
    return pool_model(path, [helper.make_node("Add", ["pool", "k"], ["mean"])], {"k": shift})


def nan_for_black(path) -> EncoderSpec:
    """mean = sqrt(pool + 0.9): NaN where a pixel block is black (pool = -1), finite elsewhere."""
    tail = [
        helper.make_node("Add", ["pool", "k"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["mean"]),
    ]
    return pool_model(path, tail, {"k": 0.9})


def inf_for_white(path) -> EncoderSpec:
    """mean = pool / (1 - pool): +inf where a 2x2 block is white (pool = 1), finite elsewhere."""
    tail = [
        helper.make_node("Sub", ["one", "pool"], ["gap"]),
        helper.make_node("Div", ["pool", "gap"], ["mean"]),
    ]
    return pool_model(path, tail, {"one": 1.0})


def argmax_vq(path, num_codes: int = 3) -> EncoderSpec:
    """A hand-built f2 VQ encoder: indices = argmax over the 3 channels of AveragePool2x2(image),
    so the code of a pixel block is its dominant colour (int64 [N, h, w], as exported VQ
    encoders give)."""
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ArgMax", ["pool"], ["indices"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "argmax",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, ["N", "h", "w"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return EncoderSpec(
        path=str(path),
        onnx_sha256="",
        input_name="image",
        scale=127.5,
        offset=-1.0,
        vq=True,
        num_codes=num_codes,
        index_dtype="uint16",
        channels=3,
        factor=2,
    )
