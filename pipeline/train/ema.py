"""Exponential moving average of the autoencoder's weights (``train.ema_decay`` > 0).

    ema = ModelEMA(model, decay=0.9999)     # a frozen copy of the bare model (not a DDP wrapper)
    ...optimizer.step(); ema.update(model)  # once per optimiser step

After update ``k`` (0-based) every floating-point parameter is

    ema <- d_k * ema + (1 - d_k) * param,   d_k = min(decay, (1 + k) / (10 + k))

the warm-up LDM's ``LitEma`` and diffusers' ``EMAModel`` use by default, so the average of a short
run is not dominated by the initial weights. Buffers (GroupNorm has none; a VQ codebook and its
statistics are buffers) are copied, not averaged: LDM swaps only parameters into its EMA scope,
and a codebook learned by its own EMA is already an average. Every DDP rank holds the same weights
after a step, so every rank keeps an identical EMA without communicating; rank 0 writes it.

In a checkpoint (pipeline/train/checkpoint.py) the EMA weights are a model artifact of their own,
``model_ema/`` beside the raw ``model/``, and the training state keeps ``{"updates", "decay",
"model_buffers"}`` (the training-only buffers the artifact leaves out), so a resumed run continues
the average exactly.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from pipeline.artifacts.card import ImageSpec, Provenance
from pipeline.artifacts.store import (
    config_dict,
    inference_state,
    load_model_artifact,
    save_model_artifact,
)
from pipeline.models import training_buffers
from pipeline.models.adversarial import unwrap
from pipeline.train.config import TrainRunConfig, run_dir

log = logging.getLogger("latentpipe.train")

WARMUP = 10  # d_k = (1 + k) / (WARMUP + k) until it reaches the configured decay


def decay_at(decay: float, updates: int) -> float:
    """The decay applied by update number ``updates`` (0-based)."""
    return min(decay, (1 + updates) / (WARMUP + updates))


class ModelEMA:
    """The EMA copy of a model; ``module`` is a plain eval-mode model with frozen parameters."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if decay == 0:
            raise ValueError("train.ema_decay=0 means no EMA: use make_ema")
        check_ema_decay(decay)
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (``model`` may be DDP-wrapped)."""
        weight = 1.0 - decay_at(self.decay, self.updates)
        source = unwrap(model)
        pairs = [
            (e, p.detach())
            for e, p in zip(self.module.parameters(), source.parameters(), strict=True)
            if e.is_floating_point()
        ]
        if pairs:
            ema, current = (list(t) for t in zip(*pairs, strict=True))
            torch._foreach_lerp_(ema, current, weight)  # what swa_utils' EMA averaging uses
        for e, b in zip(self.module.buffers(), source.buffers(), strict=True):
            e.copy_(b)
        self.updates += 1

    def reset(self, model: nn.Module) -> None:
        """Start the average again from ``model``'s weights (a checkpoint without an EMA)."""
        self.module.load_state_dict(unwrap(model).state_dict())
        self.updates = 0

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s content; the decay is the run's (it may have been changed)."""
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def check_ema_decay(decay: float) -> None:
    """Refuse, before any worker starts, a decay the average cannot use."""
    if decay != 0 and not 0.0 < decay < 1.0:
        raise ValueError(f"train.ema_decay={decay}: expected 0 (off) or a value in (0, 1)")


def make_ema(model: nn.Module, decay: float) -> ModelEMA | None:
    """A ModelEMA for ``train.ema_decay``, or None when it is 0 (off)."""
    return ModelEMA(model, decay) if decay > 0 else None


# -- in checkpoints ------------------------------------------------------------------------


def save_ema(directory: str, ema: ModelEMA, cfg: TrainRunConfig, step: int) -> dict:
    """Write the EMA weights as a model artifact into ``directory`` (a checkpoint's
    model_ema/); returns the training state's "ema" entry (what the artifact leaves out)."""
    save_model_artifact(
        directory,
        ema.module,
        cfg.model,
        image=ImageSpec(cfg.data.channels, str(cfg.data.value_range), cfg.data.resolution),
        provenance=Provenance(run=run_dir(cfg.train), step=step, data=config_dict(cfg.data)),
        weights_kind="ema",
    )
    names = set(training_buffers(ema.module))
    buffers = {k: v for k, v in ema.module.state_dict().items() if k in names}
    return {"updates": ema.updates, "decay": ema.decay, "model_buffers": buffers}


def load_ema_entry(directory: str, entry: dict) -> dict:
    """The training state's "ema" entry with "model", the EMA's whole state dict: the weights
    of the artifact in ``directory`` (hash-checked) plus the buffers kept beside them."""
    model, _, _ = load_model_artifact(directory)
    buffers = entry.pop("model_buffers")
    return {**entry, "model": {**inference_state(model), **buffers}}


def resume_ema(model: nn.Module, decay: float, saved: dict) -> ModelEMA | None:
    """The run's EMA (None when ``train.ema_decay`` is 0): continued from the checkpoint's
    training state ``saved`` when it has one, else started from ``model``'s (restored) weights."""
    ema = make_ema(model, decay)
    if ema is not None and "ema" in saved:
        ema.load_state_dict(saved["ema"])
    elif ema is not None and saved:
        log.info("checkpoint has no EMA: the average starts from the restored weights")
    return ema
