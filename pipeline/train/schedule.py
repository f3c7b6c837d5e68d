"""The learning-rate schedule: a pure function of the step (`train.lr_schedule`,
`train.warmup_steps`).

The lr of optimiser step ``s`` (0-based) is ``base x lr_multiplier(s)``, where ``base`` is
``train.lr`` already scaled for the running world size (`train.lr_scaling`, set once per
(re)start by the loop). Being a function of the step alone, the schedule needs no state of its
own in a checkpoint -- the step is there -- and an elastic restart at another world size
rescales the base without bending the curve. Changing `train.steps` on resume changes the
cosine's length from then on.
"""

from __future__ import annotations

import math

import torch

from pipeline.train.config import LrSchedule, TrainConfig
from pipeline.train.step import set_lr


def lr_multiplier(schedule: LrSchedule, step: int, total_steps: int, warmup_steps: int) -> float:
    """Factor on the base lr at optimiser step `step` (0-based).

    Warm-up: (step + 1) / warmup_steps, so the first step already moves and step
    warmup_steps - 1 runs at the full lr. Then `constant` stays at 1; `cosine` follows
    0.5 (1 + cos(pi p)) with p going from 0 (end of warm-up) to 1 (step `total_steps`).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if LrSchedule(schedule) == LrSchedule.constant:
        return 1.0
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class ScheduledLr:
    """Sets the scheduled lr on each optimiser before every step, from the lr it holds now
    (the world-size-scaled base; the discriminator's has its own base)."""

    def __init__(self, t: TrainConfig, optimizers: list[torch.optim.Optimizer]):
        self.t = t
        self.bases = [(opt, opt.param_groups[0]["lr"]) for opt in optimizers]

    def apply(self, step: int) -> float:
        """Set the lrs for optimiser step `step`; returns the autoencoder's."""
        factor = lr_multiplier(self.t.lr_schedule, step, self.t.steps, self.t.warmup_steps)
        for optimizer, base in self.bases:
            set_lr(optimizer, base * factor)
        return self.bases[0][1] * factor


def check_schedule(t: TrainConfig) -> None:
    if t.warmup_steps < 0:
        raise ValueError(f"train.warmup_steps={t.warmup_steps}: expected >= 0")
