"""Write and read model artifacts (see :mod:`pipeline.artifacts.card` for the layout).

    card = save_model_artifact(directory, model, model_cfg, image=..., provenance=...)
    model, model_cfg, card = load_model_artifact(directory)   # or a checkpoint / diffusers dir

Weights are safetensors (no pickle anywhere); the files go to any fsspec URL, the weights first
and latentpipe.json last, so a directory whose card is present is complete (the card also pins
the weights' sha256, checked on every load). Only inference weights are written: buffers that
only training reads (a VQ codebook's EMA statistics, see ``pipeline.models.training_buffers``)
stay in the training checkpoint beside the artifact.
"""

from __future__ import annotations

import hashlib
import io
import logging
from typing import Any

import fsspec
import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from pipeline.artifacts.card import (
    CARD_FILE,
    DIFFUSERS_BIN,
    DIFFUSERS_CONFIG,
    DIFFUSERS_WEIGHTS,
    LAYOUT_AUTOENCODER_KL,
    LAYOUT_NATIVE,
    NATIVE_WEIGHTS,
    ArtifactError,
    ImageSpec,
    LatentScale,
    ModelCard,
    Provenance,
    join,
    new_card,
    read_card,
    read_json,
    resolve_model_dir,
    weights_file,
    write_card,
    write_json,
)
from pipeline.artifacts.diffusers_format import (
    diffusers_config,
    layout_for,
    model_config_from_diffusers,
    uses_quant_convs,
)
from pipeline.artifacts.diffusers_keys import identity_conv, map_state_dict, to_diffusers_state_dict
from pipeline.config import ConfigError, load_dict_as
from pipeline.contracts.sidecar import default_weight_kind
from pipeline.models import ModelConfig, build_model, training_buffers

log = logging.getLogger(__name__)


def save_model_artifact(
    directory: str,
    model: nn.Module,
    model_cfg: ModelConfig,
    *,
    image: ImageSpec,
    provenance: Provenance,
    latent_scale: LatentScale | None = None,
    quality: dict | None = None,
    weights_kind: str | None = None,
) -> ModelCard:
    """Write ``model`` (built from ``model_cfg``) as a model artifact into ``directory``.

    ``latent_scale`` defaults to the published factors of ``model_cfg`` (imports), else unset.
    ``weights_kind`` ("raw", "ema", "published") defaults to "published" for an import (a
    ``provenance.source``) and "raw" otherwise.
    """
    layout = layout_for(model_cfg)
    scale = latent_scale or published_scale(model_cfg)
    state = inference_state(model)
    if layout != LAYOUT_NATIVE:
        state = to_diffusers_state_dict(state, len(model_cfg.ch_mult))
        name = DIFFUSERS_WEIGHTS
    else:
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        name = NATIVE_WEIGHTS
    data = save_safetensors(state)
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root.rstrip('/')}/{name}", data)
    card = new_card(
        kind=model_cfg.kind,
        layout=layout,
        weights_file=name,
        weights_sha256=hashlib.sha256(data).hexdigest(),
        weights_bytes=len(data),
        model=config_dict(model_cfg),
        image=image,
        latent_scale=scale,
        provenance=provenance,
        quality=quality,
        weights_kind=weights_kind or default_weight_kind(provenance.source is None),
    )
    _write_descriptions(directory, card, model_cfg)
    return card


def update_model_artifact(
    path: str, *, latent_scale: LatentScale | None = None, quality: dict | None = None
) -> ModelCard:
    """Record a measured latent scale and/or held-out quality in an artifact (weights unchanged).

    config.json (diffusers' scaling_factor/shift_factor) is rewritten before the card.
    """
    directory = resolve_model_dir(path)
    card = read_card(directory)
    if card is None:
        raise ArtifactError(f"{directory} has no {CARD_FILE}: only latentpipe artifacts update")
    changes: dict[str, Any] = {}
    if latent_scale is not None:
        changes["latent_scale"] = latent_scale
    if quality is not None:
        changes["quality"] = dict(quality)
    card = card.with_updates(**changes)
    _write_descriptions(directory, card, model_config_of(card, directory))
    return card


def _write_descriptions(directory: str, card: ModelCard, model_cfg: ModelConfig) -> None:
    if card.diffusers_layout:
        scale = card.latent_scale
        shift = None if scale.source == "unset" else scale.shift_factor
        config = diffusers_config(model_cfg, scale.scaling_factor, shift)
        write_json(join(directory, DIFFUSERS_CONFIG), config)
    write_card(directory, card)


def load_model_artifact(path: str) -> tuple[nn.Module, ModelConfig, ModelCard]:
    """(model in eval mode, its ModelConfig, its card) from a model artifact directory, a
    training checkpoint directory (its ``model/``) or a directory diffusers' ``AutoencoderKL``
    was saved to (its card is then derived from config.json). Local path or fsspec URL."""
    directory = resolve_model_dir(path)
    card = read_card(directory)
    config = None
    if card is None:
        config = read_json(join(directory, DIFFUSERS_CONFIG))
        model_cfg = model_config_from_diffusers(config)
    else:
        model_cfg = model_config_of(card, directory)
    name = weights_file(directory, card)
    data = _read_bytes(join(directory, name))
    digest = hashlib.sha256(data).hexdigest()
    if card is not None and digest != card.weights_sha256:
        raise ArtifactError(
            f"sha256 of {join(directory, name)} is {digest} but {CARD_FILE} records "
            f"{card.weights_sha256}: the weights were changed or cut short"
        )
    tensors = _parse_weights(data, name, directory)
    if card is None:
        card = _diffusers_card(directory, model_cfg, name, digest, len(data))
        _fill_quant_convs(tensors, config, model_cfg)
    model = build_model(model_cfg)
    expected = {k: v for k, v in model.state_dict().items() if k not in training_buffers(model)}
    if card.diffusers_layout:
        tensors = map_state_dict(tensors, expected, len(model_cfg.ch_mult))
    else:
        _check_keys(tensors, expected, directory)
    load_inference_state(model, tensors)
    return model.eval(), model_cfg, card


def inference_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without the buffers only training reads."""
    skip = set(training_buffers(model))
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def load_inference_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load artifact weights; exactly the training-only buffers may be absent."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = sorted(set(missing) - set(training_buffers(model)))
    if missing or unexpected:
        raise ArtifactError(
            f"weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )


def model_config_of(card: ModelCard, directory: str) -> ModelConfig:
    """The card's ``model`` as a ModelConfig, as strictly as a config file is read."""
    try:
        return load_dict_as(ModelConfig, card.model, f"{join(directory, CARD_FILE)}: model")
    except ConfigError as err:
        raise ArtifactError(str(err)) from None


def published_scale(model_cfg: ModelConfig) -> LatentScale:
    if model_cfg.scaling_factor > 0:
        return LatentScale(model_cfg.scaling_factor, model_cfg.shift_factor, "published")
    return LatentScale()


def config_dict(cfg: Any) -> dict:
    """A config dataclass as plain JSON data (enum choices as their names)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def _diffusers_card(
    directory: str, model_cfg: ModelConfig, name: str, digest: str, size: int
) -> ModelCard:
    """What a directory diffusers wrote says about itself (signed RGB at its sample_size)."""
    return new_card(
        kind="kl",
        layout=LAYOUT_AUTOENCODER_KL,
        weights_file=name,
        weights_sha256=digest,
        weights_bytes=size,
        model=config_dict(model_cfg),
        image=ImageSpec(model_cfg.in_channels, "signed", model_cfg.resolution),
        latent_scale=published_scale(model_cfg),
        provenance=Provenance(source={"format": "diffusers", "path": directory, "weights": name}),
        weights_kind="published",
    )


def _read_bytes(url: str) -> bytes:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        parent, _, name = path.rpartition("/")
        present = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(parent, detail=False))
        raise FileNotFoundError(f"no {name} in {parent} (found: {', '.join(present)})")
    return fs.cat_file(path)


def _parse_weights(data: bytes, name: str, directory: str) -> dict[str, torch.Tensor]:
    """safetensors, or (diffusers dirs only) a ``.bin`` loaded weights-only, never unpickled."""
    where = join(directory, name)
    if name != DIFFUSERS_BIN:
        try:
            return load_safetensors(data)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{where} is not a readable safetensors file: {exc}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in several types; none may run code
        raise ValueError(f"{where} is not a plain tensor file (refused): {exc}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{where} does not hold a flat dict of tensors")
    return state


def _fill_quant_convs(tensors: dict[str, torch.Tensor], config: dict, cfg: ModelConfig) -> None:
    """Models saved with use_(post_)quant_conv=False get identity 1x1 convs: same function."""
    used = uses_quant_convs(config)
    for name, channels in (("quant_conv", 2 * cfg.z_channels), ("post_quant_conv", cfg.z_channels)):
        if not used[name]:
            for param, value in identity_conv(channels).items():
                tensors.setdefault(f"{name}.{param}", value)


def _check_keys(tensors: dict, expected: dict, directory: str) -> None:
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        raise ArtifactError(
            f"{directory}: weights do not match the model its {CARD_FILE} describes "
            f"(missing: {missing[:10]}, unexpected: {unexpected[:10]})"
        )
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise ArtifactError(
                f"{directory}: shape mismatch for {key}: weights have "
                f"{list(tensors[key].shape)}, the model expects {list(value.shape)}"
            )
