"""Finishing an encode job: merge the units' commit records into ``manifest.json``.

Written last, from the commit records alone (never from in-memory state of one run), so a
corpus finished after several interrupted runs has the same manifest, timings aside, as one
made in a single run. Statistics are merged in unit order for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from pipeline.config import save_resolved_config
from pipeline.encode.config import EncodeConfig
from pipeline.encode.stages import is_vq
from pipeline.encode.stats import ChannelStats, CodeUsage
from pipeline.latents.format import (
    CODEBOOK_FILE,
    INDICES_FIELD,
    LATENT_FIELD,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    MEAN_KIND,
    REJECTS_FILE,
    SAMPLE_KIND,
    SIZES_FIELD,
    STD_FIELD,
    VQ_KIND,
    join_url,
    storage_dtype,
    write_bytes_atomic,
    write_json_atomic,
)


def channels(sidecar: dict[str, Any]) -> int:
    """Channels of the latents statistics are taken on (VQ: of the codebook lookup)."""
    return int(sidecar["code_dim"]) if is_vq(sidecar) else int(sidecar["latent_shape"][0])


def manifest_scale(stats: dict[str, Any], sidecar: dict[str, Any]) -> dict[str, Any]:
    """scaling/shift factor for the manifest: the corpus's own, unless the encoder was exported
    with published factors (an imported model), which its diffusion model was trained with."""
    if sidecar.get("scaling_source") == "checkpoint":
        return {
            **{k: float(sidecar[k]) for k in ("scaling_factor", "shift_factor")},
            "scaling_source": "checkpoint",
        }
    std = stats["std"]
    # Fall back to the sidecar's estimate when nothing was encoded (or std is degenerate).
    usable = std is not None and std > 0 and math.isfinite(std)
    return {
        "scaling_factor": 1.0 / std if usable else float(sidecar["scaling_factor"]),
        "shift_factor": stats["mean"] if usable else float(sidecar["shift_factor"]),
        "scaling_source": "corpus" if usable else "sidecar",
    }


def latent_spec(cfg: EncodeConfig, sidecar: dict[str, Any], shapes: list[list[int]]) -> dict:
    """The manifest's ``latent`` block: what each sample stores, and how to read it."""
    shape = shapes[0] if len(shapes) == 1 else None
    if not is_vq(sidecar):
        std_field = STD_FIELD if cfg.storage.store_std else None
        return {
            "kind": SAMPLE_KIND if cfg.storage.latent == "sample" else MEAN_KIND,
            "field": LATENT_FIELD,
            "dtype": cfg.storage.dtype,
            "storage_dtype": storage_dtype(cfg.storage.dtype),
            "channels": channels(sidecar),
            "shape": shape,
            "shapes": shapes,
            "std_field": std_field,
            "sizes_field": SIZES_FIELD,
            "sample_seed": cfg.storage.sample_seed if cfg.storage.latent == "sample" else None,
        }
    return {
        "kind": VQ_KIND,
        "field": INDICES_FIELD,
        "dtype": sidecar["index_dtype"],
        "storage_dtype": sidecar["index_dtype"],
        "channels": channels(sidecar),
        "shape": shape,
        "shapes": shapes,
        "std_field": None,
        "sizes_field": SIZES_FIELD,
        "num_codes": int(sidecar["num_codes"]),
        "code_dim": int(sidecar["code_dim"]),
        # codebook lookup of the indices: the quantized latent [C, h, w] diffusion reads
        "lookup_shape": [int(sidecar["code_dim"]), *shape] if shape else None,
        "codebook_file": CODEBOOK_FILE,
        "codebook_sha256": sidecar["codebook_sha256"],
    }


def wall_time(records: list[dict[str, Any]], this_run: str, this_run_s: float) -> float:
    """Sum over runs of the time each spent until its last commit (this run: until now)."""
    per_run: dict[str, float] = {}
    for record in records:
        run = record.get("run", "")
        per_run[run] = max(per_run.get(run, 0.0), float(record.get("elapsed_s", 0.0)))
    per_run[this_run] = this_run_s
    return sum(per_run.values())


def _rejects_bytes(records: list[dict[str, Any]]) -> bytes:
    lines = [json.dumps(r) + "\n" for record in records for r in record["rejects"]]
    return "".join(lines).encode("utf-8")


def finalize(cfg, sidecar, preprocess, identity, records, codebook, run_info, wall) -> dict:
    """Write codebook, rejects.jsonl, index.json, the config and, last, manifest.json."""
    from pipeline.data.tario import ShardInfo, write_index

    stats = ChannelStats(channels(sidecar))
    codes = CodeUsage(len(codebook[1])) if codebook is not None else None
    for record in records:
        stats.merge(ChannelStats.from_state(record["stats"]))
        if codes is not None:
            codes.merge(record["code_counts"])
    summary = stats.summary()
    shards = [entry for record in records for entry in record["shards"]]
    shapes = sorted({tuple(s["latent_shape"]) for s in shards}) or [native_shape(sidecar)]
    if codebook is not None:
        write_bytes_atomic(join_url(cfg.output, CODEBOOK_FILE), codebook[0])
    write_bytes_atomic(join_url(cfg.output, REJECTS_FILE), _rejects_bytes(records))
    infos = [ShardInfo(s["name"], s["samples"], s["bytes"]) for s in shards]
    field = INDICES_FIELD if codebook is not None else LATENT_FIELD
    write_index(cfg.output, infos, extra={"format": MANIFEST_FORMAT, "latent_field": field})
    save_resolved_config(cfg, cfg.output, "encode-config.yaml")
    rows = sum(r["rows"] for r in records)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "encoder": {"path": cfg.encoder, "sha256": sidecar["onnx_sha256"], "sidecar": sidecar},
        "job": identity,
        "preprocess": dataclasses.asdict(preprocess),
        "storage": dataclasses.asdict(cfg.storage),
        "latent": latent_spec(cfg, sidecar, [list(s) for s in shapes]),
        **manifest_scale(summary, sidecar),
        "measured_mean": summary["mean"],
        "measured_std": summary["std"],
        "channel_mean": summary["channel_mean"],
        "channel_std": summary["channel_std"],
        "values_per_channel": summary["values_per_channel"],
        **({"code_usage": codes.summary()} if codes is not None else {}),
        "shards": shards,
        "inputs": identity["inputs"],
        "input_samples": rows,
        # Inputs that held no sample at all (an empty tar or a 0-byte file): listed, not silent.
        "empty_inputs": [r["input"] for r in records if r["rows"] == 0],
        "samples": sum(r["samples"] for r in records),
        "rejects": sum(len(r["rejects"]) for r in records),
        "rejects_file": REJECTS_FILE,
        "merged_keys": sum(r["merged_keys"] for r in records),
        "replaced_fields": sum(r["replaced_fields"] for r in records),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(rows / wall, 3) if wall > 0 else None,
        "runs": len({r.get("run", "") for r in records} | {run_info["run"]}),
    }
    write_json_atomic(join_url(cfg.output, MANIFEST_FILE), manifest)  # last: the corpus is done
    return manifest


def native_shape(sidecar: dict[str, Any]) -> tuple[int, ...]:
    shape = tuple(int(x) for x in sidecar["latent_shape"])
    return shape[1:] if is_vq(sidecar) else shape
