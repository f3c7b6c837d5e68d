"""diffusers ``AutoencoderKL`` parameter names -> latentpipe ``KLAutoencoder`` names.

The mapping is a short ordered list of regex rules applied one after another to every key, e.g.

    encoder.down_blocks.1.resnets.0.conv_shortcut.weight -> encoder.down.1.block.0.nin_shortcut.weight
    encoder.down_blocks.0.downsamplers.0.conv.bias       -> encoder.down.0.downsample.conv.bias
    encoder.mid_block.attentions.0.to_q.weight           -> encoder.mid.attn_1.q.weight
    encoder.mid_block.attentions.0.query.weight          -> encoder.mid.attn_1.q.weight   (old name)
    decoder.up_blocks.0.resnets.2.norm1.weight           -> decoder.up.3.block.2.norm1.weight  (4 levels)
    decoder.conv_norm_out.weight                         -> decoder.norm_out.weight

diffusers stores decoder levels from the lowest resolution up (``up_blocks.0`` is the deepest),
latentpipe (like LDM) by level index, hence the one rule that needs the number of levels.
diffusers' attention projections are ``nn.Linear`` ([C, C]) where latentpipe uses 1x1 convs
([C, C, 1, 1]); :func:`fit_shape` reshapes exactly those and nothing else.
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
        f"the model built from config.json expects {list(target)}"
    )


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
    return "; ".join(parts) + more + " — is this an AutoencoderKL matching its config.json?"
