"""Numerical parity between an exported ONNX encoder (run in onnxruntime) and the torch model.

KL encoders: every output (mean, logvar) must agree within ``atol``.

VQ encoders: ``indices`` must be *equal*. The only mismatch tolerated is an exact tie: the code
ONNX Runtime picked is, for that latent vector, as near as the code torch picked up to float32
rounding of the distance (|d(z, c_ort) - d(z, c_torch)| <= ``TIE_RTOL`` * (|z|^2 + |c_torch|^2),
distances in float64 on torch's pre-quantisation latent). Two float32 argmins over different
kernels can legitimately split such ties; anything else fails. ``quantized`` must equal the
codebook lookup of the ONNX indices within ``atol`` (so, where the indices agree, torch's output).

Export checks the native (trained) square size and one non-square size, since the graph has
dynamic height/width axes and the encode job feeds aspect-ratio buckets.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from pipeline.export.onnx_export import INPUT_NAME, export_wrapper, is_vq, output_names

log = logging.getLogger(__name__)

TIE_RTOL = 1e-5  # relative distance gap under which two codes count as an exact tie


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


class IndexParityError(ParityError):
    """ONNX Runtime picked different VQ codes than torch beyond exact ties."""

    def __init__(self, mismatches: int, ties: int, total: int, where: str = ""):
        self.max_abs_diff, self.atol = float("inf"), 0.0
        self.mismatches, self.ties, self.total = mismatches, ties, total
        target = f" for {where}" if where else ""
        RuntimeError.__init__(
            self,
            f"ONNX/torch parity check failed{target}: {mismatches} of {total} code indices differ "
            f"({ties} of them exact ties, {mismatches - ties} not)",
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
    """The export wrapper's outputs from the torch model, as numpy (KL: float32 mean/logvar)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        outputs = export_wrapper(model)(images.to(device))
    arrays = [t.detach().cpu().numpy() for t in outputs]
    if not is_vq(model):
        arrays = [a.astype(np.float32) for a in arrays]
    return dict(zip(output_names(model), arrays, strict=True))


def _code_distances(model: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(flat pre-quantisation latents [P, C], codebook [K, C]) in float64, as the quantizer sees
    them (unit rows for cosine distance)."""
    quantizer = model.quantize
    with torch.no_grad():
        z = model.quant_conv(model.encoder(images.to(next(model.parameters()).device)))
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
        if quantizer.config.distance == "cosine":
            flat = torch.nn.functional.normalize(flat, dim=1)
        codes = quantizer.codes().detach().double()
    return flat.cpu().numpy(), codes.cpu().numpy()


def count_index_ties(
    model: nn.Module, images: torch.Tensor, ref: np.ndarray, got: np.ndarray
) -> tuple[int, int]:
    """(mismatched positions, of which exact ties) between torch ``ref`` and ORT ``got`` indices."""
    mismatch = (ref != got).reshape(-1)
    if not mismatch.any():
        return 0, 0
    flat, codes = _code_distances(model, images)
    x = flat[mismatch]
    c_ref, c_got = codes[ref.reshape(-1)[mismatch]], codes[got.reshape(-1)[mismatch]]
    gap = np.abs(((x - c_got) ** 2).sum(1) - ((x - c_ref) ** 2).sum(1))
    scale = (x**2).sum(1) + (c_ref**2).sum(1)
    return int(mismatch.sum()), int((gap <= TIE_RTOL * scale).sum())


def compare_vq_outputs(
    model: nn.Module,
    images: torch.Tensor,
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    atol: float,
    where: str = "",
) -> dict[str, Any]:
    """Check VQ outputs (see module docstring); returns the figures recorded in the sidecar."""
    ref, got = reference["indices"], candidate["indices"]
    if got.shape != ref.shape or got.dtype != np.int64:
        raise ParityError(float("inf"), 0.0, f"indices {got.dtype}{got.shape} != int64{ref.shape}")
    mismatches, ties = count_index_ties(model, images, ref, got)
    if mismatches > ties:
        raise IndexParityError(mismatches, ties, ref.size, where)
    codes = model.quantize.codes().detach().float().cpu().numpy()
    lookup = np.moveaxis(codes[got], -1, 1)  # [N, h, w, C] -> [N, C, h, w]
    diff = compare_outputs(
        {"quantized": lookup}, {"quantized": candidate["quantized"]}, atol, where
    )
    return {
        "max_abs_diff": diff,
        "indices_compared": int(ref.size),
        "index_mismatches": mismatches,
        "index_ties": ties,
        "tie_rtol": TIE_RTOL,
    }


def random_images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """A seeded batch in the encoder's input range [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=gen) * 2.0 - 1.0


def non_square_size(resolution: int, factor: int) -> tuple[int, int]:
    """The extra size parity checks: native height, width two latent pixels wider. A width that
    differs from the height catches a graph that swapped or fused the spatial axes."""
    return resolution, resolution + 2 * factor


def _compare(
    session: ort.InferenceSession,
    model: nn.Module,
    images: torch.Tensor,
    atol: float,
    where: str,
) -> dict[str, Any]:
    """Run ``images`` through ORT and torch; the figures recorded in the sidecar, or raise."""
    reference = torch_reference(model, images)
    names = list(output_names(model))
    candidate = dict(zip(names, session.run(names, {INPUT_NAME: images.numpy()}), strict=True))
    if is_vq(model):
        return compare_vq_outputs(model, images, reference, candidate, atol, where)
    return {"max_abs_diff": compare_outputs(reference, candidate, atol, where)}


def parity_report(
    onnx_path: str,
    model: nn.Module,
    resolution: int,
    batch: int,
    atol: float,
    seed: int = 0,
    width: int | None = None,
) -> dict[str, Any]:
    """Run both on a seeded random batch of ``resolution`` x ``width`` (default: square) images
    in [-1, 1]; return {"max_abs_diff", ...} or raise."""
    width = width or resolution
    images = random_images(batch, resolution, width, seed)
    session = reference_session(onnx_path)
    report = _compare(session, model, images, atol, f"{onnx_path} at {resolution}x{width}")
    log.info("parity %s at %dx%d, batch %d: %s", onnx_path, resolution, width, batch, report)
    return report


def reference_session(onnx_path: str) -> ort.InferenceSession:
    """ONNX Runtime's CPU provider, the reference every other provider is compared with (export
    needs nothing of the encode job's session factory: no device choice, no fp16)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])


def spatial_parity_report(
    onnx_path: str, model: nn.Module, resolution: int, batch: int, atol: float, seed: int = 0
) -> dict[str, Any]:
    """Parity at the native square size plus one non-square size (see :func:`non_square_size`).

    Returns the native figures at the top level (as :func:`parity_report`) and the other size's
    under ``"non_square"`` with its ``height`` and ``width``. Either failing raises.
    """
    height, width = non_square_size(resolution, int(model.downsample_factor))
    report = parity_report(onnx_path, model, resolution, batch, atol, seed)
    other = parity_report(onnx_path, model, height, batch, atol, seed + 1, width=width)
    return {**report, "non_square": {"height": height, "width": width, **other}}


def check_parity(
    onnx_path: str,
    model: nn.Module,
    resolution: int,
    batch: int,
    atol: float,
    seed: int = 0,
    width: int | None = None,
) -> float:
    """Like :func:`parity_report` but returns only the max abs diff (float outputs)."""
    return parity_report(onnx_path, model, resolution, batch, atol, seed, width)["max_abs_diff"]
