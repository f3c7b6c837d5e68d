"""Model artifact -> ``encoder.onnx`` + ``encoder.json``: export, parity check, latent stats,
sidecar naming the artifact (path and content hash) the encoder came from.

The model is any model artifact (:mod:`pipeline.artifacts`): one latentpipe wrote (a training
checkpoint's ``model/``, an import), one diffusers' ``AutoencoderKL.save_pretrained`` wrote, a
checkpoint directory or a run directory (its newest complete checkpoint). VQ models also get
``codebook.npy`` beside the ONNX file (see pipeline.contracts.sidecar).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import fsspec
import numpy as np
import torch
from omegaconf import MISSING
from torch import nn

from pipeline.artifacts.card import artifact_sha256, resolve_model_dir
from pipeline.artifacts.store import load_model_artifact
from pipeline.config import save_resolved_config
from pipeline.contracts.sidecar import (
    ModelRef,
    Sidecar,
    build_sidecar,
    file_sha256,
    vq_fields,
    write_sidecar,
)
from pipeline.data.urls import expand_shard_urls
from pipeline.export.onnx_export import export_encoder_onnx, is_vq
from pipeline.export.parity import spatial_parity_report
from pipeline.export.stats import estimate_latent_stats_counted

log = logging.getLogger(__name__)

ONNX_NAME = "encoder.onnx"
SIDECAR_NAME = "encoder.json"
CODEBOOK_NAME = "codebook.npy"


class ExportDevice(StrEnum):
    """Where export's latent-statistics pass runs (the ONNX graph is the same)."""

    cpu = "cpu"
    cuda = "cuda"


class Weights(StrEnum):
    """Which weights of a checkpoint export takes (``export.weights``)."""

    ema = "ema"  # its model_ema/ (train.ema_decay > 0) when it has one, else model/
    raw = "raw"  # always model/


@dataclass
class ExportConfig:
    """``model``: a model artifact directory (latentpipe's or diffusers'), a ``checkpoint_*``
    directory (its ``model/``) or a run directory (its newest complete checkpoint).
    ``scale_shards`` defaults to the data the model was trained on: val_shards, then shards.
    ``weights``: from a checkpoint or run directory, ``ema`` exports the EMA of the weights
    (``model_ema/``, written with ``train.ema_decay`` > 0) when the checkpoint has it, else the
    raw ``model/``; ``raw`` always exports ``model/``. An artifact named directly is exported as
    it is; the sidecar's ``weights`` says what it held."""

    model: str = MISSING
    output: str = MISSING
    opset: int = 17
    atol: float = 1e-4
    parity_batch: int = 4
    scale_shards: str = ""
    scale_samples: int = 256
    device: ExportDevice = ExportDevice.cpu
    weights: Weights = Weights.ema

    def __post_init__(self) -> None:
        self.weights = Weights(self.weights)  # a bad value fails here or at config load
        self.device = ExportDevice(self.device)


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
    model_ref: ModelRef | None = None,
    stats_device: str = "cpu",
    quality: dict[str, Any] | None = None,
    weights: str = "raw",
) -> Sidecar:
    """Export ``model``'s encoder to ``{output}/encoder.onnx`` + sidecar; return the sidecar.

    ``output`` may be a local dir or an fsspec URL. Files are built in a temporary directory and
    only copied to ``output`` once parity passed, so a failed export leaves nothing behind.
    The graph has dynamic batch/height/width axes; parity is checked at ``resolution`` square and
    at one non-square size. Export and parity run on CPU (the reference ORT provider);
    ``stats_device`` only hosts the latent-statistics pass. ``scale_samples`` <= 0 skips
    statistics (scaling_factor 1). A model whose config carries a published ``scaling_factor``
    (> 0, set by imports) keeps it and its ``shift_factor`` in the sidecar; measured statistics
    are then recorded for reference only. ``weights`` (raw, ema, published) is recorded in the
    sidecar: which weights of the model were exported.
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
            model=model_ref or ModelRef(),
            vq=vq,
            quality=quality,  # held-out figures of the model (PSNR/SSIM), from training
            weights=weights,
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


def _validate(cfg: ExportConfig) -> None:
    if cfg.atol < 0 or cfg.parity_batch < 1:
        raise ValueError("export.atol must be >= 0 and export.parity_batch >= 1")


def export_from_artifact(cfg: ExportConfig) -> Sidecar:
    """Load a model artifact (see :class:`ExportConfig`) and export its encoder; returns the
    sidecar, which names the artifact by path and content hash."""
    _validate(cfg)
    model_dir = resolve_model_dir(cfg.model, str(cfg.weights))
    model, _, card = load_model_artifact(model_dir)
    log.info("exporting the model artifact %s (%s weights)", model_dir, card.weights_kind)
    data = card.provenance.data or {}
    spec = cfg.scale_shards or str(data.get("val_shards") or "") or str(data.get("shards") or "")
    sidecar = export_model(
        model,
        cfg.output,
        card.image.resolution,
        opset=cfg.opset,
        atol=cfg.atol,
        parity_batch=cfg.parity_batch,
        scale_shards=spec,
        scale_samples=cfg.scale_samples,
        model_ref=ModelRef(model_dir, artifact_sha256(model_dir), card.provenance.step),
        stats_device=cfg.device,
        quality=card.quality,
        weights=card.weights_kind,
    )
    save_resolved_config(cfg, cfg.output, "export-config.yaml")
    return sidecar
