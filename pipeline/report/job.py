"""`latentpipe report run=DIR`: pictures of a trained model, written into ``{run}/report/``.

Loads a model artifact (default: that of the run's newest complete checkpoint), encodes the
validation images of the data it was trained on (``data.val_shards``, else ``data.shards``, as
its card records) and writes PNGs named for what they show, plus
``report.json`` listing them with one-line captions. Everything is deterministic given
``seed``: the images are read in shard order and the only random draws (prior samples) come
from a seeded generator, so regenerating gives byte-identical files. Works for local paths and
fsspec URLs alike.

    latentpipe report run=runs/mnist-cvae [model=RUN/checkpoint_...] [images=8] [seed=0]
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import fsspec
import torch
from omegaconf import MISSING

from pipeline.artifacts.card import artifact_sha256, checkpoint_of, resolve_model_dir
from pipeline.artifacts.store import load_model_artifact
from pipeline.data.reader import AUTO_LABEL, DataConfig, iter_val_samples, to_tensor
from pipeline.evaluate.quality import run_data
from pipeline.report import figures
from pipeline.report.codecs import make_codec
from pipeline.report.figures import Picture, ValBatch

log = logging.getLogger("latentpipe.report")

REPORT_DIR = "report"
SCATTER_POINTS = 1000  # validation images read for the 2-D scatter / a conditional model


@dataclass
class ReportConfig:
    run: str = MISSING  # run directory (train.storage_path/train.run_name), path or URL
    # Model artifact or checkpoint directory; default: the run's newest complete checkpoint.
    model: str = ""
    images: int = 8  # columns of the image grids
    seed: int = 0  # seeds the prior samples


def make_report(cfg: ReportConfig) -> dict:
    """Write the pictures and report.json into ``{run}/report/``; return report.json's content."""
    if cfg.images < 1:
        raise ValueError(f"images must be >= 1, got {cfg.images}")
    model_dir = resolve_model_dir(cfg.model or cfg.run)
    model, data, step = _load(model_dir)
    codec = make_codec(model, data.value_range, data.resolution)
    # More images for the 2-D scatter, and for a conditional model to find an interpolation
    # pair of one class; the grids use the first `images` of them.
    many = codec.latent_shape == (2,) or codec.conditional
    wanted = SCATTER_POINTS if many else max(cfg.images, 2)
    batch = read_val_batch(data, wanted)
    with torch.inference_mode():
        pictures = _pictures(codec, batch, cfg)
    out_dir = f"{cfg.run.rstrip('/')}/{REPORT_DIR}"
    report = {
        "run": cfg.run,
        "model": model_dir,
        "model_sha256": artifact_sha256(model_dir),
        "checkpoint": checkpoint_of(model_dir),
        "step": step,
        "model_kind": model_kind(model, codec),
        "seed": cfg.seed,
        "validation_images": int(batch.images.shape[0]),
        "pictures": [{"file": p.file, "caption": p.caption} for p in pictures if p.png],
        "skipped": [{"file": p.file, "reason": p.caption} for p in pictures if not p.png],
    }
    _write(out_dir, pictures, report)
    log.info("report: %d pictures in %s", len(report["pictures"]), out_dir)
    return report


def _pictures(codec, batch: ValBatch, cfg: ReportConfig) -> list[Picture]:
    generator = torch.Generator().manual_seed(cfg.seed)
    grid_batch = ValBatch(*batch.take(slice(0, cfg.images)), batch.value_range)
    return [
        figures.reconstructions(codec, grid_batch, cfg.images),
        figures.prior_samples(codec, cfg.images, generator),
        figures.interpolation(codec, batch),
        figures.traversal(codec, grid_batch),
        figures.latent_scatter(codec, batch),
        figures.manifold(codec, grid_batch),
    ]


def model_kind(model: torch.nn.Module, codec) -> str:
    """The model kind: "kl", "vq", or the classic VAE class name (e.g. "ConditionalVAE")."""
    return type(model).__name__ if codec.kind == "classic" else codec.kind


def _load(model_dir: str) -> tuple[torch.nn.Module, DataConfig, int | None]:
    """(model in eval mode, the data it was trained on, training step) of a model artifact."""
    model, _, card = load_model_artifact(model_dir)
    data = run_data(card, model_dir)
    if data is None:
        raise ValueError(f"{model_dir} names no training data (an import?): nothing to report on")
    return model, data, card.provenance.step


def read_val_batch(data: DataConfig, limit: int) -> ValBatch:
    """Up to `limit` preprocessed validation images in shard order, with labels if all have one.

    Labels come from ``data.label_field``, else from a ``cls`` member when the samples have one
    (so the scatter of an unconditional model can still be coloured).
    """
    spec = data.val_shards or data.shards
    label_field = data.label_field or AUTO_LABEL
    samples = list(iter_val_samples(spec, data.resolution, limit, data.channels, label_field))
    if not samples:
        raise ValueError(f"no usable validation images in {spec}")
    labels = [s.label for s in samples]
    have_labels = all(label is not None for label in labels)
    return ValBatch(
        torch.stack([to_tensor(s.pixels, data.value_range) for s in samples]),
        torch.tensor(labels, dtype=torch.long) if have_labels else None,
        data.value_range,
    )


def _write(out_dir: str, pictures: list[Picture], report: dict) -> None:
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    for picture in pictures:
        if picture.png:
            fs.pipe_file(f"{root}/{picture.file}", picture.png)
    fs.pipe_file(f"{root}/report.json", (json.dumps(report, indent=2) + "\n").encode())
