"""Export the encoder half of an autoencoder to ONNX.

KL models: the graph maps a normalised image batch to the posterior parameters (mean, logvar).
Sampling is deliberately left out of the graph: consumers store the mean and may sample later with
their own RNG. VQ models: the graph returns the code ``indices`` (int64 [N, h, w]) and the
``quantized`` latents (the codebook lookup of those indices, [N, C, h, w]).

Batch, height and width are dynamic axes: one file serves every aspect-ratio bucket whose sides
are multiples of the downsample factor. Channel dims stay static.
"""

from __future__ import annotations

import logging
import os
import warnings

import onnx
import torch
from torch import nn

from pipeline.models.family import family_of
from pipeline.models.vq import VQAutoencoder

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("mean", "logvar")  # KL models
VQ_OUTPUT_NAMES = ("indices", "quantized")  # VQ models
# Symbolic dims of the graph; "batch" is shared by the input and every output.
BATCH, HEIGHT, WIDTH = "batch", "height", "width"
LATENT_HEIGHT, LATENT_WIDTH = "latent_height", "latent_width"
IN_CHANNELS = 3  # RGB: what the sidecar declares and the encode job feeds

Dims = list[int | str]  # an ONNX shape: int = static size, str = symbolic (dynamic) dim


class EncoderForExport(nn.Module):
    """Wrap an autoencoder so ``forward(image) -> (mean, logvar)`` with no sampling."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.model.encode(image)
        return posterior.mean, posterior.logvar


class VQEncoderForExport(nn.Module):
    """Wrap a :class:`VQAutoencoder` so ``forward(image) -> (indices, quantized)`` for ONNX."""

    def __init__(self, model: VQAutoencoder):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.export_forward(image)


def is_vq(model: nn.Module) -> bool:
    """Whether the model's ONNX graph is the VQ one (indices + quantized outputs)."""
    return family_of(model).onnx == "vq"


def check_exportable(model: nn.Module) -> None:
    """Raise ValueError for model kinds without an ONNX encoder (the textbook VAE family:
    their encoders end in Linear layers over a fixed image size and take class labels)."""
    if family_of(model).onnx is None:
        kind = getattr(getattr(model, "config", None), "kind", type(model).__name__)
        raise ValueError(f"ONNX export supports model kinds 'kl' and 'vq', not {kind!r}")


def export_wrapper(model: nn.Module) -> nn.Module:
    """The traceable module whose outputs become the graph outputs, in eval mode."""
    wrapper = VQEncoderForExport(model) if is_vq(model) else EncoderForExport(model)
    return wrapper.eval()


def output_names(model: nn.Module) -> tuple[str, ...]:
    return VQ_OUTPUT_NAMES if is_vq(model) else OUTPUT_NAMES


def graph_dims(names: list[str], outputs: tuple[torch.Tensor, ...]) -> dict[str, Dims]:
    """Each output's ONNX shape: 4-D latents [batch, C, lh, lw], 3-D indices [batch, lh, lw].

    The channel count is read off the traced outputs so it is exactly what the graph produces.
    """
    dims: dict[str, Dims] = {}
    for name, tensor in zip(names, outputs, strict=True):
        channels = [int(tensor.shape[1])] if tensor.ndim == 4 else []
        dims[name] = [BATCH, *channels, LATENT_HEIGHT, LATENT_WIDTH]
    return dims


def _dynamic_axes(dims: dict[str, Dims]) -> dict[str, dict[int, str]]:
    axes = {INPUT_NAME: {0: BATCH, 2: HEIGHT, 3: WIDTH}}
    for name, shape in dims.items():
        axes[name] = {i: d for i, d in enumerate(shape) if isinstance(d, str)}
    return axes


def export_encoder_onnx(model: nn.Module, resolution: int, path: str, opset: int = 17) -> None:
    """Write the encoder of ``model`` to local ``path`` with dynamic batch, height and width.

    ``resolution`` is the trained (native) size; the graph is traced there and accepts any
    height/width that are multiples of the downsample factor.
    """
    check_exportable(model)
    factor = int(model.downsample_factor)
    if resolution <= 0 or resolution % factor != 0:
        raise ValueError(
            f"resolution {resolution} must be a positive multiple of the downsample factor {factor}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    wrapper = export_wrapper(model).to("cpu")
    names = list(output_names(model))
    dummy = torch.zeros(2, IN_CHANNELS, resolution, resolution, dtype=torch.float32)
    with torch.no_grad():
        dims = graph_dims(names, wrapper(dummy[:1]))
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is deprecated upstream but is the one that works without onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (dummy,),
            path,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes=_dynamic_axes(dims),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    _fix_output_shapes(path, {INPUT_NAME: [BATCH, IN_CHANNELS, HEIGHT, WIDTH]}, dims)
    log.info("exported encoder to %s (opset %d, native resolution %d)", path, opset, resolution)


def _set_dims(value: onnx.ValueInfoProto, shape: Dims) -> None:
    dims = value.type.tensor_type.shape.dim
    del dims[:]
    for size in shape:
        if isinstance(size, str):
            dims.add().dim_param = size
        else:
            dims.add().dim_value = int(size)


def _fix_output_shapes(path: str, inputs: dict[str, Dims], outputs: dict[str, Dims]) -> None:
    """Rewrite the graph's declared input/output shapes to ``inputs``/``outputs``.

    The legacy exporter's shape inference loses the static channel sizes after the moments split
    (and after ArgMin), invents names like "Slicemean_dim_3" and even reuses the "batch" symbol
    for a spatial dim, which would tell consumers that height equals batch. The input is
    rewritten too so both sides always use the same, documented symbols.
    """
    proto = onnx.load(path)
    for value in proto.graph.input:
        if value.name in inputs:
            _set_dims(value, inputs[value.name])
    for value in proto.graph.output:
        _set_dims(value, outputs[value.name])
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
