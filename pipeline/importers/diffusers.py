"""Import a diffusers ``AutoencoderKL`` directory into a latentpipe checkpoint.

    latentpipe import source=path/to/vae output=runs/imported/checkpoint_sd-vae resolution=256
    latentpipe export checkpoint=runs/imported/checkpoint_sd-vae output=encoders/sd-vae

``source`` is a local directory as written by ``AutoencoderKL.save_pretrained`` (``config.json``
plus ``diffusion_pytorch_model.safetensors``; a ``.bin`` is read with
``torch.load(weights_only=True)``, never unpickled freely). diffusers itself is not needed. The
architecture comes from ``config.json``; weights are renamed by the explicit rules in
:mod:`pipeline.importers.diffusers_keys` and must match the model exactly. The published
``scaling_factor``/``shift_factor`` travel in ``model.scaling_factor``/``model.shift_factor`` so
the exported sidecar carries them instead of statistics measured on some other corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
from omegaconf import MISSING

from pipeline.config import to_dict
from pipeline.importers.diffusers_keys import identity_conv, map_state_dict
from pipeline.models import KLAutoencoder, ModelConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}  # -> has attention
UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


@dataclass
class ImportConfig:
    source: str = MISSING  # local diffusers AutoencoderKL directory (config.json + weights)
    output: str = MISSING  # checkpoint directory to create (local path or fsspec URL)
    resolution: int = 256  # data.resolution recorded in the checkpoint: export's input size
    run_name: str = "imported"  # train.run_name recorded in the checkpoint config


def model_config_from_diffusers(config: dict[str, Any]) -> ModelConfig:
    """Translate an ``AutoencoderKL`` config.json into a :class:`ModelConfig`, refusing the rest."""
    _check_supported(config)
    widths = [int(c) for c in config["block_out_channels"]]
    if any(c % widths[0] for c in widths):
        raise ValueError(f"config.json: block_out_channels {widths} are not multiples of the first")
    resolution = _sample_size(config)
    levels = _attention_levels(config, len(widths))
    scaling = config.get("scaling_factor")
    if scaling is None:
        # diffusers would fall back to its class default; we measure from data instead.
        log.warning("config.json has no scaling_factor: export will measure it from data")
    return ModelConfig(
        kind="kl",
        in_channels=int(config.get("in_channels", 3)),
        ch=widths[0],
        ch_mult=[c // widths[0] for c in widths],
        num_res_blocks=int(config.get("layers_per_block", 1)),
        z_channels=int(config.get("latent_channels", 4)),
        groups=int(config.get("norm_num_groups", 32)),
        attention=bool(config.get("mid_block_add_attention", True)),
        attn_resolutions=[resolution // 2**i for i in levels],
        resolution=resolution,
        double_z=True,
        embed_dim=int(config.get("latent_channels", 4)),
        scaling_factor=float(scaling or 0.0),
        shift_factor=float(config.get("shift_factor") or 0.0),
    )


def _check_supported(config: dict[str, Any]) -> None:
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ValueError(f"config.json describes a {name}, only AutoencoderKL can be imported")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"config.json: act_fn={config['act_fn']!r} (only 'silu' is supported)")
    if config.get("in_channels", 3) != config.get("out_channels", 3):
        raise ValueError("config.json: in_channels and out_channels must be equal")
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        # Per-channel normalisation has no place in the sidecar yet; say so rather than drop it.
        log.warning("config.json latents_mean/latents_std are not carried over")
    if "block_out_channels" not in config:
        raise ValueError("config.json: block_out_channels is missing")


def _sample_size(config: dict[str, Any]) -> int:
    size = config.get("sample_size", 256)
    return int(size[0] if isinstance(size, list | tuple) else size)


def _attention_levels(config: dict[str, Any], num_levels: int) -> list[int]:
    """Levels (0 = full resolution) with attention; encoder and decoder must agree."""
    down = config.get("down_block_types", ["DownEncoderBlock2D"] * num_levels)
    up = config.get("up_block_types", ["UpDecoderBlock2D"] * num_levels)
    if len(down) != num_levels or len(up) != num_levels:
        raise ValueError("config.json: down/up_block_types must have one entry per level")
    for kind in (*down, *up):
        if kind not in DOWN_TYPES and kind not in UP_TYPES:
            raise ValueError(f"config.json: block type {kind!r} is not supported")
    enc = [i for i, kind in enumerate(down) if DOWN_TYPES.get(kind)]
    dec = sorted(num_levels - 1 - j for j, kind in enumerate(up) if UP_TYPES.get(kind))
    if enc != dec:
        raise ValueError(
            f"config.json: attention on encoder levels {enc} but decoder levels {dec}; "
            "latentpipe uses the same model.attn_resolutions for both"
        )
    return enc


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Tensors of a diffusers model directory: safetensors, else a weights-only ``.bin``."""
    path = directory / SAFETENSORS_NAME
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), path
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    path = directory / BIN_NAME
    if path.is_file():
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in several types; none may run code
            raise ValueError(f"{path} is not a plain tensor file (refused): {exc}") from None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{path} does not hold a flat dict of tensors")
        return state, path
    present = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
        f"no {SAFETENSORS_NAME} or {BIN_NAME} in {directory} (found: {', '.join(present)})"
    )


def load_diffusers_autoencoder(source: str) -> tuple[KLAutoencoder, dict[str, Any]]:
    """Build a :class:`KLAutoencoder` from a local diffusers directory; returns (model, info)."""
    directory = _local_dir(source)
    config = _read_config(directory)
    model_cfg = model_config_from_diffusers(config)
    model = KLAutoencoder(model_cfg)
    tensors, weights_path = read_weights(directory)
    _fill_quant_convs(tensors, config, model_cfg)
    state = map_state_dict(tensors, model.state_dict(), len(model_cfg.ch_mult))
    model.load_state_dict(state, strict=True)
    info = {"source": str(directory), "weights": weights_path.name}
    info["weights_sha256"] = _sha256(weights_path)
    return model.eval(), info


def _local_dir(source: str) -> Path:
    if "://" in source and not source.startswith("file://"):
        raise ValueError(f"import source must be a local directory, got {source!r}")
    directory = Path(source.removeprefix("file://")).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"import source is not a directory: {directory}")
    return directory


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found (expected a diffusers save_pretrained directory)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def _fill_quant_convs(
    tensors: dict[str, torch.Tensor], config: dict[str, Any], cfg: ModelConfig
) -> None:
    """Models saved with use_(post_)quant_conv=False get identity 1x1 convs: same function."""
    for name, flag, channels in (
        ("quant_conv", "use_quant_conv", 2 * cfg.z_channels),
        ("post_quant_conv", "use_post_quant_conv", cfg.z_channels),
    ):
        if not config.get(flag, True):
            for param, value in identity_conv(channels).items():
                tensors.setdefault(f"{name}.{param}", value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_diffusers(cfg: ImportConfig) -> dict[str, Any]:
    """Write ``cfg.source`` as a latentpipe checkpoint at ``cfg.output``; returns a summary.

    The checkpoint is ``state.pt`` (model, a fresh optimiser state, step 0) plus ``config.yaml``
    (a TrainRunConfig whose ``data.shards`` is empty), so ``latentpipe export`` reads it as it
    reads a trained one.
    """
    if cfg.resolution <= 0:
        raise ValueError(f"resolution must be positive, got {cfg.resolution}")
    fs, root = fsspec.core.url_to_fs(cfg.output)
    if fs.exists(f"{root.rstrip('/')}/state.pt"):
        raise ValueError(f"{cfg.output} already holds a checkpoint; choose a new output")
    model, info = load_diffusers_autoencoder(cfg.source)
    run_cfg = _run_config(model.config, cfg)
    _write(model, run_cfg, fs, root)
    return {
        "checkpoint": cfg.output,
        **info,
        "parameters": sum(p.numel() for p in model.parameters()),
        "scaling_factor": model.config.scaling_factor,
        "shift_factor": model.config.shift_factor,
        "model": to_dict(model.config),
    }


def _run_config(model_cfg: ModelConfig, cfg: ImportConfig):
    from pipeline.data.reader import DataConfig
    from pipeline.train.config import TrainConfig, TrainRunConfig

    return TrainRunConfig(
        data=DataConfig(shards="", resolution=cfg.resolution),
        model=model_cfg,
        train=TrainConfig(run_name=cfg.run_name),
    )


def _write(model: KLAutoencoder, run_cfg, fs, root: str) -> None:
    """Build the checkpoint locally, then copy it into place (works for object stores too)."""
    from pipeline.train.checkpoint import write_checkpoint
    from pipeline.train.step import make_optimizer

    train = run_cfg.train
    optimizer = make_optimizer(model, train.lr, train.betas, train.weight_decay)
    with tempfile.TemporaryDirectory(prefix="latentpipe-import-") as tmp:
        write_checkpoint(tmp, model, optimizer, 0, run_cfg)
        fs.makedirs(root, exist_ok=True)
        for name in sorted(os.listdir(tmp)):
            fs.put_file(os.path.join(tmp, name), f"{root.rstrip('/')}/{name}")
    log.info("imported checkpoint written to %s", root)
