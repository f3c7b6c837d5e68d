"""diffusers' ``config.json`` <-> latentpipe's ``ModelConfig``, for ``AutoencoderKL`` and ``VQModel``.

latentpipe's KL autoencoder is SD's architecture, which diffusers' ``AutoencoderKL`` expresses
exactly: ``block_out_channels = ch * ch_mult``, ``layers_per_block = num_res_blocks``,
``latent_channels = z_channels``, ``norm_num_groups = groups``, ``mid_block_add_attention =
attention`` and per-level attention as ``Attn{Down,Up}...Block2D`` block types (levels named by
``sample_size = model.resolution``, LDM's ``attn_resolutions`` semantics). Dropout only acts in
training, so it is not written. A KL model whose quant convs change the channel count
(``embed_dim`` other than ``z_channels``) has no ``AutoencoderKL`` form and is saved in
latentpipe's own layout.

The VQ autoencoder is LDM's ``VQModel`` (encoder -> quant_conv -> nearest code -> post_quant_conv
-> decoder, GroupNorm decoder), which diffusers' ``VQModel`` expresses with ``latent_channels =
z_channels``, ``vq_embed_dim = code_dim`` and ``num_vq_embeddings = num_codes``, for the l2
distance diffusers uses; cosine-distance codebooks (unit codes, normalised lookups) are not
LDM's and are saved in latentpipe's own layout. diffusers needs neither at run time: this module
only reads and writes JSON.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.artifacts.card import LAYOUT_AUTOENCODER_KL, LAYOUT_NATIVE, LAYOUT_VQ_MODEL
from pipeline.models import ModelConfig

log = logging.getLogger(__name__)

DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}  # -> has attention
UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def layout_for(cfg: ModelConfig) -> str:
    """The directory layout a model is saved in: diffusers' where it expresses the model."""
    embed = cfg.embed_dim or cfg.z_channels
    if cfg.kind == "kl" and embed == cfg.z_channels:
        return LAYOUT_AUTOENCODER_KL
    if cfg.kind == "vq" and cfg.vq.distance == "l2":
        return LAYOUT_VQ_MODEL
    return LAYOUT_NATIVE


def _block_types(cfg: ModelConfig) -> tuple[list[str], list[str]]:
    levels = len(cfg.ch_mult)
    attn = {i for i in range(levels) if cfg.resolution // 2**i in cfg.attn_resolutions}
    down = ["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(levels)]
    # diffusers lists decoder blocks from the deepest level up.
    up = [
        "AttnUpDecoderBlock2D" if levels - 1 - j in attn else "UpDecoderBlock2D"
        for j in range(levels)
    ]
    return down, up


def _trunk(cfg: ModelConfig) -> dict[str, Any]:
    down, up = _block_types(cfg)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "norm_num_groups": cfg.groups,
        "sample_size": cfg.resolution,
        "mid_block_add_attention": cfg.attention,
    }


# No "_diffusers_version": diffusers did not write these files (it reads the key only for UNets).
def autoencoder_kl_config(
    cfg: ModelConfig, scaling_factor: float, shift_factor: float | None
) -> dict[str, Any]:
    """diffusers' ``AutoencoderKL`` config.json for a ``kind=kl`` model."""
    return {
        "_class_name": "AutoencoderKL",
        **_trunk(cfg),
        "latent_channels": cfg.z_channels,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }


def vq_model_config(cfg: ModelConfig, scaling_factor: float) -> dict[str, Any]:
    """diffusers' ``VQModel`` config.json for a ``kind=vq`` model with l2 distance."""
    return {
        "_class_name": "VQModel",
        **_trunk(cfg),
        "latent_channels": cfg.z_channels,
        "num_vq_embeddings": cfg.vq.num_codes,
        "vq_embed_dim": cfg.vq.code_dim,
        "scaling_factor": scaling_factor,
        "norm_type": "group",
        "lookup_from_codebook": False,
        "force_upcast": False,
    }


def diffusers_config(
    cfg: ModelConfig, scaling_factor: float, shift_factor: float | None
) -> dict[str, Any]:
    layout = layout_for(cfg)
    if layout == LAYOUT_AUTOENCODER_KL:
        return autoencoder_kl_config(cfg, scaling_factor, shift_factor)
    if layout == LAYOUT_VQ_MODEL:
        return vq_model_config(cfg, scaling_factor)
    raise ValueError(f"model kind {cfg.kind!r} with this configuration has no diffusers layout")


# ----------------------------------------------------------------------------- reading


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


def uses_quant_convs(config: dict[str, Any]) -> dict[str, bool]:
    """{"quant_conv": bool, "post_quant_conv": bool}: whether the saved model has them."""
    return {
        "quant_conv": bool(config.get("use_quant_conv", True)),
        "post_quant_conv": bool(config.get("use_post_quant_conv", True)),
    }
