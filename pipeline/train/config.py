"""Training configuration: the `train` section and the whole tree a training run reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.data.reader import DataConfig
from pipeline.models import ModelConfig
from pipeline.models.losses import LossConfig


@dataclass
class TrainConfig:
    run_name: str = "latentpipe"  # re-running with the same name resumes from its latest checkpoint
    storage_path: str = "runs"  # local directory or fsspec URL (s3://bucket/prefix); run dir = storage_path/run_name
    steps: int = 200  # total optimiser steps (a resumed run continues towards the same total)
    lr: float = 4.5e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # LDM's autoencoder setting
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    log_every: int = 10
    checkpoint_every: int = 100  # also checkpoints at the last step
    num_workers: int = 2  # Ray Train DDP workers; 0 runs the same loop in this process without Ray
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 0  # Ray Train restarts of the worker group on failure
    seed: int = 0
    # After the last step, on data.val_shards (skipped without them): PSNR/SSIM for
    # autoencoders, negative ELBO and IWAE NLL for the textbook VAEs.
    eval_images: int = 256
    iwae_k: int = 100  # importance samples per image for the IWAE estimate of -log p(x)


@dataclass
class TrainRunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def run_dir(cfg: TrainConfig) -> str:
    return f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}"
