"""The training step: a plain function over a model, a batch and an optimiser.

It knows nothing of Ray or ranks, so the same code runs under DDP, in a single process and
in tests. It returns detached tensors, not floats: converting to Python numbers would force a
device sync every step; the caller aggregates and converts once per logging interval.
"""

from __future__ import annotations

import torch

from pipeline.models import DiagonalGaussian
from pipeline.models.losses import LossConfig, autoencoder_loss, vq_autoencoder_loss


def train_step(
    model: torch.nn.Module,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_cfg: LossConfig,
    grad_clip: float = 0.0,
) -> dict[str, torch.Tensor]:
    """One optimiser step on `batch` (images in [-1, 1]); returns the detached loss terms."""
    model.train()
    terms = compute_loss(batch, model(batch), loss_cfg)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if grad_clip > 0:
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {name: value.detach() for name, value in terms.items()}


def compute_loss(batch: torch.Tensor, outputs, loss_cfg: LossConfig) -> dict[str, torch.Tensor]:
    """The objective for what the model returned: (recon, posterior) for KL, (recon, info) for VQ."""
    recon, second = outputs
    if isinstance(second, DiagonalGaussian):
        return autoencoder_loss(batch, recon, second, loss_cfg)
    return vq_autoencoder_loss(batch, recon, second, loss_cfg)


def make_optimizer(model: torch.nn.Module, lr: float, betas, weight_decay: float):
    return torch.optim.AdamW(
        model.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay
    )


class MetricMeter:
    """Sums step metrics as tensors; `means()` converts to floats once per interval."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.images = 0

    def add(self, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0) + value.float()
        self.steps += 1
        self.images += batch_size

    def means(self, reduce=None) -> dict[str, float]:
        """Means over the interval; `reduce` averages a stacked tensor across ranks."""
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n] for n in names]) / max(self.steps, 1)
        if reduce is not None:
            stacked = reduce(stacked)
        return dict(zip(names, stacked.tolist(), strict=True))
