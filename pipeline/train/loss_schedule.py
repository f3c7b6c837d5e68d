"""When each loss term applies: the schedules of training, kept out of the models layer.

The models layer computes losses for the weights it is given; which weights apply at a step is
the trainer's business: the KL weight's linear warm-up (``loss.kl_warmup_steps``) and the step
from which the adversarial terms apply (``loss.disc_start``).
"""

from __future__ import annotations

import dataclasses

from pipeline.models.adversarial import adversarial_enabled
from pipeline.models.losses import LossConfig


def beta_schedule(step: int, beta: float, warmup_steps: int) -> float:
    """Linear KL warm-up: 0 at step 0, ``beta`` from ``warmup_steps`` on (constant if <= 0)."""
    if warmup_steps <= 0:
        return float(beta)
    return float(beta) * min(1.0, max(step, 0) / warmup_steps)


def losses_at(cfg: LossConfig, step: int) -> LossConfig:
    """``cfg`` with the KL weight of ``step`` (the same object when there is no warm-up)."""
    if cfg.kl_warmup_steps <= 0:
        return cfg
    return dataclasses.replace(
        cfg, kl_weight=beta_schedule(step, cfg.kl_weight, cfg.kl_warmup_steps)
    )


def adversarial_active(cfg: LossConfig, step: int) -> bool:
    """Whether the adversarial terms apply at ``step`` (0-based index of the step being taken)."""
    return adversarial_enabled(cfg) and step >= cfg.disc_start
