"""Numerical parity between an exported ONNX encoder (run in onnxruntime) and the torch model."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from pipeline.encode.session import make_session
from pipeline.export.onnx_export import INPUT_NAME, OUTPUT_NAMES, EncoderForExport

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """ONNX Runtime and torch disagree by more than the tolerance."""

    def __init__(self, max_abs_diff: float, atol: float, where: str = ""):
        self.max_abs_diff = float(max_abs_diff)
        self.atol = float(atol)
        target = f" for {where}" if where else ""
        super().__init__(
            f"ONNX/torch parity check failed{target}: max |diff| = {self.max_abs_diff:.3e} "
            f"exceeds atol = {self.atol:.3e}"
        )


def max_abs_diff(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> float:
    """Largest absolute elementwise difference over all named outputs (shapes must match)."""
    worst = 0.0
    for name, ref in reference.items():
        got = candidate[name]
        if got.shape != ref.shape:
            raise ParityError(
                float("inf"), 0.0, f"output {name!r} shape {got.shape} != {ref.shape}"
            )
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        # NaN anywhere is a failure, not a silently ignored value.
        worst = max(worst, float("inf") if np.isnan(diff).any() else float(diff.max(initial=0.0)))
    return worst


def compare_outputs(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], atol: float, where: str = ""
) -> float:
    """Return the max abs diff; raise ParityError if it exceeds ``atol``."""
    diff = max_abs_diff(reference, candidate)
    if not diff <= atol:
        raise ParityError(diff, atol, where)
    return diff


def torch_reference(model: nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Posterior (mean, logvar) from the torch model as float32 numpy arrays."""
    device = next(model.parameters()).device
    wrapper = EncoderForExport(model).eval()
    with torch.no_grad():
        outputs = wrapper(images.to(device))
    return {n: t.detach().float().cpu().numpy() for n, t in zip(OUTPUT_NAMES, outputs, strict=True)}


def check_parity(
    onnx_path: str, model: nn.Module, resolution: int, batch: int, atol: float, seed: int = 0
) -> float:
    """Run both on a seeded random batch in [-1, 1]; return max abs diff or raise ParityError."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, resolution, resolution, generator=gen) * 2.0 - 1.0
    reference = torch_reference(model, images)
    session = make_session(onnx_path, device="cpu")
    ort_out = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})
    candidate = dict(zip(OUTPUT_NAMES, ort_out, strict=True))
    diff = compare_outputs(reference, candidate, atol, onnx_path)
    log.info("parity %s: max |diff| %.3e (atol %.1e, batch %d)", onnx_path, diff, atol, batch)
    return diff
