"""Run training: Ray Train `TorchTrainer` with DDP workers, or one process without Ray.

Both paths run `pipeline.train.loop.run_loop`; this module only builds the worker context
(ranks, DDP wrapping, checkpoint reporting) around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile

import fsspec
import torch
from omegaconf import OmegaConf

from pipeline.config import save_resolved_config, to_dict
from pipeline.data.urls import absolute_spec, expand_shard_urls
from pipeline.errors import ResumableError
from pipeline.evaluate.quality import evaluate_checkpoint
from pipeline.raysetup import init_ray
from pipeline.train.board import write_eval
from pipeline.train.checkpoint import (
    check_upload_complete,
    latest_checkpoint,
    local_file_sizes,
    put_tree,
    pyarrow_file_sizes,
    read_state,
    remote_file_sizes,
)
from pipeline.train.config import TrainConfig, TrainRunConfig, run_dir
from pipeline.train.loop import MetricsLog, WorkerContext, check_run_config, run_loop
from pipeline.train.retry import with_retries

log = logging.getLogger("latentpipe.train")


def train(cfg: TrainRunConfig) -> dict:
    """Train (or resume) the run `cfg.train.run_name`; returns its run dir, checkpoint, metrics."""
    cfg = _with_absolute_paths(cfg)
    _check_storage(cfg)
    check_run_config(cfg)
    expand_shard_urls(cfg.data.shards)  # fail here, with a clear message, not in every worker
    directory = run_dir(cfg.train)
    save_resolved_config(cfg, directory)
    if cfg.train.num_workers == 0:
        metrics = run_loop(cfg, _single_process_context(cfg.train))
        checkpoint = latest_checkpoint(directory)
    else:
        metrics, checkpoint = _fit_with_ray(cfg)
    log.info("training done: checkpoint %s", checkpoint)
    result = {"run_dir": directory, "checkpoint": checkpoint, "metrics": metrics}
    if checkpoint and cfg.train.eval_images > 0:
        result["eval"] = _evaluate(checkpoint, cfg, directory)
    return result


def _evaluate(checkpoint: str, cfg: TrainRunConfig, directory: str) -> dict | None:
    """Held-out figures of the final checkpoint (the EMA's under "ema"), also appended to the
    run's metrics.jsonl and written to TensorBoard."""
    figures = evaluate_checkpoint(checkpoint, cfg.train.eval_images, cfg.train.iwae_k)
    if figures is not None:
        record = {"step": read_state(checkpoint)["step"], "eval": figures}
        MetricsLog.for_run(cfg.train).write(record)
        write_eval(cfg.train, record)
    return figures


def _with_absolute_paths(cfg: TrainRunConfig) -> TrainRunConfig:
    """Ray workers run in another working directory: pass them absolute local paths."""
    data = dataclasses.replace(
        cfg.data,
        shards=absolute_spec(cfg.data.shards),
        val_shards=absolute_spec(cfg.data.val_shards),
    )
    train = dataclasses.replace(cfg.train, storage_path=absolute_spec(cfg.train.storage_path))
    loss = dataclasses.replace(
        cfg.loss, lpips_vgg=_absolute(cfg.loss.lpips_vgg), lpips_lin=_absolute(cfg.loss.lpips_lin)
    )
    return dataclasses.replace(cfg, data=data, loss=loss, train=train)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else path


def _check_storage(cfg: TrainRunConfig) -> None:
    if cfg.train.storage_path.startswith("memory://") and cfg.train.num_workers > 0:
        raise ValueError(
            "train.storage_path=memory://... lives in one process; Ray Train workers cannot "
            "share it. Use a local directory or an object store, or train.num_workers=0."
        )


# -- Ray Train ---------------------------------------------------------------------------


def _fit_with_ray(cfg: TrainRunConfig) -> tuple[dict, str | None]:
    from ray.train import TrainingFailedError

    init_ray()
    t = cfg.train
    try:
        # Ray Train's controller writes its run snapshot to storage itself, with only the
        # storage client's few quick retries; when that fails Ray ends the run (max_failures
        # covers workers only), so the run starts again from its latest checkpoint.
        result = with_retries(
            lambda: _trainer(cfg).fit(),
            f"Ray Train run {t.run_name!r} (storage unreachable)",
            t.upload_attempts,
            t.upload_backoff_s,
            retryable=_storage_failure,
        )
    except (TrainingFailedError, OSError) as err:
        raise _interrupted(t, err) from err
    checkpoint = None
    if result.checkpoint is not None:
        checkpoint = _checkpoint_url(t.storage_path, result.checkpoint.path)
    return result.metrics or {}, checkpoint


# Ray Train V2 reads this in the driver and hands it to its controller (ENV_VARS_TO_PROPAGATE).
WORKER_GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
ELASTIC_START_TIMEOUT_S = 60.0  # Ray's own default: the most an elastic restart waits


def _trainer(cfg: TrainRunConfig):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    # An elastic restart after a lost node only goes smaller once a try times out.
    wait_s = min(t.resource_wait_s, ELASTIC_START_TIMEOUT_S) if t.min_workers else t.resource_wait_s
    os.environ[WORKER_GROUP_START_TIMEOUT] = str(wait_s)
    return TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": to_dict(cfg)},
        scaling_config=ScalingConfig(
            # Ray Train V2: a (min, max) tuple makes the worker group elastic.
            num_workers=(t.min_workers, t.num_workers) if t.min_workers else t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=t.storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def _storage_failure(err: BaseException) -> bool:
    """Ray Train's controller (or the driver setting up the run) failed to reach storage."""
    from ray.train import ControllerError

    cause = err.controller_failure if isinstance(err, ControllerError) else err
    return isinstance(cause, OSError)


def _interrupted(t: TrainConfig, err: Exception) -> ResumableError:
    """The error a failed run ends with: why, where it got to, how to go on from there."""
    storage = _storage_failure(err)
    why = (
        f"storage_path {t.storage_path} stayed unreachable for {t.upload_attempts} tries"
        if storage
        else f"train.max_failures={t.max_failures} allows no more worker-group restarts"
    )
    advice = (
        ""
        if storage
        else (
            "; set train.max_failures >= 1 to let Ray Train restart lost workers within one command"
        )
    )
    return ResumableError(
        f"training run {t.run_name!r} failed: {why} ({_failure_summary(err)}); "
        f"{_where(t)}. To resume, run the same command again (same train.run_name and "
        f"train.storage_path){advice}."
    )


def _where(t: TrainConfig) -> str:
    try:
        latest = latest_checkpoint(run_dir(t))
    except Exception:  # noqa: BLE001 - the storage that just failed may still be unreachable
        return "its checkpoints could not be listed"
    if latest is None:
        return "it wrote no checkpoint yet, so a re-run starts from step 0"
    return f"its latest checkpoint is {latest} (step {read_state(latest)['step']} of {t.steps})"


def _failure_summary(err: Exception) -> str:
    """One line: which ranks failed and why (Ray's own message spans dozens of lines)."""
    failures = getattr(err, "worker_failures", None) or {}
    parts = [f"rank {rank}: {_first_line(e)}" for rank, e in sorted(failures.items())]
    cause = getattr(err, "controller_failure", None)
    return "; ".join(parts) or _first_line(cause or err)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def _ray_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    cfg = _from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    resume = ray.train.get_checkpoint()
    # Ray resumes from the newest checkpoint its run snapshot recorded. Storage can hold a
    # newer complete one (uploaded just before the driver or the controller died, before the
    # snapshot was written): prefer that, so as little work as possible is lost.
    known = resume.path.rstrip("/").rsplit("/", 1)[-1] if resume else ""
    newer = latest_checkpoint(run_dir(cfg.train), newer_than=known)
    if ctx.get_world_rank() == 0 and (newer or resume):
        log.info("resuming from %s", newer or resume.path)
    source = contextlib.nullcontext(newer) if newer or not resume else resume.as_directory()
    with source as resume_dir:
        worker = WorkerContext(
            rank=ctx.get_world_rank(),
            world_size=ctx.get_world_size(),
            device=ray.train.torch.get_device(),
            resume_dir=resume_dir,
            wrap=ray.train.torch.prepare_model,
            all_mean=_all_mean,
            all_gather=_all_gather,
            report=lambda step, metrics, write: _ray_report(cfg.train, step, metrics, write),
        )
        run_loop(cfg, worker)


def _ray_report(t: TrainConfig, step: int, metrics: dict, write) -> None:
    """Every rank reports (it is a barrier); only rank 0 attaches the checkpoint, which it
    uploads with retries (Ray's own retry gives up within seconds of a store going away)."""
    import ray.train

    def upload(checkpoint, dir_name: str):
        storage = ray.train.get_context().get_storage()

        def persist_checked():
            persisted = storage.persist_current_checkpoint(checkpoint, dir_name)
            remote = pyarrow_file_sizes(persisted.filesystem, persisted.path)
            check_upload_complete(local_file_sizes(checkpoint.path), remote, persisted.path)
            return persisted

        return with_retries(
            persist_checked,
            f"checkpoint upload of step {step} to {dir_name}",
            t.upload_attempts,
            t.upload_backoff_s,
        )

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            write(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(
            {**metrics, "step": step},
            checkpoint=checkpoint,
            checkpoint_upload_fn=upload if checkpoint else None,
        )


def _all_mean(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


def _all_gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order: each rank's data position at a checkpoint."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _checkpoint_url(storage_path: str, path: str) -> str:
    if "://" in storage_path and "://" not in path:
        return f"{storage_path.split('://', 1)[0]}://{path}"
    return path


# -- one process, no Ray ------------------------------------------------------------------


def _single_process_context(t: TrainConfig) -> WorkerContext:
    return WorkerContext(
        rank=0,
        world_size=1,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        resume_dir=latest_checkpoint(run_dir(t)),
        wrap=lambda m: m,
        all_mean=lambda x: x,
        report=lambda step, metrics, write: _save_numbered_checkpoint(t, step, write),
    )


def _save_numbered_checkpoint(t: TrainConfig, step: int, write) -> None:
    fs, root = fsspec.core.url_to_fs(run_dir(t))
    target = f"{root}/checkpoint_{step:08d}"

    def upload(tmp: str) -> None:  # whole directory again on a retry: a partial copy is overwritten
        put_tree(fs, tmp, target)
        check_upload_complete(local_file_sizes(tmp), remote_file_sizes(fs, target), target)

    with tempfile.TemporaryDirectory() as tmp:
        write(tmp)
        what = f"checkpoint upload of step {step} to {target}"
        with_retries(lambda: upload(tmp), what, t.upload_attempts, t.upload_backoff_s)
    log.info("checkpoint written: %s", target)


def _from_dict(data: dict) -> TrainRunConfig:
    """Rebuild the dataclass tree on a worker (the dict crossed the process boundary)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainRunConfig), data))
