"""Settings of ``latentpipe encode`` (mirrored by configs/encode/default.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from omegaconf import MISSING

from pipeline.encode.preprocess import PreprocessConfig


class StorageDtype(StrEnum):
    """How KL latents are stored (VQ always stores the sidecar's index dtype)."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class LatentMode(StrEnum):
    mean = "mean"  # the posterior mean
    sample = "sample"  # one draw per key, seeded by (sample_seed, key)


class Device(StrEnum):
    auto = "auto"  # CUDA when a GPU is visible, else CPU
    cpu = "cpu"
    cuda = "cuda"  # fails loudly if the CUDA provider cannot load


@dataclass
class StorageConfig:
    """What each latent sample stores. Part of the job's identity: changing it needs a new output."""

    dtype: StorageDtype = StorageDtype.float16
    latent: LatentMode = LatentMode.mean
    store_std: bool = False  # also store the posterior std (std.npy) for later resampling
    sample_seed: int = 0  # latent=sample: the draw for key k depends only on (sample_seed, k)

    def __post_init__(self) -> None:
        # Choices are Enums: a bad value fails at config load (OmegaConf names the key) or here.
        self.dtype = StorageDtype(self.dtype)
        self.latent = LatentMode(self.latent)


@dataclass
class EncodeConfig:
    """Settings of ``latentpipe encode``."""

    input: str = MISSING  # shards: directory (index.json or *.tar), brace pattern or comma list
    output: str = MISSING  # directory URL for latent shards + manifest (re-run to resume)
    encoder: str = MISSING  # path/URL of encoder.onnx; encoder.json sidecar must sit beside it
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    batch_size: int = 32  # images per ONNX Runtime call
    # Most encoder actors (one ONNX session each; one GPU each on GPU nodes); 0 = as many as the
    # cluster holds when a pass starts (one per actor_cpus CPUs, or per GPU), at most one per unit.
    num_actors: int = 0
    min_actors: int = 1  # fewest actors the job runs with when capacity is lost (<= num_actors)
    actor_cpus: float = 1.0  # CPUs Ray reserves per encoder actor (its decode threads run there)
    decode_threads: int = 0  # image-decoding threads per actor, 0 = max(1, actor_cpus)
    threads_per_actor: int = 0  # ONNX intra-op threads per actor, 0 = max(1, actor_cpus)
    device: Device = Device.auto
    fp16_model: bool = False  # CUDA only: run a float16 copy of the encoder (changes the latents)
    io_binding: bool = True  # CUDA only: bind inputs/outputs instead of per-call copies
    prefix: str = "latents"  # output shard names: {prefix}-{input shard index}[-h{H}w{W}].tar
    progress_every_s: float = 10.0  # seconds between progress lines
    stall_warn_s: float = 120.0  # no unit committed for this long: log what the job waits for
    stall_timeout_s: float = 1800.0  # ... and fail after this long (0 = wait for ever)
    max_passes: int = 3  # passes over units whose task failed (lost node, transient error)
    overflow_stop_fraction: float = 0.5  # stop when this share of encoded images overflow dtype
    overflow_min_samples: int = 16  # ... among at least this many images (of a unit or the job)
    lease_ttl_s: float = 120.0  # the output's lease expires this long after its last renewal

    def __post_init__(self) -> None:
        self.device = Device(self.device)


def decode_threads(cfg: EncodeConfig) -> int:
    """Decoding threads per actor: the configured count, else one per reserved CPU."""
    return cfg.decode_threads or max(1, int(cfg.actor_cpus))


def ort_threads(cfg: EncodeConfig) -> int:
    """ONNX Runtime intra-op threads per actor: the configured count, else one per reserved CPU.

    Not ORT's own default (one per core of the machine): several actors per node would each
    start that many threads and fight over the cores (on 2 cores, one actor per core with one
    thread each measured faster than one actor with two; docs/benchmarks.md).
    """
    return cfg.threads_per_actor or max(1, int(cfg.actor_cpus))


def validate_config(cfg: EncodeConfig) -> None:
    """Raise ValueError naming the offending field for values the job cannot run with."""
    if cfg.fp16_model and cfg.device == "cpu":
        raise ValueError("encode.fp16_model needs the CUDA execution provider (encode.device=cpu)")
    for name in ("batch_size", "min_actors", "max_passes", "overflow_min_samples"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"encode.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_actors < 0:
        raise ValueError(
            f"encode.num_actors must be >= 0 (0 = as many as fit), got {cfg.num_actors}"
        )
    if cfg.num_actors and cfg.min_actors > cfg.num_actors:
        raise ValueError(
            f"encode.min_actors ({cfg.min_actors}) must be <= encode.num_actors ({cfg.num_actors})"
        )
    for name in ("threads_per_actor", "decode_threads", "stall_timeout_s"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"encode.{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 < cfg.overflow_stop_fraction <= 1:
        raise ValueError(
            f"encode.overflow_stop_fraction must be in (0, 1], got {cfg.overflow_stop_fraction}"
        )
    for name in ("actor_cpus", "progress_every_s", "stall_warn_s", "lease_ttl_s"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"encode.{name} must be > 0, got {getattr(cfg, name)}")
    if not cfg.prefix or not cfg.prefix.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"encode.prefix must be a plain file-name prefix, got {cfg.prefix!r}")
