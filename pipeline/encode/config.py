"""Settings of ``latentpipe encode`` (mirrored by configs/encode/default.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from pipeline.encode.preprocess import PreprocessConfig
from pipeline.latents.format import STORED_DTYPES

DEVICES = ("auto", "cpu", "cuda")
LATENT_MODES = ("mean", "sample")


@dataclass
class StorageConfig:
    """What each latent sample stores. Part of the job's identity: changing it needs a new output."""

    dtype: str = (
        "float16"  # float16 | bfloat16 | float32 (VQ always stores the sidecar's index dtype)
    )
    latent: str = "mean"  # mean | sample: the posterior mean, or one draw seeded per key
    store_std: bool = False  # also store the posterior std (std.npy) for later resampling
    sample_seed: int = 0  # latent=sample: the draw for key k depends only on (sample_seed, k)


@dataclass
class EncodeConfig:
    """Settings of ``latentpipe encode``."""

    input: str = MISSING  # shards: directory (index.json or *.tar), brace pattern or comma list
    output: str = MISSING  # directory URL for latent shards + manifest (re-run to resume)
    encoder: str = MISSING  # path/URL of encoder.onnx; encoder.json sidecar must sit beside it
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    batch_size: int = 32  # images per ONNX Runtime call
    num_actors: int = 1  # encoder actors (one ONNX session each; one GPU each on GPU nodes)
    actor_cpus: float = 1.0  # CPUs Ray reserves per encoder actor
    threads_per_actor: int = 0  # ONNX intra-op threads per actor, 0 = onnxruntime's default
    decode_cpus: float = 1.0  # CPUs Ray reserves per image-decoding task
    device: str = "auto"  # auto | cpu | cuda (cuda fails loudly if the CUDA provider cannot load)
    fp16_model: bool = False  # CUDA only: run a float16 copy of the encoder (changes the latents)
    io_binding: bool = True  # CUDA only: bind inputs/outputs instead of per-call copies
    prefix: str = "latents"  # output shard names: {prefix}-{input shard index}[-h{H}w{W}].tar
    progress_every_s: float = 10.0  # seconds between progress lines


def validate_config(cfg: EncodeConfig) -> None:
    """Raise ValueError naming the offending field for values the job cannot run with."""
    storage = cfg.storage
    if storage.dtype not in STORED_DTYPES:
        raise ValueError(
            f"encode.storage.dtype must be one of {list(STORED_DTYPES)}, got {storage.dtype!r}"
        )
    if storage.latent not in LATENT_MODES:
        raise ValueError(
            f"encode.storage.latent must be one of {list(LATENT_MODES)}, got {storage.latent!r}"
        )
    if cfg.device not in DEVICES:
        raise ValueError(f"encode.device must be one of {list(DEVICES)}, got {cfg.device!r}")
    if cfg.fp16_model and cfg.device == "cpu":
        raise ValueError("encode.fp16_model needs the CUDA execution provider (encode.device=cpu)")
    for name in ("batch_size", "num_actors"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"encode.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.threads_per_actor < 0:
        raise ValueError(f"encode.threads_per_actor must be >= 0, got {cfg.threads_per_actor}")
    for name in ("actor_cpus", "decode_cpus", "progress_every_s"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"encode.{name} must be > 0, got {getattr(cfg, name)}")
    if not cfg.prefix or not cfg.prefix.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"encode.prefix must be a plain file-name prefix, got {cfg.prefix!r}")
