"""Mixed precision, accumulation and model layout options of a training run
(`train.precision`, `train.grad_accum_steps`, `train.compile`, `train.channels_last`).

`Amp` is what the train step needs to know about precision: the autocast context of forward
passes and losses, and for fp16 the `torch.amp.GradScaler` that scales losses before backward,
unscales gradients before clipping and skips optimiser steps whose gradients overflowed. Weights,
gradients and optimiser state stay float32 in every mode (autocast casts per op), so checkpoints
do not depend on the precision. fp16 is CUDA only: CPUs have no fast float16 kernels and bf16
has float32's exponent range, so it needs no scaler.

    .venv/bin/latentpipe train configs/train/kl-f4-tiny.yaml data.shards=... train.precision=bf16
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.train.config import Precision, TrainConfig

DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


class Amp:
    """Autocast and (optionally) a GradScaler. ``Amp()`` is plain float32."""

    def __init__(
        self,
        dtype: torch.dtype | None = None,
        device_type: str = "cpu",
        scaler: torch.amp.GradScaler | None = None,
    ):
        self.dtype, self.device_type, self.scaler = dtype, device_type, scaler

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """True gradients in ``.grad`` (before clipping); once per optimiser and step."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(), skipped by the scaler when a gradient is inf or NaN."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)

    def update(self) -> None:
        """Once per training step, after every optimiser's `step` (the scaler's new scale)."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def make_amp(precision: Precision, device: torch.device) -> Amp:
    """The run's `Amp` on `device`; fp16 off CUDA (or bf16 where CUDA lacks it) is refused."""
    precision = Precision(precision)
    if precision == Precision.fp32:
        return Amp()
    if precision == Precision.fp16:
        if device.type != "cuda":
            raise ValueError(
                f"train.precision=fp16 needs a CUDA device (float16 autocast with a GradScaler); "
                f"this worker runs on {device.type}: use train.precision=bf16 or fp32 on CPU, or "
                "train.use_gpu=true"
            )
        return Amp(torch.float16, "cuda", torch.amp.GradScaler("cuda"))
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16: this GPU has no bfloat16 support; use fp16")
    return Amp(torch.bfloat16, device.type)


def check_options(t: TrainConfig) -> None:
    """Before any worker starts: fp16 on CPU-only Ray workers, or no micro-batch at all."""
    if Precision(t.precision) == Precision.fp16 and t.num_workers > 0 and not t.use_gpu:
        raise ValueError(
            "train.precision=fp16 needs CUDA (float16 autocast with a GradScaler), but "
            "train.use_gpu=false gives the workers CPUs only: use train.precision=bf16 or fp32, "
            "or train.use_gpu=true"
        )
    if t.grad_accum_steps < 1:
        raise ValueError(f"train.grad_accum_steps={t.grad_accum_steps}: expected >= 1")


def prepare_module(module: torch.nn.Module, t: TrainConfig) -> torch.nn.Module:
    """`train.channels_last` and `train.compile` applied in place; returns `module`.

    ``Module.compile()`` compiles the module's call without wrapping it, so state-dict keys,
    checkpoints, ``isinstance`` checks and DDP wrapping (applied after this) are unchanged.
    Inductor's random ops are switched to eager's (``fallback_random``): a compiled run draws
    the posterior noise an eager one draws, so switching compile on or off (even on resume)
    changes float rounding only."""
    if t.channels_last:
        module.to(memory_format=torch.channels_last)
    if t.compile:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
        module.compile()
    return module


def to_layout(images: torch.Tensor, t: TrainConfig) -> torch.Tensor:
    """Images in the models' memory format (NHWC with `train.channels_last`)."""
    return images.contiguous(memory_format=torch.channels_last) if t.channels_last else images
