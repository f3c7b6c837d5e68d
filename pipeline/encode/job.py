"""Encode an image shard corpus into latent shards with a Ray Data pipeline and an ONNX encoder.

Pipeline: shard URLs -> flat_map(read tar: one row per sample) -> map_batches(decode + resize,
CPU tasks) -> map_batches(OrtEncoder actors, one ONNX session each) -> the driver, which writes
latent shards, rejects.jsonl, index.json and finally manifest.json (the "finished" marker).

VQ encoders (sidecar ``model_kind: "vq"``): the actors run the ``indices`` output and the shards
store ``indices.npy`` (uint16, or int32 beyond 65536 codes). The driver loads ``codebook.npy``
from beside the encoder (hash-checked against the sidecar), computes the statistics and
scaling/shift on the codebook lookup of the indices, and copies the codebook into the output so
the corpus decodes without the encoder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import fsspec
from omegaconf import MISSING

from pipeline.config import save_resolved_config
from pipeline.encode.latents import (
    CODEBOOK_FILE,
    INDICES_FIELD,
    LATENT_FIELD,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    REJECTS_FILE,
    VQ_KIND,
    join_url,
    parse_codebook,
    read_verified,
)

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EncodeConfig:
    """Settings of ``latentpipe encode``."""

    input: str = MISSING  # shards: directory (index.json or *.tar), brace pattern or comma list
    output: str = MISSING  # directory URL for latent shards + manifest
    encoder: str = MISSING  # path/URL of encoder.onnx; encoder.json sidecar must sit beside it
    batch_size: int = 32
    num_actors: int = 1  # encoder actors (one ONNX session each; one GPU each on GPU nodes)
    threads_per_actor: int = 0  # ONNX intra-op threads per actor, 0 = onnxruntime default
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float16"  # stored KL latents: float16 | float32 (VQ: the sidecar's index_dtype)
    samples_per_shard: int = 1000
    prefix: str = "latents"
    decode_cpus: float = 1.0  # CPUs reserved per decode task


def validate_config(cfg: EncodeConfig) -> None:
    """Raise ValueError naming the offending field for values the pipeline cannot run with."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"encode.dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    if cfg.device not in DEVICES:
        raise ValueError(f"encode.device must be one of {list(DEVICES)}, got {cfg.device!r}")
    for name in ("batch_size", "num_actors", "samples_per_shard"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"encode.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.threads_per_actor < 0 or cfg.decode_cpus <= 0:
        raise ValueError("encode.threads_per_actor must be >= 0 and encode.decode_cpus > 0")
    if not cfg.prefix or "/" in cfg.prefix:
        raise ValueError(f"encode.prefix must be a plain file-name prefix, got {cfg.prefix!r}")


def _check_output_free(output: str, prefix: str) -> None:
    fs, path = fsspec.core.url_to_fs(join_url(output, MANIFEST_FILE))
    if fs.exists(path):
        raise FileExistsError(
            f"{output} already holds a finished latent corpus ({MANIFEST_FILE}); "
            "choose a new output directory or delete the old one"
        )
    stale = fs.glob(posixpath.join(posixpath.dirname(path), f"{prefix}-*.tar"))
    if stale:
        # An interrupted earlier run: its shards are overwritten by name; any beyond this run's
        # count stay on disk but are listed in neither index.json nor the manifest.
        log.warning("%s holds %d shard(s) of an unfinished run; overwriting", output, len(stale))


def expected_total(urls: list[str]) -> int | None:
    """Sample count of ``urls`` from their directories' index.json files, or None when unknown."""
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        by_dir.setdefault(posixpath.dirname(url), []).append(posixpath.basename(url))
    total = 0
    for directory, names in by_dir.items():
        try:
            with fsspec.open(join_url(directory, "index.json"), "rt", encoding="utf-8") as f:
                index = json.load(f)
            counts = {s["name"]: int(s["samples"]) for s in index["shards"]}
            total += sum(counts[name] for name in names)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # progress then shows done/? instead of a guess
    return total


def _actor_resources(cfg: EncodeConfig) -> dict[str, float]:
    import ray

    gpus = 0.0
    if cfg.device == "cuda" or (
        cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1
    ):
        gpus = 1.0
    return {"num_cpus": float(max(1, cfg.threads_per_actor)), "num_gpus": gpus}


def _check_capacity(cfg: EncodeConfig, actor: dict[str, float]) -> None:
    """Fail fast instead of hanging when the actors leave no CPU for the decode tasks."""
    import ray

    resources = ray.cluster_resources()
    gpus_needed = cfg.num_actors * actor["num_gpus"]
    if gpus_needed > resources.get("GPU", 0):
        raise ValueError(
            f"encode.device={cfg.device!r} with {cfg.num_actors} actor(s) needs {gpus_needed:g} "
            f"GPU(s) but the Ray cluster has {resources.get('GPU', 0):g}; lower "
            "encode.num_actors or use encode.device=cpu"
        )
    cpus = resources.get("CPU", 0)
    need = cfg.num_actors * actor["num_cpus"] + cfg.decode_cpus
    if cpus < need:
        raise ValueError(
            f"encode needs {need:g} CPUs ({cfg.num_actors} actor(s) x {actor['num_cpus']:g} + "
            f"{cfg.decode_cpus:g} for decoding) but the Ray cluster has {cpus:g}; lower "
            "encode.num_actors, encode.threads_per_actor or encode.decode_cpus"
        )


def build_dataset(cfg: EncodeConfig, urls: list[str], sidecar: dict[str, Any]):
    """The lazy Ray Dataset of encoder-stage rows (see pipeline.encode.stages for the columns)."""
    import ray

    from pipeline.encode.stages import OrtEncoder, decode_batch, read_shard

    actor = _actor_resources(cfg)
    _check_capacity(cfg, actor)
    task_args = {
        "num_cpus": cfg.decode_cpus,
        # max_calls=0 is Ray's default for CPU tasks (reuse workers), spelled out because
        # differing remote args keep Ray from fusing decoding into the encoder actors, which
        # would serialise it behind the model and leave the decode CPUs idle.
        "max_calls": 0,
    }
    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
    ds = ds.flat_map(read_shard, **task_args)
    ds = ds.map_batches(
        decode_batch,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        fn_kwargs={"resolution": int(sidecar["input"]["resolution"])},
        **task_args,
    )
    ds = ds.map_batches(
        OrtEncoder,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        fn_constructor_kwargs={
            "encoder": cfg.encoder,
            "sidecar": sidecar,
            "device": cfg.device,
            "threads": cfg.threads_per_actor,
        },
        **actor,
    )
    # Our own progress log replaces Ray's bars; keep output order = input order (reproducible).
    ds.context.enable_progress_bars = False
    ds.context.execution_options.preserve_order = True
    return ds


def _load_encoder(cfg: EncodeConfig) -> dict[str, Any]:
    from pipeline.export import load_sidecar

    sidecar = load_sidecar(cfg.encoder)
    resize = sidecar["input"].get("resize")
    if resize != "shorter_side_bicubic_center_crop":
        raise ValueError(f"{cfg.encoder}: sidecar resize mode {resize!r} is not supported")
    return sidecar


def manifest_scale(stats: dict[str, Any], sidecar: dict[str, Any]) -> dict[str, float]:
    """scaling/shift factor for the manifest: the corpus's own, unless the encoder was exported
    with published factors (an imported model), which its diffusion model was trained with."""
    if sidecar.get("scaling_source") == "checkpoint":
        return {k: float(sidecar[k]) for k in ("scaling_factor", "shift_factor")}
    std = stats["std"]
    # Fall back to the sidecar's estimate when nothing was encoded (or std is degenerate).
    return {
        "scaling_factor": 1.0 / std if std and math.isfinite(std) else sidecar["scaling_factor"],
        "shift_factor": stats["mean"] if stats["mean"] is not None else sidecar["shift_factor"],
    }


def is_vq(sidecar: dict[str, Any]) -> bool:
    return sidecar.get("model_kind") == "vq"


def latent_spec(cfg: EncodeConfig, sidecar: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``latent`` block: what each sample stores, and how to read it."""
    shape = [int(x) for x in sidecar["latent_shape"]]
    if not is_vq(sidecar):
        return {"field": LATENT_FIELD, "shape": shape, "dtype": cfg.dtype, "kind": "posterior_mean"}
    return {
        "field": INDICES_FIELD,
        "shape": shape[1:],
        "dtype": sidecar["index_dtype"],
        "kind": VQ_KIND,
        "num_codes": int(sidecar["num_codes"]),
        "code_dim": int(sidecar["code_dim"]),
        "lookup_shape": shape,  # codebook lookup of the indices: the quantized latent [C, h, w]
        "codebook_file": CODEBOOK_FILE,
        "codebook_sha256": sidecar["codebook_sha256"],
    }


def _load_codebook(cfg: EncodeConfig, sidecar: dict[str, Any]) -> tuple[bytes, Any] | None:
    """(raw bytes, float32 array) of a VQ encoder's codebook, hash-checked; None for KL."""
    if not is_vq(sidecar):
        return None
    from pipeline.export.sidecar import codebook_url

    url = codebook_url(cfg.encoder, sidecar)
    raw = read_verified(url, sidecar["codebook_sha256"])
    codebook = parse_codebook(raw, url)
    expected = (int(sidecar["num_codes"]), int(sidecar["code_dim"]))
    if codebook.shape != expected:
        raise ValueError(f"{url}: codebook shape {codebook.shape}, sidecar says {expected}")
    return raw, codebook


def _manifest(cfg, sidecar, shards, sink, wall: float) -> dict[str, Any]:
    stats = sink.stats.summary()
    codes = {"code_usage": sink.codes.summary()} if sink.codes is not None else {}
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "encoder": {"path": cfg.encoder, "sha256": sidecar["onnx_sha256"], "sidecar": sidecar},
        "latent": latent_spec(cfg, sidecar),
        **manifest_scale(stats, sidecar),
        "measured_std": stats["std"],
        "measured_mean": stats["mean"],
        "channel_mean": stats["channel_mean"],
        "channel_std": stats["channel_std"],
        **codes,
        "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes} for s in shards],
        "samples": sink.written,
        "rejects": sink.rejected,
        "rejects_file": REJECTS_FILE,
        "replaced_latent_fields": sink.field_clashes,
        "input": cfg.input,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(sink.done / wall, 3) if wall > 0 else None,
    }


def _write_json_atomic(url: str, data: dict[str, Any]) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    tmp = posixpath.join(posixpath.dirname(path), "." + posixpath.basename(path) + ".tmp")
    with fs.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    fs.mv(tmp, path)


def _make_sink(cfg: EncodeConfig, sidecar: dict[str, Any], total: int | None, codebook):
    from pipeline.encode.sink import LatentSink

    spec = latent_spec(cfg, sidecar)
    return LatentSink(
        cfg.output,
        cfg.prefix,
        cfg.samples_per_shard,
        spec["dtype"],
        spec["shape"],
        total,
        field=spec["field"],
        codebook=None if codebook is None else codebook[1],
    )


def _commit(cfg: EncodeConfig, sidecar, sink, codebook, start: float) -> dict[str, Any]:
    """Close the sink, then write codebook (VQ), index.json, config and, last, the manifest."""
    from pipeline.data.tario import write_index

    shards = sink.close()
    if codebook is not None:
        with fsspec.open(join_url(cfg.output, CODEBOOK_FILE), "wb") as f:
            f.write(codebook[0])  # the verified bytes: the manifest's hash pins this copy
    write_index(cfg.output, shards, extra={"format": MANIFEST_FORMAT, "latent_field": sink.field})
    manifest = _manifest(cfg, sidecar, shards, sink, time.monotonic() - start)
    save_resolved_config(cfg, cfg.output, "encode-config.yaml")
    _write_json_atomic(join_url(cfg.output, MANIFEST_FILE), manifest)  # last: the commit record
    return manifest


def encode_corpus(cfg: EncodeConfig) -> dict[str, Any]:
    """Encode ``cfg.input`` into latent shards under ``cfg.output``; returns the manifest."""
    import ray

    from pipeline.data.urls import absolute_spec, expand_shard_urls

    # Paths go to Ray workers, whose working directory is not ours.
    cfg = dataclasses.replace(
        cfg,
        input=absolute_spec(cfg.input),
        encoder=absolute_spec(cfg.encoder),
        output=absolute_spec(cfg.output),
    )
    validate_config(cfg)
    sidecar = _load_encoder(cfg)
    codebook = _load_codebook(cfg, sidecar)
    urls = expand_shard_urls(cfg.input)
    _check_output_free(cfg.output, cfg.prefix)
    if not ray.is_initialized():
        from pipeline.raysetup import init_ray

        init_ray()
    total = expected_total(urls)
    log.info(
        "encoding %d shard(s), %s samples, from %s",
        len(urls),
        "?" if total is None else total,
        cfg.input,
    )
    start = time.monotonic()
    ds = build_dataset(cfg, urls, sidecar)
    sink = _make_sink(cfg, sidecar, total, codebook)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            sink.add_batch(batch)
    except BaseException:
        sink.abort()  # no manifest is written, so the output reads as unfinished
        raise
    manifest = _commit(cfg, sidecar, sink, codebook, start)
    log.info(
        "wrote %d latents in %d shard(s) to %s (%d rejected, %.1f img/s)",
        sink.written,
        len(manifest["shards"]),
        cfg.output,
        sink.rejected,
        manifest["images_per_s"] or 0.0,
    )
    return manifest
