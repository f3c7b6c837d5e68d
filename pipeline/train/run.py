"""Run training: Ray Train `TorchTrainer` with DDP workers, or one process without Ray.

Both paths run `pipeline.train.loop.run_loop`; this module only builds the worker context
(ranks, DDP wrapping, checkpoint reporting) around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile

import fsspec
import torch
from omegaconf import OmegaConf

from pipeline.config import save_resolved_config, to_dict
from pipeline.data.urls import absolute_spec, expand_shard_urls
from pipeline.evaluate.quality import evaluate_checkpoint
from pipeline.raysetup import init_ray
from pipeline.train.checkpoint import latest_checkpoint, put_tree, read_state
from pipeline.train.config import TrainRunConfig, run_dir
from pipeline.train.loop import MetricsLog, WorkerContext, check_run_config, run_loop

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
        metrics = run_loop(cfg, _single_process_context(directory))
        checkpoint = latest_checkpoint(directory)
    else:
        metrics, checkpoint = _fit_with_ray(cfg)
    log.info("training done: checkpoint %s", checkpoint)
    result = {"run_dir": directory, "checkpoint": checkpoint, "metrics": metrics}
    if checkpoint and cfg.train.eval_images > 0:
        result["eval"] = _evaluate(checkpoint, cfg, directory)
    return result


def _evaluate(checkpoint: str, cfg: TrainRunConfig, directory: str) -> dict | None:
    """Held-out figures of the final checkpoint, also appended to the run's metrics.jsonl."""
    figures = evaluate_checkpoint(checkpoint, cfg.train.eval_images, cfg.train.iwae_k)
    if figures is not None:
        step = read_state(checkpoint)["step"]
        MetricsLog(directory).write({"step": step, "eval": figures})
    return figures


def _with_absolute_paths(cfg: TrainRunConfig) -> TrainRunConfig:
    """Ray workers run in another working directory: pass them absolute local paths."""
    data = dataclasses.replace(
        cfg.data,
        shards=absolute_spec(cfg.data.shards),
        val_shards=absolute_spec(cfg.data.val_shards),
    )
    train = dataclasses.replace(cfg.train, storage_path=absolute_spec(cfg.train.storage_path))
    return dataclasses.replace(cfg, data=data, train=train)


def _check_storage(cfg: TrainRunConfig) -> None:
    if cfg.train.storage_path.startswith("memory://") and cfg.train.num_workers > 0:
        raise ValueError(
            "train.storage_path=memory://... lives in one process; Ray Train workers cannot "
            "share it. Use a local directory or an object store, or train.num_workers=0."
        )


# -- Ray Train ---------------------------------------------------------------------------


def _fit_with_ray(cfg: TrainRunConfig) -> tuple[dict, str | None]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray()
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": to_dict(cfg)},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=cfg.train.storage_path,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    checkpoint = None
    if result.checkpoint is not None:
        checkpoint = _checkpoint_url(cfg.train.storage_path, result.checkpoint.path)
    return result.metrics or {}, checkpoint


def _ray_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    cfg = _from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    resume = ray.train.get_checkpoint()
    # Ray knows the checkpoints its run snapshot committed; a run killed before the snapshot
    # was written would restart from zero, so fall back to the newest complete one on storage.
    fallback = None if resume else latest_checkpoint(run_dir(cfg.train))
    with resume.as_directory() if resume else contextlib.nullcontext(fallback) as resume_dir:
        worker = WorkerContext(
            rank=ctx.get_world_rank(),
            world_size=ctx.get_world_size(),
            device=ray.train.torch.get_device(),
            resume_dir=resume_dir,
            wrap=ray.train.torch.prepare_model,
            all_mean=_all_mean,
            report=_ray_report,
        )
        run_loop(cfg, worker)


def _ray_report(step: int, metrics: dict, write) -> None:
    """Every rank reports (it is a barrier); only rank 0 attaches the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            write(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)


def _all_mean(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


def _checkpoint_url(storage_path: str, path: str) -> str:
    if "://" in storage_path and "://" not in path:
        return f"{storage_path.split('://', 1)[0]}://{path}"
    return path


# -- one process, no Ray ------------------------------------------------------------------


def _single_process_context(directory: str) -> WorkerContext:
    return WorkerContext(
        rank=0,
        world_size=1,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        resume_dir=latest_checkpoint(directory),
        wrap=lambda m: m,
        all_mean=lambda t: t,
        report=lambda step, metrics, write: _save_numbered_checkpoint(directory, step, write),
    )


def _save_numbered_checkpoint(directory: str, step: int, write) -> None:
    fs, root = fsspec.core.url_to_fs(directory)
    target = f"{root}/checkpoint_{step:08d}"
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp)
        put_tree(fs, tmp, target)  # the files and the model/ artifact
    log.info("checkpoint written: %s", target)


def _from_dict(data: dict) -> TrainRunConfig:
    """Rebuild the dataclass tree on a worker (the dict crossed the process boundary)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainRunConfig), data))
