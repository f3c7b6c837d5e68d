"""Import a diffusers ``AutoencoderKL`` directory as a latentpipe model artifact.

    latentpipe import source=path/to/vae output=models/sd-vae resolution=256
    latentpipe export model=models/sd-vae output=encoders/sd-vae

``source`` is a local directory as written by ``AutoencoderKL.save_pretrained`` (``config.json``
plus ``diffusion_pytorch_model.safetensors``; a ``.bin`` is read with
``torch.load(weights_only=True)``, never unpickled freely). diffusers itself is not needed. The
architecture comes from ``config.json``; weights are renamed by the explicit rules in
:mod:`pipeline.artifacts.diffusers_keys` and must match the model exactly. The output is a model
artifact (:mod:`pipeline.artifacts`): weights re-saved as safetensors, a config.json diffusers
reads, and ``latentpipe.json`` naming the source and the native ``resolution``. The published
``scaling_factor``/``shift_factor`` travel in ``model.scaling_factor``/``model.shift_factor`` so
the exported sidecar carries them instead of statistics measured on some other corpus. No
optimiser or training state is written: an import is a model, not a training run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from pipeline.artifacts.card import (
    CARD_FILE,
    DIFFUSERS_CONFIG,
    ImageSpec,
    Provenance,
    artifact_sha256,
    exists,
    join,
)
from pipeline.artifacts.store import config_dict, load_model_artifact, save_model_artifact
from pipeline.models import KLAutoencoder, ModelConfig

log = logging.getLogger(__name__)


@dataclass
class ImportConfig:
    source: str = MISSING  # local diffusers AutoencoderKL directory (config.json + weights)
    output: str = MISSING  # model artifact directory to create (local path or fsspec URL)
    resolution: int = 256  # native resolution recorded in the artifact: export's input size


def load_diffusers_autoencoder(source: str) -> tuple[KLAutoencoder, ModelConfig, dict[str, Any]]:
    """(model in eval mode, its ModelConfig, info) from a local diffusers directory."""
    directory = _local_dir(source)
    model, model_cfg, card = load_model_artifact(str(directory))
    if model_cfg.kind != "kl":
        raise ValueError(f"{directory} holds a {model_cfg.kind!r} model, not an AutoencoderKL")
    info = {
        "source": str(directory),
        "weights": card.weights_file,
        "weights_sha256": card.weights_sha256,
    }
    return model, model_cfg, info


def _local_dir(source: str) -> Path:
    if "://" in source and not source.startswith("file://"):
        raise ValueError(f"import source must be a local directory, got {source!r}")
    directory = Path(source.removeprefix("file://")).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"import source is not a directory: {directory}")
    return directory


def import_diffusers(cfg: ImportConfig) -> dict[str, Any]:
    """Write ``cfg.source`` as a model artifact at ``cfg.output``; returns a summary."""
    if cfg.resolution <= 0:
        raise ValueError(f"resolution must be positive, got {cfg.resolution}")
    if exists(join(cfg.output, CARD_FILE)) or exists(join(cfg.output, DIFFUSERS_CONFIG)):
        raise ValueError(f"{cfg.output} already holds a model artifact; choose a new output")
    model, model_cfg, info = load_diffusers_autoencoder(cfg.source)
    card = save_model_artifact(
        cfg.output,
        model,
        model_cfg,
        image=ImageSpec(model_cfg.in_channels, "signed", cfg.resolution),
        provenance=Provenance(source={"format": "diffusers.AutoencoderKL", **info}),
    )
    log.info("imported model artifact written to %s", cfg.output)
    return {
        "model": cfg.output,
        "model_sha256": artifact_sha256(cfg.output),
        **info,
        "parameters": sum(p.numel() for p in model.parameters()),
        "scaling_factor": card.latent_scale.scaling_factor,
        "shift_factor": card.latent_scale.shift_factor,
        "config": config_dict(model_cfg),
    }
