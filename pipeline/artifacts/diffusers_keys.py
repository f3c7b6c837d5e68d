"""diffusers ``AutoencoderKL`` / ``VQModel`` parameter names <-> latentpipe's, both directions.

Each direction is a short ordered list of regex rules applied one after another to every key;
diffusers -> latentpipe (:func:`map_state_dict`, used to read diffusers directories), e.g.

    encoder.down_blocks.1.resnets.0.conv_shortcut.weight -> encoder.down.1.block.0.nin_shortcut.weight
    encoder.down_blocks.0.downsamplers.0.conv.bias       -> encoder.down.0.downsample.conv.bias
    encoder.mid_block.attentions.0.to_q.weight           -> encoder.mid.attn_1.q.weight
    encoder.mid_block.attentions.0.query.weight          -> encoder.mid.attn_1.q.weight   (old name)
    decoder.up_blocks.0.resnets.2.norm1.weight           -> decoder.up.3.block.2.norm1.weight  (4 levels)
    decoder.conv_norm_out.weight                         -> decoder.norm_out.weight

diffusers stores decoder levels from the lowest resolution up (``up_blocks.0`` is the deepest),
latentpipe (like LDM) by level index, hence the one rule that needs the number of levels.
diffusers' attention projections are ``nn.Linear`` ([C, C]) where latentpipe uses 1x1 convs
([C, C, 1, 1]); :func:`fit_shape` reshapes exactly those and nothing else. A VQ codebook is
``quantize.embedding.weight`` in diffusers' ``VQModel`` and ``quantize.codebook`` here.

latentpipe -> diffusers (:func:`to_diffusers_state_dict`, used to write model artifacts that
diffusers loads) is the inverse list; a test round-trips every key of every layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

Replacement = str | Callable[[re.Match], str]


def key_rules(num_levels: int) -> list[tuple[str, Replacement]]:
    """Ordered (pattern, replacement) rules for a model with ``num_levels`` resolution levels."""
    return [
        (r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block."),
        (r"\.down_blocks\.(\d+)\.attentions\.", r".down.\1.attn."),
        (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
        # Decoder levels are stored in reverse order in diffusers.
        (r"\.up_blocks\.(\d+)\.", lambda m: f".up.{num_levels - 1 - int(m[1])}."),
        (r"\.up\.(\d+)\.resnets\.", r".up.\1.block."),
        (r"\.up\.(\d+)\.attentions\.", r".up.\1.attn."),
        (r"\.up\.(\d+)\.upsamplers\.0\.", r".up.\1.upsample."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
        (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.conv_norm_out\.", ".norm_out."),
        # Attention: current diffusers names and the pre-0.14 ones.
        (r"\.group_norm\.", ".norm."),
        (r"\.(?:to_q|query)\.", ".q."),
        (r"\.(?:to_k|key)\.", ".k."),
        (r"\.(?:to_v|value)\.", ".v."),
        (r"\.(?:to_out\.0|proj_attn)\.", ".proj_out."),
        (r"^quantize\.embedding\.weight$", "quantize.codebook"),
    ]


def inverse_key_rules(num_levels: int) -> list[tuple[str, Replacement]]:
    """Ordered rules latentpipe name -> diffusers name (the inverse of :func:`key_rules`)."""
    return [
        (r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets."),
        (r"\.down\.(\d+)\.attn\.", r".down_blocks.\1.attentions."),
        (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
        (r"\.up\.(\d+)\.", lambda m: f".up_blocks.{num_levels - 1 - int(m[1])}."),
        (r"\.up_blocks\.(\d+)\.block\.", r".up_blocks.\1.resnets."),
        (r"\.up_blocks\.(\d+)\.attn\.", r".up_blocks.\1.attentions."),
        (r"\.up_blocks\.(\d+)\.upsample\.", r".up_blocks.\1.upsamplers.0."),
        (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
        (r"\.mid\.attn_1\.", ".mid_block.attentions.0."),
        (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"\.norm_out\.", ".conv_norm_out."),
        # Attention parameters, only inside attention blocks (resnets have norm1/norm2).
        (r"(\.attentions\.\d+)\.norm\.", r"\1.group_norm."),
        (r"(\.attentions\.\d+)\.q\.", r"\1.to_q."),
        (r"(\.attentions\.\d+)\.k\.", r"\1.to_k."),
        (r"(\.attentions\.\d+)\.v\.", r"\1.to_v."),
        (r"(\.attentions\.\d+)\.proj_out\.", r"\1.to_out.0."),
        (r"^quantize\.codebook$", "quantize.embedding.weight"),
    ]


def rename(key: str, rules: list[tuple[str, Replacement]]) -> str:
    """Apply every rule in order to one diffusers key."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


_ATTN_WEIGHT = re.compile(r"\.(?:attn_1|attn\.\d+)\.(?:q|k|v|proj_out)\.weight$")


def fit_shape(name: str, tensor: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """Return ``tensor`` in ``target``'s shape: only attention Linear <-> 1x1 conv may differ."""
    if tensor.shape == target:
        return tensor
    if _ATTN_WEIGHT.search(name) and tensor.numel() == target.numel():
        return tensor.reshape(target)
    raise ValueError(
        f"shape mismatch for {name}: weights have {list(tensor.shape)}, "
        f"the model its config describes expects {list(target)}"
    )


_DIFFUSERS_ATTN_WEIGHT = re.compile(r"\.attentions\.\d+\.(?:to_q|to_k|to_v|to_out\.0)\.weight$")


def to_diffusers_state_dict(
    state: dict[str, torch.Tensor], num_levels: int
) -> dict[str, torch.Tensor]:
    """latentpipe tensors -> diffusers names and shapes (attention 1x1 convs become Linear).

    Tensors are made contiguous copies, as safetensors needs (it refuses shared storage).
    """
    rules = inverse_key_rules(num_levels)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = rename(key, rules)
        if name in out:
            raise ValueError(f"two parameters map to the diffusers name {name} (last: {key})")
        if _DIFFUSERS_ATTN_WEIGHT.search(name) and tensor.ndim == 4:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        out[name] = tensor.detach().to("cpu").contiguous().clone()
    return out


def identity_conv(channels: int) -> dict[str, torch.Tensor]:
    """1x1 conv weights that pass their input through (for use_quant_conv=False models)."""
    return {
        "weight": torch.eye(channels).reshape(channels, channels, 1, 1),
        "bias": torch.zeros(channels),
    }


def map_state_dict(
    source: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], num_levels: int
) -> dict[str, torch.Tensor]:
    """Rename and reshape diffusers tensors into a state dict matching ``expected`` exactly.

    Raises ValueError naming every unexpected source key (with the name it mapped to), every
    model parameter no source key provided, and any two source keys that collide.
    """
    rules = key_rules(num_levels)
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected = []
    for key, tensor in source.items():
        name = rename(key, rules)
        if name not in expected:
            unexpected.append(f"{key} (-> {name})")
        elif name in mapped:
            raise ValueError(f"weights hold both {origin[name]} and {key}: both map to {name}")
        else:
            mapped[name] = fit_shape(name, tensor, expected[name].shape).to(torch.float32)
            origin[name] = key
    missing = sorted(set(expected) - set(mapped))
    if unexpected or missing:
        raise ValueError(_mismatch_message(sorted(unexpected), missing))
    return mapped


def _mismatch_message(unexpected: list[str], missing: list[str], limit: int = 20) -> str:
    parts = []
    if unexpected:
        parts.append(f"unexpected keys in the weights: {', '.join(unexpected[:limit])}")
    if missing:
        parts.append(f"model parameters missing from the weights: {', '.join(missing[:limit])}")
    extra = max(len(unexpected), len(missing)) - limit
    more = f" (and more: {len(unexpected)} unexpected, {len(missing)} missing)" if extra > 0 else ""
    return "; ".join(parts) + more + " — are these the weights of the model its config describes?"
