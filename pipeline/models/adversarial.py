"""Adversarial option for the autoencoders: LDM's hinge PatchGAN with an adaptive weight.

Follows taming-transformers' ``VQLPIPSWithDiscriminator`` and LDM's ``LPIPSWithDiscriminator``
(``ldm/modules/losses/contperceptual.py``): the discriminator loss is the hinge
``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))``, the generator's term is
``-mean(D(x_hat))``, scaled by the adaptive weight
``disc_weight * ||grad_last nll|| / (||grad_last g|| + 1e-4)`` (clamped to [0, 1e4], detached),
where "last" is the decoder's final conv weight and nll the reconstruction term (LDM: L1 +
perceptual; here ``terms["recon"]``; the KL or VQ term is left out, as in LDM). Because the weight
is a ratio of gradient norms, the adversarial gradient at that layer is ``disc_weight`` times the
reconstruction gradient whatever the reconstruction loss's scale (mean here, per-sample sum in LDM).
Nothing happens before ``loss.disc_start``; ``-1`` keeps the option off.

Order within one training step (taming's ``optimizer_idx`` 0 then 1):

    recon, second = model(x)                                   # generator forward
    terms = compute_loss(x, (recon, second), loss_cfg)         # recon + KL / VQ
    adv = generator_adversarial_terms(model, recon, terms["recon"], disc, loss_cfg, active)
    (terms["loss"] + adv["adv"]).backward(); optimizer.step()  # 1. generator update
    discriminator_loss(disc, x, recon, loss_cfg, active)["d_loss"].backward()  # 2. D's loss on
    disc_optimizer.step()                                            # the detached recon

The optimiser steps themselves are the trainer's (pipeline/train/step.py: accumulated over
micro-batches, under autocast and a GradScaler); this module only computes losses.

The generator's pass through D runs with D's parameters frozen and on the unwrapped module, so
it neither computes D's weight gradients nor touches a DDP wrapper's reducer; D's own update
goes through whatever wrapper ``disc`` is, in one forward over real and fake images together.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.losses import LossConfig

ADAPTIVE_EPS = 1e-4  # taming: keeps the ratio finite when D's gradient vanishes
ADAPTIVE_MAX = 1e4


def adversarial_enabled(loss_cfg: LossConfig) -> bool:
    """Whether the run needs a discriminator at all."""
    return loss_cfg.disc_start >= 0


def discriminator_lr(loss_cfg: LossConfig, lr: float) -> float:
    """``loss.disc_lr``, or the generator's ``lr`` when it is 0 (taming uses one lr for both)."""
    return loss_cfg.disc_lr or lr


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss, times 0.5 as in taming (the mean of the real and fake halves)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator's adversarial term: raise D's logits on reconstructions."""
    return -logits_fake.mean()


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel (``.module``) or torch.compile (``._orig_mod``)."""
    for attr in ("module", "_orig_mod"):
        while hasattr(module, attr):
            module = getattr(module, attr)
    return module


def last_layer(model: nn.Module) -> nn.Parameter:
    """The decoder's final conv weight (``decoder.conv_out``; KL and VQ models alike)."""
    core = unwrap(model)
    try:
        return core.decoder.conv_out.weight
    except AttributeError:
        raise ValueError(
            f"loss.disc_start >= 0 needs a model with decoder.conv_out (kinds kl, vq); "
            f"{type(core).__name__} has none"
        ) from None


def adaptive_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: nn.Parameter,
    disc_weight: float,
    max_weight: float = ADAPTIVE_MAX,
) -> torch.Tensor:
    """LDM's ``calculate_adaptive_weight``: balance the two gradients at ``last_layer``.

    retain_graph keeps the graph for the full backward that follows; the result is detached so
    the weight itself is not optimised.
    """
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = nll_grad.norm() / (g_grad.norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, max_weight).detach() * disc_weight


@contextmanager
def _frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters not requiring grad while the graph is built: no weight grads are recorded."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def generator_adversarial_terms(
    model: nn.Module,
    recon: torch.Tensor,
    nll: torch.Tensor,
    disc: nn.Module,
    loss_cfg: LossConfig,
    active: bool,
) -> dict[str, torch.Tensor]:
    """{"g_loss", "d_weight", "adv"}: add ``adv`` to the generator's loss before its backward.

    When not ``active`` (before ``disc_start``: the trainer decides) all three are zeros and D
    is not run; the keys are always present so every rank and log interval reports the same.
    """
    zero = recon.new_zeros(())
    if not active:
        return {"g_loss": zero, "d_weight": zero, "adv": zero}
    with _frozen(unwrap(disc)) as d:
        g_loss = hinge_g_loss(d(recon))
    if torch.is_grad_enabled():
        d_weight = adaptive_weight(nll, g_loss, last_layer(model), loss_cfg.disc_weight)
    else:
        d_weight = zero  # evaluation under no_grad: no gradients to balance (taming does the same)
    return {"g_loss": g_loss, "d_weight": d_weight, "adv": d_weight * g_loss}


def discriminator_loss(
    disc: nn.Module, x: torch.Tensor, recon: torch.Tensor, loss_cfg: LossConfig, active: bool
) -> dict[str, torch.Tensor]:
    """D's hinge loss on real ``x`` and detached ``recon`` before its backward (the trainer
    accumulates it over micro-batches): {"d_loss" (with its graph), "logits_real",
    "logits_fake" (detached batch means)}; {} when not ``active``."""
    if not active:
        return {}
    disc.train()
    # One forward over both halves: a DDP-wrapped D then sees exactly one forward per backward.
    logits = disc(torch.cat([x, recon.detach()]))
    logits_real, logits_fake = logits[: len(x)], logits[len(x) :]
    return {
        "d_loss": hinge_d_loss(logits_real, logits_fake),
        "logits_real": logits_real.detach().mean(),
        "logits_fake": logits_fake.detach().mean(),
    }
