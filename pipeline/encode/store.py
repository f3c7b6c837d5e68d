"""Encoder outputs -> the fields a latent sample stores, and the values a reader will see.

Nothing non-finite is ever stored: a latent (or std, or posterior draw) whose values do not fit
the storage dtype (float16 tops out at 65,504) raises :class:`NotStorable` with the reason, and
the unit records the key as a reject.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from pipeline.latents.format import (
    SIZES_FIELD,
    STD_FIELD,
    encode_latent,
    encode_npy,
    stored_values,
)

# The largest finite value of each storage dtype, for reasons users can act on.
DTYPE_MAX = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38}
WIDER = {"float16": "bfloat16 or float32", "bfloat16": "float32", "float32": "none wider"}


class NotStorable(ValueError):
    """A sample's values cannot be stored finite; ``overflow`` when only the dtype is to blame."""

    def __init__(self, reason: str, overflow: bool):
        super().__init__(reason)
        self.overflow = overflow


@dataclass(frozen=True)
class StoragePlan:
    """How the unit turns encoder outputs into stored fields (from the config + sidecar)."""

    field: str  # latent.npy | indices.npy
    dtype: str  # stored dtype of KL latents (VQ: indices are stored as they come)
    sample: bool  # store one draw from the posterior instead of its mean
    store_std: bool
    sample_seed: int
    vq: bool = False


@dataclass
class Stored:
    files: dict[str, bytes]  # the sample's output fields (input fields + ours)
    values: np.ndarray  # the stored values as float32 (KL) or the indices (VQ), for statistics
    replaced: bool  # an input field had to give way to one of ours


def posterior_draw(mean: np.ndarray, std: np.ndarray, key: str, seed: int) -> np.ndarray:
    """mean + std * eps with eps seeded by (seed, key) alone: the same draw on every run,
    worker and batch composition."""
    words = np.frombuffer(hashlib.sha256(key.encode("utf-8")).digest()[:16], dtype=np.uint32)
    rng = np.random.default_rng([seed, *(int(w) for w in words)])
    eps = rng.standard_normal(mean.shape, dtype=np.float32)
    return (mean + std * eps).astype(np.float32)


def sizes_json(sizes: tuple[int, ...]) -> bytes:
    orig_h, orig_w, top, left, height, width = sizes
    record = {
        "original_size": [orig_h, orig_w],
        "crop_top_left": [top, left],
        "target_size": [height, width],
    }
    return json.dumps(record).encode("utf-8")


def _storable(values: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """``values`` as stored in ``dtype`` (float32 view), or NotStorable with the reason."""
    if not np.isfinite(values).all():
        raise NotStorable(f"encoder produced non-finite values ({what})", overflow=False)
    with np.errstate(over="ignore"):  # an overflowing cast is reported below, not warned about
        stored = stored_values(values, dtype)
    if not np.isfinite(stored).all():
        peak = float(np.abs(values).max())
        raise NotStorable(
            f"{what} exceeds the finite range of storage.dtype={dtype} (max |value| {peak:.4g} > "
            f"{DTYPE_MAX[dtype]:.6g}); store it as {WIDER[dtype]}",
            overflow=True,
        )
    return stored


def store_sample(
    plan: StoragePlan,
    key: str,
    latent: np.ndarray,
    std: np.ndarray | None,
    files: dict[str, bytes],
    sizes: tuple[int, ...],
) -> Stored:
    """The stored fields of one sample; raises NotStorable instead of storing a non-finite value."""
    out = dict(files)
    ours = {plan.field, SIZES_FIELD} | ({STD_FIELD} if plan.store_std else set())
    replaced = bool(ours & out.keys())
    if plan.vq:
        out[plan.field] = encode_npy(latent)
        values = latent
    else:
        if plan.sample:
            latent = posterior_draw(latent, std, key, plan.sample_seed)
        values = _storable(latent, plan.dtype, "the latent")
        out[plan.field] = encode_latent(latent, plan.dtype)
        if plan.store_std:
            _storable(std, plan.dtype, "the posterior std")
            out[STD_FIELD] = encode_latent(std, plan.dtype)
    out[SIZES_FIELD] = sizes_json(sizes)
    return Stored(out, values, replaced)
