"""Export the encoder half of an autoencoder to ONNX.

KL models: the graph maps a normalised image batch to the posterior parameters (mean, logvar).
Sampling is deliberately left out of the graph: consumers store the mean and may sample later with
their own RNG. VQ models: the graph returns the code ``indices`` (int64 [N, h, w]) and the
``quantized`` latents (the codebook lookup of those indices, [N, C, h, w]).
"""

from __future__ import annotations

import logging
import os
import warnings

import onnx
import torch
from torch import nn

from pipeline.models.vq import EXPORT_OUTPUT_NAMES as VQ_OUTPUT_NAMES
from pipeline.models.vq import VQAutoencoder, VQEncoderForExport

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("mean", "logvar")  # KL models; VQ models export VQ_OUTPUT_NAMES


class EncoderForExport(nn.Module):
    """Wrap an autoencoder so ``forward(image) -> (mean, logvar)`` with no sampling."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.model.encode(image)
        return posterior.mean, posterior.logvar


def is_vq(model: nn.Module) -> bool:
    return isinstance(model, VQAutoencoder)


def export_wrapper(model: nn.Module) -> nn.Module:
    """The traceable module whose outputs become the graph outputs, in eval mode."""
    wrapper = VQEncoderForExport(model) if is_vq(model) else EncoderForExport(model)
    return wrapper.eval()


def output_names(model: nn.Module) -> tuple[str, ...]:
    return VQ_OUTPUT_NAMES if is_vq(model) else OUTPUT_NAMES


def export_encoder_onnx(model: nn.Module, resolution: int, path: str, opset: int = 17) -> None:
    """Write the encoder of ``model`` to local ``path`` with a dynamic batch axis."""
    factor = int(getattr(model, "downsample_factor", 1))
    if resolution <= 0 or resolution % factor != 0:
        raise ValueError(
            f"resolution {resolution} must be a positive multiple of the downsample factor {factor}"
        )
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    wrapper = export_wrapper(model).to("cpu")
    names = list(output_names(model))
    dummy = torch.zeros(2, 3, resolution, resolution, dtype=torch.float32)
    dynamic = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in names}}
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is deprecated upstream but is the one that works without onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (dummy,),
            path,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    with torch.no_grad():
        outputs = wrapper(dummy[:1])
    _fix_output_shapes(path, {n: list(t.shape[1:]) for n, t in zip(names, outputs, strict=True)})
    log.info("exported encoder to %s (opset %d, resolution %d)", path, opset, resolution)


def _fix_output_shapes(path: str, shapes: dict[str, list[int]]) -> None:
    """Pin each output's shape to [batch, *shapes[name]] (KL: [batch, C, h, w]; VQ indices:
    [batch, h, w]).

    The legacy exporter's shape inference loses the static channel/spatial sizes after the
    moments split (and after ArgMin) and even reuses the "batch" symbol for spatial dims;
    consumers read these shapes.
    """
    proto = onnx.load(path)
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_param = "batch"
        for size in shapes[output.name]:
            dims.add().dim_value = int(size)
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
