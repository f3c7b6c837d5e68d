"""The plan of an encode job: everything fixed for a run, built once on the driver from the
config and the encoder's sidecar, and the settings each actor receives from it."""

from __future__ import annotations

import dataclasses
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipeline.contracts.sidecar import Sidecar, load_sidecar
from pipeline.data.urls import absolute_spec, expand_shard_urls
from pipeline.encode.actor import EncoderSpec, RuntimeOptions
from pipeline.encode.config import EncodeConfig, decode_threads, ort_threads, validate_config
from pipeline.encode.dedup import RewriteSpec
from pipeline.encode.finalize import latent_spec, stats_channels
from pipeline.encode.identity import job_identity
from pipeline.encode.preprocess import resolve_preprocess
from pipeline.encode.store import StoragePlan
from pipeline.encode.unit import UnitSettings
from pipeline.encode.writer import ShardLayout
from pipeline.latents.format import (
    INDICES_FIELD,
    LATENT_FIELD,
    join_url,
    parse_codebook,
    read_hashed,
    read_json,
)


@dataclass
class Job:
    """Everything fixed for the whole run (built once on the driver)."""

    cfg: EncodeConfig
    sidecar: Sidecar
    preprocess: Any
    codebook: tuple[bytes, Any] | None
    urls: list[str]
    identity: dict[str, Any]
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    start: float = field(default_factory=time.time)


def _load_codebook(cfg: EncodeConfig, sidecar: Sidecar) -> tuple[bytes, Any] | None:
    """(raw bytes, float32 array) of a VQ encoder's codebook, hash-checked; None for KL."""
    if not sidecar.is_vq:
        return None
    url = sidecar.codebook_url(cfg.encoder)
    raw = read_hashed(url, sidecar.vq.codebook_sha256)
    codebook = parse_codebook(raw, url)
    expected = (sidecar.vq.num_codes, sidecar.vq.code_dim)
    if codebook.shape != expected:
        raise ValueError(f"{url}: codebook shape {codebook.shape}, sidecar says {expected}")
    return raw, codebook


def _input_urls(spec: str) -> list[str]:
    """The input shards, each checked to exist before any work starts."""
    urls = expand_shard_urls(spec)
    if len(set(urls)) != len(urls):
        twice = next(u for i, u in enumerate(urls) if u in urls[:i])
        raise ValueError(f"encode.input lists {twice} twice; every input shard must be unique")
    return urls


def expected_total(urls: list[str]) -> int | None:
    """Sample count of ``urls`` from their directories' index.json files, or None when unknown."""
    by_dir: dict[str, set[str]] = {}
    for url in urls:
        by_dir.setdefault(posixpath.dirname(url), set()).add(posixpath.basename(url))
    total = 0
    for directory, names in by_dir.items():
        try:
            index = read_json(join_url(directory, "index.json"))
            counts = {s["name"]: int(s["samples"]) for s in index["shards"]}
            total += sum(counts[name] for name in names)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # progress then shows done/? instead of a guess
    return total


def _check_shared(urls: list[str], output: str) -> None:
    """Inputs and output must be storage every Ray worker sees: workers read and write them."""
    for url in (output, *urls[:1]):
        fs, _ = fsspec.core.url_to_fs(url)
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if "memory" in protocols:
            raise ValueError(
                f"{url}: memory:// is private to one process, but the encode job's Ray workers "
                "read the input shards and write the latent shards themselves; use a local path "
                "every worker can see, or an object store (s3://, gs://)"
            )


def prepare(cfg: EncodeConfig) -> Job:
    # Paths go to Ray workers, whose working directory is not ours.
    cfg = dataclasses.replace(
        cfg,
        input=absolute_spec(cfg.input),
        encoder=absolute_spec(cfg.encoder),
        output=absolute_spec(cfg.output),
    )
    validate_config(cfg)
    sidecar = load_sidecar(cfg.encoder)
    preprocess = resolve_preprocess(
        cfg.preprocess,
        sidecar.input.resolution,
        sidecar.downsample_factor,
        sidecar.dynamic_spatial,
    )
    codebook = _load_codebook(cfg, sidecar)
    urls = _input_urls(cfg.input)
    _check_shared(urls, cfg.output)
    identity = job_identity(cfg, sidecar, preprocess, urls)
    return Job(cfg, sidecar, preprocess, codebook, urls, identity)


def layout(job: Job) -> ShardLayout:
    return ShardLayout(
        output=job.cfg.output,
        prefix=job.cfg.prefix,
        buckets=job.preprocess.mode == "buckets",
        channels=stats_channels(job.sidecar),
        factor=job.sidecar.downsample_factor,
        latent_channels=int(job.sidecar.latent_shape[0]),
        vq=job.sidecar.is_vq,
    )


def unit_settings(job: Job) -> UnitSettings:
    cfg, vq = job.cfg, job.sidecar.is_vq
    storage = StoragePlan(
        field=INDICES_FIELD if vq else LATENT_FIELD,
        dtype=cfg.storage.dtype,
        sample=cfg.storage.latent == "sample" and not vq,
        store_std=cfg.storage.store_std and not vq,
        sample_seed=cfg.storage.sample_seed,
        vq=vq,
    )
    return UnitSettings(
        layout=layout(job),
        storage=storage,
        preprocess=job.preprocess,
        batch_size=cfg.batch_size,
        overflow_stop_fraction=cfg.overflow_stop_fraction,
        overflow_min_samples=cfg.overflow_min_samples,
    )


def encoder_spec(job: Job) -> EncoderSpec:
    sidecar = job.sidecar
    norm = sidecar.input.normalization
    return EncoderSpec(
        path=job.cfg.encoder,
        onnx_sha256=sidecar.onnx_sha256,
        input_name=sidecar.input.name,
        scale=float(norm["scale"]),
        offset=float(norm["offset"]),
        vq=sidecar.is_vq,
        num_codes=sidecar.vq.num_codes if sidecar.is_vq else 0,
        index_dtype=sidecar.vq.index_dtype if sidecar.is_vq else "int64",
        channels=int(sidecar.latent_shape[0]),
        factor=sidecar.downsample_factor,
    )


def runtime_options(cfg: EncodeConfig) -> RuntimeOptions:
    return RuntimeOptions(
        device=cfg.device,
        threads=ort_threads(cfg),
        fp16=cfg.fp16_model,
        io_binding=cfg.io_binding,
        need_std=cfg.storage.store_std or cfg.storage.latent == "sample",
        decode_threads=decode_threads(cfg),
    )


def rewrite_spec(job: Job) -> RewriteSpec:
    latent = latent_spec(job.cfg.storage, job.sidecar, [])
    return RewriteSpec(
        layout=layout(job),
        latent_kind=latent["kind"],
        field=latent["field"],
        dtype=latent["dtype"],
        codebook=None if job.codebook is None else job.codebook[1],
    )
