"""Checkpoint -> ``encoder.onnx`` + ``encoder.json``: export, parity check, latent stats, sidecar.

VQ models also get ``codebook.npy`` beside the ONNX file (see pipeline.contracts.sidecar).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from omegaconf import MISSING
from torch import nn

from pipeline.config import save_resolved_config
from pipeline.contracts.sidecar import (
    Sidecar,
    build_sidecar,
    file_sha256,
    vq_fields,
    write_sidecar,
)
from pipeline.data.urls import expand_shard_urls
from pipeline.evaluate.quality import read_eval
from pipeline.export.onnx_export import export_encoder_onnx, is_vq
from pipeline.export.parity import spatial_parity_report
from pipeline.export.stats import estimate_latent_stats_counted
from pipeline.train.checkpoint import STATE_FILE, load_model

log = logging.getLogger(__name__)

ONNX_NAME = "encoder.onnx"
SIDECAR_NAME = "encoder.json"
CODEBOOK_NAME = "codebook.npy"


@dataclass
class ExportConfig:
    """``scale_shards`` defaults to the checkpoint's data.val_shards, then data.shards."""

    checkpoint: str = MISSING
    output: str = MISSING
    opset: int = 17
    atol: float = 1e-4
    parity_batch: int = 4
    scale_shards: str = ""
    scale_samples: int = 256
    device: str = "cpu"


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _declared_scale(model: nn.Module) -> dict[str, float] | None:
    """The scaling/shift factor the weights were published with (imports), if any."""
    cfg = getattr(model, "config", None)
    scaling = float(getattr(cfg, "scaling_factor", 0.0) or 0.0)
    if scaling <= 0:
        return None
    return {"scaling_factor": scaling, "shift_factor": float(getattr(cfg, "shift_factor", 0.0))}


def _latent_stats(model: nn.Module, spec: str, resolution: int, limit: int) -> dict[str, Any]:
    if limit <= 0 or not spec:
        if _declared_scale(model) is None:
            # Identity scaling keeps the sidecar valid; say so loudly: diffusion training cares.
            log.warning("latent statistics skipped (no shards or scale_samples<=0): scaling=1")
        return {"mean": 0.0, "std": 1.0, "samples": 0, "source": spec}
    mean, std, n = estimate_latent_stats_counted(model, expand_shard_urls(spec), resolution, limit)
    return {"mean": mean, "std": std, "samples": n, "source": spec}


def export_model(
    model: nn.Module,
    output: str,
    resolution: int,
    *,
    opset: int = 17,
    atol: float = 1e-4,
    parity_batch: int = 4,
    scale_shards: str = "",
    scale_samples: int = 0,
    checkpoint: dict[str, Any] | None = None,
    stats_device: str = "cpu",
    quality: dict[str, Any] | None = None,
) -> Sidecar:
    """Export ``model``'s encoder to ``{output}/encoder.onnx`` + sidecar; return the sidecar.

    ``output`` may be a local dir or an fsspec URL. Files are built in a temporary directory and
    only copied to ``output`` once parity passed, so a failed export leaves nothing behind.
    The graph has dynamic batch/height/width axes; parity is checked at ``resolution`` square and
    at one non-square size. Export and parity run on CPU (the reference ORT provider);
    ``stats_device`` only hosts the latent-statistics pass. ``scale_samples`` <= 0 skips
    statistics (scaling_factor 1). A model whose config carries a published ``scaling_factor``
    (> 0, set by imports) keeps it and its ``shift_factor`` in the sidecar; measured statistics
    are then recorded for reference only.
    """
    model = model.eval()
    with tempfile.TemporaryDirectory(prefix="latentpipe-export-") as tmp:
        onnx_path = os.path.join(tmp, ONNX_NAME)
        export_encoder_onnx(model.to("cpu"), resolution, onnx_path, opset)
        parity = spatial_parity_report(onnx_path, model, resolution, parity_batch, atol)
        vq = _write_codebook(model, tmp) if is_vq(model) else None
        stats = _latent_stats(model.to(stats_device), scale_shards, resolution, scale_samples)
        model.to("cpu")
        sidecar = build_sidecar(
            onnx_file=ONNX_NAME,
            onnx_sha256=file_sha256(onnx_path),
            opset=opset,
            model_kind=str(getattr(getattr(model, "config", None), "kind", "kl")),
            resolution=resolution,
            downsample_factor=int(model.downsample_factor),
            latent_channels=int(model.latent_channels),
            latent_stats=stats,
            declared_scale=_declared_scale(model),
            parity={**parity, "atol": atol, "batch": parity_batch},
            checkpoint=checkpoint or {"path": None, "step": None, "sha256": None},
            vq=vq,
            quality=quality,  # held-out figures of the checkpoint (PSNR/SSIM), from training
        )
        sidecar_local = write_sidecar(os.path.join(tmp, SIDECAR_NAME), sidecar)
        extra = [os.path.join(tmp, CODEBOOK_NAME)] if vq else []
        _publish([*extra, onnx_path, sidecar_local], output)
    log.info("encoder exported to %s", output)
    return sidecar


def _write_codebook(model: nn.Module, directory: str) -> dict[str, Any]:
    """Save the lookup codebook (``quantize.codes()``: unit rows for cosine) as float32 .npy."""
    quantizer = model.quantize
    codes = quantizer.codes().detach().to("cpu", torch.float32).numpy()
    path = os.path.join(directory, CODEBOOK_NAME)
    np.save(path, np.ascontiguousarray(codes), allow_pickle=False)
    return vq_fields(
        CODEBOOK_NAME,
        file_sha256(path),
        num_codes=codes.shape[0],
        code_dim=codes.shape[1],
        distance=quantizer.config.distance,
    )


def _publish(local_files: list[str], output: str) -> None:
    """Copy files to ``output`` in order; the sidecar goes last, so a reader that finds it can
    rely on the model (and codebook) it pins being complete."""
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    for path in local_files:
        fs.put_file(path, f"{root.rstrip('/')}/{os.path.basename(path)}")


def _checkpoint_step(state_url: str) -> int | None:
    """Training step recorded in a checkpoint's ``state.pt`` (None if it cannot be read)."""
    try:
        if _is_local(state_url):
            # mmap: only the small "step" entry is touched, not the weights/optimizer state.
            local = state_url.removeprefix("file://")
            state = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        else:
            with fsspec.open(state_url, "rb") as fh:
                state = torch.load(fh, map_location="cpu", weights_only=True)
        return int(state["step"])
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as exc:
        log.warning("could not read training step from %s: %s", state_url, exc)
        return None


def _checkpoint_info(ckpt_dir: str) -> dict[str, Any]:
    """The sidecar's ``checkpoint`` block: path, training step and sha256 of ``state.pt``.

    The hash pins the exact weights the encoder came from (checkpoint dirs get overwritten or
    re-uploaded); it streams the file, so remote URLs are not downloaded to disk.
    """
    state_url = f"{ckpt_dir.rstrip('/')}/{STATE_FILE}"
    return {
        "path": ckpt_dir,
        "step": _checkpoint_step(state_url),
        "sha256": file_sha256(state_url),
    }


def _validate(cfg: ExportConfig) -> None:
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"export.device must be 'cpu' or 'cuda', got {cfg.device!r}")
    if cfg.atol < 0 or cfg.parity_batch < 1:
        raise ValueError("export.atol must be >= 0 and export.parity_batch >= 1")


def export_from_checkpoint(cfg: ExportConfig) -> Sidecar:
    """Load a training checkpoint and export its encoder; returns its sidecar."""
    _validate(cfg)
    model, run_cfg = load_model(cfg.checkpoint)
    resolution = int(run_cfg.data.resolution)
    spec = cfg.scale_shards or str(run_cfg.data.val_shards or "") or str(run_cfg.data.shards)
    sidecar = export_model(
        model,
        cfg.output,
        resolution,
        opset=cfg.opset,
        atol=cfg.atol,
        parity_batch=cfg.parity_batch,
        scale_shards=spec,
        scale_samples=cfg.scale_samples,
        checkpoint=_checkpoint_info(cfg.checkpoint),
        stats_device=cfg.device,
        quality=read_eval(cfg.checkpoint),
    )
    save_resolved_config(cfg, cfg.output, "export-config.yaml")
    return sidecar
