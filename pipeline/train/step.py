"""The training step: a plain function over a model, a batch and an optimiser.

It knows nothing of Ray or ranks, so the same code runs under DDP, in a single process and
in tests. It returns detached tensors, not floats: converting to Python numbers would force a
device sync every step; the caller aggregates and converts once per logging interval.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from pipeline.models.adversarial import discriminator_loss, generator_adversarial_terms
from pipeline.models.family import family_of
from pipeline.models.losses import LossConfig
from pipeline.models.perceptual import PerceptualLoss
from pipeline.train.loss_schedule import adversarial_active, losses_at
from pipeline.train.precision import Amp


@dataclass
class Adversary:
    """The PatchGAN discriminator (possibly DDP-wrapped) and its optimiser."""

    disc: torch.nn.Module
    optimizer: torch.optim.Optimizer


def train_step(
    model: torch.nn.Module,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_cfg: LossConfig,
    grad_clip: float = 0.0,
    labels: torch.Tensor | None = None,
    step: int = 0,
    adversary: Adversary | None = None,
    amp: Amp | None = None,
    perceptual: PerceptualLoss | None = None,
) -> dict[str, torch.Tensor]:
    """One optimiser step on `batch` (images; `labels` for conditional models): an
    `accumulated_step` of one micro-batch. Returns the detached loss terms."""
    return accumulated_step(
        model, [(batch, labels)], optimizer, loss_cfg, grad_clip, step, adversary, amp, perceptual
    )


def accumulated_step(
    model: torch.nn.Module,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor | None]],
    optimizer: torch.optim.Optimizer,
    loss_cfg: LossConfig,
    grad_clip: float = 0.0,
    step: int = 0,
    adversary: Adversary | None = None,
    amp: Amp | None = None,
    perceptual: PerceptualLoss | None = None,
) -> dict[str, torch.Tensor]:
    """One optimiser step on the gradient of the mean loss over `micro_batches`
    ((images, labels or None), equal sizes): the step one batch of them all would take, for
    losses that are batch means (not so for batch statistics: BatchNorm in the discriminator,
    VQ's EMA codebook updates run once per micro-batch, and the adaptive adversarial weight is
    a ratio of each micro-batch's gradient norms).

    `step` is the number of steps done before this one (KL warm-up and the discriminator's
    start read it). With an adversary, each micro-batch's generator loss includes the
    adaptive-weighted hinge term and the discriminator's loss on its detached reconstruction is
    back-propagated right after; the generator's and then the discriminator's optimiser step
    once at the end. That is taming's order (generator update, then D on the detached
    reconstruction): D's loss reads neither the generator's weights nor its update. Under DDP
    gradients are all-reduced on the last micro-batch only (`no_sync` before). `amp` (default
    float32) autocasts forward passes and, for fp16, scales losses. `perceptual` (the LPIPS
    term, pipeline/models/perceptual.py) is added to each micro-batch's reconstruction term.
    Returns the detached loss terms, averaged over the micro-batches.
    """
    amp = amp or Amp()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    disc = adversary.disc if adversary is not None else None
    if adversary is not None:
        adversary.optimizer.zero_grad(set_to_none=True)
    weight = 1.0 / len(micro_batches)
    totals: dict[str, torch.Tensor] = {}
    for index, (images, labels) in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if last else no_sync(model, disc):
            terms = _micro_step(
                model, images, labels, loss_cfg, step, adversary, amp, weight, perceptual
            )
        for name, value in terms.items():
            totals[name] = totals.get(name, 0) + value * weight
    if grad_clip > 0:
        amp.unscale(optimizer)
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    amp.step(optimizer)
    if "d_loss" in totals:  # D was trained this step (after loss.disc_start)
        amp.step(adversary.optimizer)
    amp.update()
    return {name: value.detach() for name, value in totals.items()}


def _micro_step(
    model, images, labels, loss_cfg, step, adversary, amp, weight, perceptual=None
) -> dict:
    """Forward passes and backward of one micro-batch (gradients scaled by `weight`)."""
    with amp.autocast():
        terms, recon = compute_loss(model, images, labels, loss_cfg, step)
        active = adversary is not None and adversarial_active(loss_cfg, step)
        if perceptual is not None:  # LDM: recon += w * LPIPS, before the adaptive weight reads it
            terms = perceptual.add_to(terms, images, recon)
        if adversary is not None:
            adv = generator_adversarial_terms(
                model, recon, terms["recon"], adversary.disc, loss_cfg, active
            )
            terms["loss"] = terms["loss"] + adv.pop("adv")
            terms.update(adv)
    amp.backward(terms["loss"] * weight)
    if adversary is not None:
        with amp.autocast():
            d_terms = discriminator_loss(adversary.disc, images, recon, loss_cfg, active)
        if d_terms:
            amp.backward(d_terms["d_loss"] * weight)
        terms.update(d_terms)
    return {name: value.detach() for name, value in terms.items()}


@contextlib.contextmanager
def no_sync(*modules: torch.nn.Module | None):
    """DDP's `no_sync()` on every DDP-wrapped module given (gradients accumulate locally)."""
    with contextlib.ExitStack() as stack:
        for module in modules:
            if module is not None and hasattr(module, "no_sync"):
                stack.enter_context(module.no_sync())
        yield


def compute_loss(
    model: torch.nn.Module,
    batch: torch.Tensor,
    labels: torch.Tensor | None,
    loss_cfg: LossConfig,
    step: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(loss terms, decoder output) for the model's family: (β-)ELBO for the textbook VAEs,
    L1/MSE + β·KL for KL autoencoders, recon + commitment for VQ."""
    return family_of(model).loss(model, batch, labels, losses_at(loss_cfg, step))


LR_SCALING = ("none", "linear", "sqrt")


def lr_factor(mode: str, world_size: int, base_world_size: int) -> float:
    """What train.lr (meant for `base_world_size` workers) is multiplied by at `world_size`.

    The global batch is world_size x data.batch_size, so an elastic run that loses workers
    takes smaller steps; `linear` keeps lr per image constant (Goyal et al.), `sqrt` is the
    gentler rule often preferred for Adam-type optimisers.
    """
    ratio = world_size / base_world_size
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[mode]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Overrides the lr restored from a checkpoint written at another world size."""
    for group in optimizer.param_groups:
        group["lr"] = lr


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
