"""The training loop every worker runs, with or without Ray.

The loop is given a `WorkerContext` that says who it is (rank, world size, device), where
to resume from, how to wrap the model for data parallelism and how to report a checkpoint.
`pipeline/train/run.py` builds that context for Ray Train workers and for a single process.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.models import build_model
from pipeline.models.adversarial import adversarial_enabled, discriminator_lr
from pipeline.models.discriminator import build_discriminator
from pipeline.models.family import family_for
from pipeline.models.perceptual import check_perceptual, load_perceptual
from pipeline.train.board import RunBoard, check_board
from pipeline.train.checkpoint import read_state, write_checkpoint
from pipeline.train.config import TrainConfig, TrainRunConfig, run_dir
from pipeline.train.ema import check_ema_decay, resume_ema
from pipeline.train.precision import check_options, make_amp, prepare_module, to_layout
from pipeline.train.progress import Progress
from pipeline.train.resume import ResumableBatches, reseed
from pipeline.train.retry import with_retries
from pipeline.train.schedule import ScheduledLr, check_schedule
from pipeline.train.step import (
    Adversary,
    MetricMeter,
    accumulated_step,
    lr_factor,
    make_optimizer,
    set_lr,
)

log = logging.getLogger("latentpipe.train")


def _alone(obj: Any) -> list:
    return [obj]


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    resume_dir: str | None  # local directory of the checkpoint to continue from, if any
    wrap: Callable[[torch.nn.Module], torch.nn.Module]  # e.g. DDP; identity in one process
    all_mean: Callable[[torch.Tensor], torch.Tensor]  # mean across ranks; identity in one process
    # report(step, metrics, write_fn): every rank calls it at checkpoint steps; write_fn(dir)
    # fills a local directory with the checkpoint and is used by rank 0 only.
    report: Callable[[int, dict, Callable[[str], None]], None]
    # every rank's object, in rank order (a collective under DDP); [obj] in one process
    all_gather: Callable[[Any], list] = field(default=_alone)


def run_loop(cfg: TrainRunConfig, ctx: WorkerContext) -> dict:
    """Train until cfg.train.steps, logging and checkpointing; returns the last metrics."""
    torch.manual_seed(cfg.train.seed)  # initial weights depend on the seed only, on every rank
    model = prepare_module(build_model(cfg.model).to(ctx.device), cfg.train)
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.betas, cfg.train.weight_decay)
    extra = _adversarial_parts(cfg, ctx.device)
    amp = make_amp(cfg.train.precision, ctx.device)
    step, saved = _restore(ctx.resume_dir, model, optimizer, extra)
    amp.load_state_dict(saved.get("scaler") or {})
    ema = resume_ema(model, cfg.train.ema_decay, saved)  # None unless train.ema_decay > 0
    perceptual = load_perceptual(cfg.loss, ctx.device)  # None unless loss.perceptual_weight > 0
    if step >= cfg.train.steps:
        if ctx.rank == 0:
            log.info("run already at step %d of %d: nothing to do", step, cfg.train.steps)
        return {"step": step}
    # Every (re)start may have another world size (elastic runs): fields of each metrics record.
    scale = _scale_for_world_size(cfg, ctx, optimizer, extra)
    schedule = ScheduledLr(cfg.train, [optimizer] + ([extra["disc_optimizer"]] if extra else []))
    resumed = {"resumed_from": step} if step else {}  # marks the first record after a resume
    wrapped = ctx.wrap(model)
    adversary = None
    if extra:  # DDP on the discriminator too: every one of its parameters is used each step
        disc = prepare_module(extra["disc"], cfg.train)
        adversary = Adversary(ctx.wrap(disc), extra["disc_optimizer"])
    data = ResumableBatches(
        cfg.data,
        ctx.rank,
        ctx.world_size,
        ctx.device,
        saved.get("data"),
        fresh_epoch=step,
        layout=lambda images: to_layout(images, cfg.train),
    )
    metrics_log = MetricsLog.for_run(cfg.train) if ctx.rank == 0 else None
    board = RunBoard.for_worker(cfg, ctx.rank, step, ctx.device)  # TensorBoard, rank 0
    progress = Progress(step, cfg.train.steps)
    meter, started, last = MetricMeter(), time.perf_counter(), {"step": step}
    while step < cfg.train.steps:
        reseed(cfg.train.seed, ctx.rank, step)  # no RNG state carries across steps (resume.py)
        lr = schedule.apply(step)
        micro = data.take(cfg.train.grad_accum_steps)
        terms = accumulated_step(
            wrapped,
            micro,
            optimizer,
            cfg.loss,
            cfg.train.grad_clip,
            step,
            adversary,
            amp,
            perceptual,
        )
        if ema is not None:
            ema.update(model)
        meter.add(terms, sum(len(images) for images, _ in micro))
        step += 1
        board.after_step(step, [model] + ([ema.module] if ema else []))
        at_end = step == cfg.train.steps
        if step % cfg.train.log_every == 0 or at_end:
            last = {
                **_interval_metrics(meter, step, started, ctx, progress),
                **scale,
                "lr": lr,
                **resumed,
            }
            resumed = {}
            if metrics_log is not None:
                metrics_log.write(last)
            board.record(last)
            meter, started = MetricMeter(), time.perf_counter()
        if step % cfg.train.checkpoint_every == 0 or at_end:
            # every rank's data position, then the barrier of report: all ranks get here
            state = {"data": data.gathered_state(ctx.all_gather), "scaler": amp.state_dict()}
            ctx.report(
                step,
                last,
                lambda d, s=step, st=state: write_checkpoint(
                    d, model, optimizer, s, cfg, extra, st, ema=ema
                ),
            )
            board.sync()  # object stores: the event files go up with the checkpoints
    board.close()
    return last


def check_run_config(cfg: TrainRunConfig) -> None:
    """Combinations of settings the loop cannot run, refused before any worker starts."""
    if adversarial_enabled(cfg.loss) and not family_for(cfg.model.kind).adversarial:
        raise ValueError(
            f"loss.disc_start: the adversarial loss needs a kl or vq model, not {cfg.model.kind!r}"
        )
    _check_scaling(cfg.train)
    check_perceptual(cfg.loss, cfg.model.kind, str(cfg.data.value_range))
    check_ema_decay(cfg.train.ema_decay)
    check_board(cfg.train)
    check_options(cfg.train)
    check_schedule(cfg.train)


def _check_scaling(t: TrainConfig) -> None:
    if not 0 <= t.min_workers <= t.num_workers:
        raise ValueError(
            f"train.min_workers={t.min_workers}: elastic training needs "
            f"1 <= min_workers <= num_workers ({t.num_workers}), or 0 for a fixed size"
        )
    if t.base_world_size < 0:
        raise ValueError(f"train.base_world_size={t.base_world_size}: expected >= 0")
    if t.upload_attempts < 1 or t.upload_backoff_s < 0:
        raise ValueError("train.upload_attempts must be >= 1 and train.upload_backoff_s >= 0")
    if not t.resource_wait_s > 0:  # Ray would time out every start at once, for ever
        raise ValueError(
            f"train.resource_wait_s={t.resource_wait_s}: expected seconds > 0 (how long a "
            "worker-group start waits for room in the cluster before it tries again)"
        )


def _scale_for_world_size(cfg: TrainRunConfig, ctx: WorkerContext, optimizer, extra) -> dict:
    """Set the learning rate(s) for this world size; log and return the run's scale."""
    t = cfg.train
    base = t.base_world_size or max(t.num_workers, 1)
    factor = lr_factor(t.lr_scaling, ctx.world_size, base)
    lr = t.lr * factor
    set_lr(optimizer, lr)
    if extra:  # the discriminator's rate scales the same way
        set_lr(extra["disc_optimizer"], discriminator_lr(cfg.loss, t.lr) * factor)
    global_batch = ctx.world_size * cfg.data.batch_size * t.grad_accum_steps
    if ctx.rank == 0:
        elastic = f" (elastic {t.min_workers}..{t.num_workers})" if t.min_workers else ""
        log.info(
            "world size %d%s: global batch %d (%d per worker x %d micro-batches), lr %.4g "
            "(lr_scaling=%s, base world size %d)",
            ctx.world_size,
            elastic,
            global_batch,
            cfg.data.batch_size,
            t.grad_accum_steps,
            lr,
            t.lr_scaling,
            base,
        )
    return {"world_size": ctx.world_size, "global_batch": global_batch, "lr": lr}


def _adversarial_parts(cfg: TrainRunConfig, device: torch.device) -> dict:
    """{"disc", "disc_optimizer"} when loss.disc_start >= 0, else {}."""
    if not adversarial_enabled(cfg.loss):
        return {}
    disc = build_discriminator(cfg.loss, cfg.model.in_channels).to(device)
    lr = discriminator_lr(cfg.loss, cfg.train.lr)
    return {
        "disc": disc,
        "disc_optimizer": make_optimizer(disc, lr, cfg.train.betas, cfg.train.weight_decay),
    }


def _restore(resume_dir: str | None, model, optimizer, extra: dict) -> tuple[int, dict]:
    """(step, the checkpoint's training state) after loading model, optimiser and `extra`."""
    if resume_dir is None:
        return 0, {}
    state = read_state(resume_dir)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for name, part in extra.items():
        if name in state:
            part.load_state_dict(state[name])
        else:  # e.g. the adversarial loss was switched on when resuming an older run
            log.info("checkpoint has no %r: starting it fresh", name)
    log.info("resumed from %s at step %d", resume_dir, state["step"])
    return int(state["step"]), state


def _interval_metrics(
    meter: MetricMeter, step: int, started: float, ctx: WorkerContext, progress: Progress
) -> dict:
    """Averages over the interval and all ranks: one small all-reduce per log line."""
    means = meter.means(reduce=ctx.all_mean)
    seconds = time.perf_counter() - started
    record = {"step": step, **{k: round(v, 6) for k, v in means.items()}}
    record["images_per_s"] = round(meter.images * ctx.world_size / max(seconds, 1e-9), 2)
    if ctx.rank == 0:  # step 120/400  loss ...  85.3 img/s  ETA 3m12s
        log.info("%s", progress.line(step, means, record["images_per_s"]))
    return record


class MetricsLog:
    """metrics.jsonl in the run directory: appended locally, rewritten on object stores.

    Each write is retried (`attempts`, `backoff_s`): a store that restarts must not end a run
    over a log line."""

    def __init__(self, directory: str, attempts: int = 1, backoff_s: float = 0.0):
        self.fs, root = fsspec.core.url_to_fs(directory)
        self.path = f"{root}/metrics.jsonl"
        self.append = isinstance(self.fs, LocalFileSystem)
        self.lines: list[str] = []
        self.retry = {"attempts": attempts, "backoff_s": backoff_s}
        self._retried("metrics.jsonl read", lambda: self._load(root))

    @classmethod
    def for_run(cls, cfg: TrainConfig) -> MetricsLog:
        return cls(run_dir(cfg), cfg.upload_attempts, cfg.upload_backoff_s)

    def write(self, record: dict) -> None:
        line = json.dumps(record)
        if self.append:
            self._retried("metrics.jsonl append", lambda: self._append(line))
            return
        self.lines.append(line)
        self._retried("metrics.jsonl write", self._rewrite)

    def _retried(self, what: str, fn) -> None:
        with_retries(fn, f"{what} ({self.path})", **self.retry)

    def _load(self, root: str) -> None:
        self.fs.makedirs(root, exist_ok=True)
        if not self.append and self.fs.exists(self.path):
            self.lines = self.fs.cat_file(self.path).decode().splitlines()

    def _append(self, line: str) -> None:
        with self.fs.open(self.path, "a") as f:
            f.write(line + "\n")

    def _rewrite(self) -> None:
        with self.fs.open(self.path, "w") as f:
            f.write("\n".join(self.lines) + "\n")
