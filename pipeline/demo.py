"""`latentpipe demo`: the whole pipeline on embedded Ray, end to end, in a few minutes on CPU.

sample photographs -> train/val shards -> 2-worker DDP training -> ONNX export -> Ray Data
encode of the corpus -> decode validation latents with the trained decoder -> PSNR report and a
reconstruction grid -> `summary.json` naming every artifact, the trained model among them: a
model artifact (for the KL demo a diffusers `AutoencoderKL` directory) with its content hash.

Run: `latentpipe demo workdir=demo-out` (or `make demo`).
VQ variant: `latentpipe demo configs/demo-vq.yaml` trains a small VQ-VAE; the latent shards then
hold uint16 code indices, which are decoded through the corpus's codebook and the trained
decoder, and the summary adds codebook usage and perplexity (training and encoded corpus).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.artifacts.card import resolve_model_dir
from pipeline.artifacts.store import load_model_artifact
from pipeline.config import save_resolved_config
from pipeline.contracts.manifest import Manifest, load_manifest
from pipeline.data.reader import DataConfig, iter_val_images
from pipeline.data.shards import ShardsConfig, build_shards
from pipeline.data.urls import expand_shard_urls
from pipeline.encode.job import EncodeConfig, encode_corpus
from pipeline.export import ExportConfig, export_from_artifact
from pipeline.latents.format import iter_latents, load_manifest_codebook
from pipeline.models import ModelConfig
from pipeline.models.losses import LossConfig
from pipeline.raysetup import init_ray
from pipeline.train.config import TrainConfig, TrainRunConfig
from pipeline.train.run import train
from pipeline.verify import VerifyConfig, decode_pixels, psnr_db, verify_corpus

log = logging.getLogger("latentpipe.demo")

MARKER = ".latentpipe-demo"  # only a directory carrying this marker is ever cleared
FILLED_BY_DEMO = "(set by the demo)"


@dataclass
class DemoConfig:
    workdir: str = "demo-out"
    num_cpus: int = 0  # CPUs for embedded Ray; 0 = all of this machine
    report_images: int = 8  # columns in the reconstruction grid
    shards: ShardsConfig = field(
        default_factory=lambda: ShardsConfig(
            source="sample", output="${workdir}/shards", samples_per_shard=128
        )
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(
            shards="${workdir}/shards/train",
            val_shards="${workdir}/shards/val",
            resolution=64,
            batch_size=16,
            num_workers=0,  # decode inline: on 2 cores both are busy with the DDP workers
        )
    )
    model: ModelConfig = field(default_factory=lambda: ModelConfig(ch=16, ch_mult=[1, 2, 2]))
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            run_name="demo",
            storage_path="${workdir}/runs",
            steps=400,
            log_every=25,
            checkpoint_every=200,
            num_workers=2,
        )
    )
    export: ExportConfig = field(
        default_factory=lambda: ExportConfig(model=FILLED_BY_DEMO, output="${workdir}/export")
    )
    encode: EncodeConfig = field(
        default_factory=lambda: EncodeConfig(
            input=FILLED_BY_DEMO, output="${workdir}/latents", encoder=FILLED_BY_DEMO
        )
    )


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns (and writes to workdir/summary.json) the artifact paths and PSNR."""
    started = time.perf_counter()
    workdir = _prepare_workdir(Path(cfg.workdir))
    save_resolved_config(cfg, str(workdir), "demo-config.yaml")
    init_ray(num_cpus=cfg.num_cpus or None)

    log.info("[1/6] building the sample corpus shards")
    corpus = build_shards(cfg.shards)
    log.info("[2/6] training (%d DDP workers, %d steps)", cfg.train.num_workers, cfg.train.steps)
    run_cfg = TrainRunConfig(data=cfg.data, model=cfg.model, loss=cfg.loss, train=cfg.train)
    trained = train(run_cfg)
    log.info("[3/6] exporting the encoder to ONNX")
    # The weights export picks (the EMA's with train.ema_decay > 0): verify and the report too.
    model_dir = resolve_model_dir(trained["checkpoint"], cfg.export.weights)
    export_cfg = dataclasses.replace(cfg.export, model=model_dir)
    sidecar = export_from_artifact(export_cfg)
    encoder_path = f"{export_cfg.output}/encoder.onnx"
    log.info("[4/6] encoding the corpus with Ray Data + ONNX Runtime")
    encode_cfg = dataclasses.replace(
        cfg.encode, input=f"{corpus['train']},{corpus['val']}", encoder=encoder_path
    )
    encode_corpus(encode_cfg)
    manifest = load_manifest(cfg.encode.output)  # what readers see, validated
    log.info("[5/6] verifying the latent corpus (exactly once, checksums, decode PSNR)")
    verified = _verify(cfg.encode.output, model_dir)
    log.info("[6/6] decoding validation latents and measuring PSNR")
    report = reconstruction_report(
        model_dir, cfg.encode.output, corpus["val"], workdir / "report", cfg
    )
    summary = {
        "shards": {"train": corpus["train"], "val": corpus["val"]},
        "run_dir": trained["run_dir"],
        "checkpoint": trained["checkpoint"],
        # The trained model as an artifact (KL: AutoencoderKL.from_pretrained(model) loads it).
        "model": model_dir,
        "model_sha256": sidecar.model.sha256,
        "onnx": encoder_path,
        "sidecar": f"{export_cfg.output}/encoder.json",
        "latents": cfg.encode.output,
        "manifest": f"{cfg.encode.output}/manifest.json",
        "report": report["report"],
        "grid": report["grid"],
        "psnr_db": report["psnr_db"],
        "train_metrics": trained["metrics"],
        "samples_encoded": manifest.samples,
        "rejects": manifest.rejects,
        "scaling_factor": manifest.scaling_factor,
        "verify": verified,
        "onnx_parity_max_abs_diff": sidecar.parity["max_abs_diff"],
        "model_kind": sidecar.model_kind,
        **_codebook_summary(trained["metrics"], manifest),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    summary = {k: _absolute(v) for k, v in summary.items()}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "demo done in %.0f s: PSNR %.2f dB -> %s",
        summary["wall_time_s"],
        summary["psnr_db"],
        workdir / "summary.json",
    )
    return summary


def _verify(latents_dir: str, model_dir: str) -> dict:
    """`latentpipe verify` on the demo's own corpus; a failed check fails the demo."""
    report = verify_corpus(VerifyConfig(output=latents_dir, decoder=model_dir))
    if not report["ok"]:
        raise RuntimeError(f"latent corpus failed verification: {report['errors'][:3]}")
    keys = ("ok", "samples", "rejects", "input_keys", "decoded", "psnr_db")
    return {k: report[k] for k in keys}


def _codebook_summary(train_metrics: dict, manifest: Manifest) -> dict:
    """VQ only: codebook usage/perplexity at the end of training and over the stored indices."""
    if not manifest.is_vq:
        return {}
    corpus = manifest.code_usage
    return {
        "codebook": {
            "num_codes": corpus["num_codes"],
            # Training figures are the last logging interval's means (usage: codes used within
            # the dead-code window); corpus figures count every stored index once.
            "train_usage": train_metrics.get("usage"),
            "train_perplexity": train_metrics.get("perplexity"),
            "corpus_codes_used": corpus["codes_used"],
            "corpus_usage": corpus["usage"],
            "corpus_perplexity": corpus["perplexity"],
        }
    }


def _absolute(value):
    """Paths in the summary are absolute so it can be read from anywhere."""
    if isinstance(value, dict):
        return {k: _absolute(v) for k, v in value.items()}
    if isinstance(value, str) and "://" not in value and os.path.exists(value):
        return os.path.abspath(value)
    return value


def _prepare_workdir(workdir: Path) -> Path:
    """Start clean, but only ever delete a directory an earlier demo created."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise ValueError(
                f"demo workdir {workdir} exists and was not made by the demo; "
                "choose another workdir=... or empty it"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("created by `latentpipe demo`; safe to delete\n")
    return workdir


def reconstruction_report(
    model_dir: str, latents_dir: str, val_dir: str, out_dir: Path, cfg: DemoConfig
) -> dict:
    """Decode the stored validation latents with the trained decoder; PSNR vs. the originals."""
    model, _, card = load_model_artifact(model_dir)
    resolution = card.image.resolution
    originals = dict(iter_val_images(expand_shard_urls(val_dir), resolution, limit=None))
    codebook = _corpus_codebook(latents_dir, model)
    scores, pairs = [], []
    for key, stored, _extras in iter_latents(latents_dir):
        if key not in originals:
            continue  # a training tile: PSNR is reported on held-out photos only
        recon = decode_pixels(model, stored, codebook)
        scores.append(psnr_db(originals[key], recon))
        if len(pairs) < cfg.report_images:
            pairs.append((originals[key], recon))
    if not scores:
        raise ValueError(f"no validation latents found in {latents_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = out_dir / "reconstructions.png"
    save_grid(pairs, grid)
    report = {
        "psnr_db": round(float(np.mean(scores)), 3),
        "psnr_db_min": round(float(np.min(scores)), 3),
        "images": len(scores),
        "note": "validation tiles come from photos the model never saw in training",
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return {**report, "report": str(out_dir / "report.json"), "grid": str(grid)}


def _corpus_codebook(latents_dir: str, model: torch.nn.Module) -> np.ndarray | None:
    """VQ: the corpus's own codebook.npy (hash-checked), which must be the trained model's
    lookup codebook, so lookup + decode equals ``VQAutoencoder.decode_indices``; KL: None."""
    manifest = load_manifest(latents_dir)
    if not manifest.is_vq:
        return None
    codebook = load_manifest_codebook(latents_dir, manifest)
    if not np.array_equal(codebook, model.quantize.codes().detach().numpy()):
        raise ValueError(f"{latents_dir}: codebook.npy is not the trained model's codebook")
    return codebook


def save_grid(pairs: list[tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """Originals on the top row, reconstructions below, 2 px gaps."""
    h, w, _ = pairs[0][0].shape
    gap = 2
    canvas = np.full((2 * h + gap, len(pairs) * (w + gap) - gap, 3), 255, np.uint8)
    for i, (orig, recon) in enumerate(pairs):
        x = i * (w + gap)
        canvas[:h, x : x + w] = orig
        canvas[h + gap :, x : x + w] = recon
    Image.fromarray(canvas).save(path)
