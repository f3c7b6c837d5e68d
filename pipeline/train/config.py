"""Training configuration: the `train` section and the whole tree a training run reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from pipeline.data.reader import DataConfig
from pipeline.models import ModelConfig
from pipeline.models.losses import LossConfig


class LrScaling(StrEnum):
    """How train.lr follows the world size (elastic runs): lr x 1, x world/base, x sqrt."""

    none = "none"
    linear = "linear"  # lr per image constant (Goyal et al.)
    sqrt = "sqrt"  # gentler, often preferred for Adam-type optimisers


class Precision(StrEnum):
    """Compute precision of forward passes and losses (pipeline/train/precision.py); weights,
    gradients and optimiser state stay float32 in every mode."""

    fp32 = "fp32"
    bf16 = "bf16"  # torch.autocast to bfloat16, CPU and CUDA
    fp16 = "fp16"  # CUDA only: autocast to float16 with a GradScaler (in the checkpoint)


class LrSchedule(StrEnum):
    """Learning-rate curve after the linear warm-up (pipeline/train/schedule.py)."""

    constant = "constant"
    cosine = "cosine"  # half a cosine from the base lr down to 0 at train.steps


@dataclass
class TrainConfig:
    run_name: str = "latentpipe"  # re-running with the same name resumes from its latest checkpoint
    storage_path: str = "runs"  # local directory or fsspec URL (s3://bucket/prefix); run dir = storage_path/run_name
    steps: int = 200  # total optimiser steps (a resumed run continues towards the same total)
    lr: float = 4.5e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # LDM's autoencoder setting
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # EMA of the weights (pipeline/train/ema.py), updated every optimiser step: 0 = off, e.g.
    # 0.9999. Checkpoints then hold it as a second model artifact, model_ema/; the final
    # evaluation measures both; export uses it by default (export.weights).
    ema_decay: float = 0.0
    log_every: int = 10
    checkpoint_every: int = 100  # also checkpoints at the last step
    # TensorBoard event files in the run directory (pipeline/train/board.py): every metrics
    # record as scalars, and a reconstruction grid of a fixed batch every image_every steps
    # (0 = no grid).
    tensorboard: bool = True
    image_every: int = 100
    num_workers: int = 2  # Ray Train DDP workers; 0 runs the same loop in this process without Ray
    # Elastic training: 0 = always num_workers; 1..num_workers = Ray Train runs with as many
    # workers as the cluster has room for in [min_workers, num_workers], restarting the group
    # smaller when a node is lost (each loss counts against max_failures) and larger when
    # capacity returns.
    min_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # Fixed-size runs: how long Ray Train waits for the cluster to have room for the worker
    # group before it gives up on that try, prints the timeout with a traceback and tries again
    # (for ever). Ray's own 60 s prints that traceback every minute while a job queues behind
    # another or an autoscaler adds nodes (minutes on KubeRay); a queued job is not an error.
    # Elastic runs wait at most 60 s (Ray's own default): a restart after a lost node first
    # asks for the old size (the lost node's resources are still counted) and only that
    # timeout makes it go smaller. Below min_workers an elastic run waits without a timeout.
    resource_wait_s: float = 900.0
    # Worker-group restarts after a lost worker or node (-1 = unlimited); each restart resumes
    # from the latest checkpoint within the same command. With 0, a failure ends the command
    # and re-running it resumes.
    max_failures: int = 0
    # Learning rate for a changed world size: none | linear (lr x world/base) | sqrt
    # (lr x sqrt(world/base)), where base = base_world_size, 0 meaning num_workers.
    lr_scaling: LrScaling = LrScaling.none
    base_world_size: int = 0
    # Writes to storage_path (checkpoint uploads, metrics.jsonl) are tried this many times,
    # waiting upload_backoff_s after the first failure and twice as long after each next one
    # (capped at 30 s): an object store that restarts does not end the run.
    upload_attempts: int = 6
    upload_backoff_s: float = 1.0
    seed: int = 0
    precision: Precision = Precision.fp32  # fp32 | bf16 (CPU, CUDA) | fp16 (CUDA, GradScaler)
    # Micro-batches of data.batch_size per optimiser step (DDP syncs gradients on the last one
    # only): the global batch is num_workers x data.batch_size x grad_accum_steps.
    grad_accum_steps: int = 1
    # lr at step s = lr (scaled for the world size) x schedule(s): linear warm-up over
    # warmup_steps, then constant or cosine to 0 at train.steps. A pure function of the step,
    # so a resumed run continues the same curve (if train.steps is unchanged).
    lr_schedule: LrSchedule = LrSchedule.constant
    warmup_steps: int = 0
    compile: bool = False  # torch.compile the autoencoder and discriminator (first steps compile)
    channels_last: bool = False  # NHWC memory format for models and images (faster convs on GPU)
    # After the last step, on data.val_shards (skipped without them): PSNR/SSIM for
    # autoencoders, negative ELBO and IWAE NLL for the textbook VAEs.
    eval_images: int = 256
    iwae_k: int = 100  # importance samples per image for the IWAE estimate of -log p(x)

    def __post_init__(self) -> None:
        # Choices are Enums: a bad value fails at config load (OmegaConf names the key) or here.
        self.precision = Precision(self.precision)
        self.lr_schedule = LrSchedule(self.lr_schedule)
        self.lr_scaling = LrScaling(self.lr_scaling)


@dataclass
class TrainRunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def run_dir(cfg: TrainConfig) -> str:
    return f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}"
