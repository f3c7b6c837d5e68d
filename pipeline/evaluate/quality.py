"""End-of-training evaluation on held-out shards, for every model family.

- KL and VQ autoencoders: PSNR and SSIM of reconstructions (torchmetrics' implementations),
  plus codebook usage and perplexity for VQ.
- Textbook VAEs: negative ELBO and the importance-weighted estimate of -log p(x) (k samples)
  in nats per image, and both in bits per dimension.

`evaluate_checkpoint` is what the trainer calls after the last step, on the checkpoint's model
artifact and the run's `data.val_shards` (the artifact names its training data). The figures go
into the artifact's card (`quality`, from where export copies them into the encoder's sidecar),
into `eval.json` beside the checkpoint and into the run's metrics.jsonl. For autoencoders the same
pass measures the latent scale (1/std and mean of the posterior means, or of the quantized
latents) and records it in the artifact, so a diffusers config.json carries measured factors.
"""

from __future__ import annotations

import json
import logging

import fsspec
import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from pipeline.artifacts.card import LatentScale, ModelCard, checkpoint_of, join, resolve_model_dir
from pipeline.artifacts.store import load_model_artifact, update_model_artifact
from pipeline.config import load_dict_as
from pipeline.data.reader import DataConfig, iter_val_samples, to_tensor
from pipeline.evaluate.likelihood import bits_per_dim, iwae_nll, negative_elbo
from pipeline.latents.stats import ChannelStats
from pipeline.models.family import Family, family_of

log = logging.getLogger("latentpipe.eval")

EVAL_FILE = "eval.json"


def held_out_batches(
    data: DataConfig, limit: int, batch_size: int = 64
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Up to `limit` validation images (and labels) as the model saw data in training: the
    one validation reader (`iter_val_samples`), so the figures are comparable across runs."""
    samples = list(
        iter_val_samples(data.val_shards, data.resolution, limit, data.channels, data.label_field)
    )
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = torch.stack([to_tensor(s.pixels, data.value_range) for s in chunk])
        labels = torch.tensor([s.label for s in chunk]) if data.label_field else None
        batches.append((images, labels))
    return batches


@torch.no_grad()
def reconstruction_metrics(
    model, batches, value_range: str, on_latents=None, family: Family | None = None
) -> dict:
    """Mean PSNR (dB) and SSIM of deterministic reconstructions, on the [0, 1] scale.

    ``on_latents(latents)`` sees every batch's latents (the scale is measured in this pass).
    ``family`` defaults to the model's (pipeline.models.family).
    """
    family = family or family_of(model)
    psnr, ssim, count, usage = 0.0, 0.0, 0, []
    for images, _ in batches:
        recon, latents, extra = family.reconstruct(model, images)
        if on_latents is not None:
            on_latents(latents)
        original, recon = _unit(images, value_range), _unit(recon, value_range).clamp(0, 1)
        n = len(images)
        psnr += n * float(peak_signal_noise_ratio(recon, original, data_range=1.0, dim=(1, 2, 3)))
        ssim += n * float(structural_similarity_index_measure(recon, original, data_range=1.0))
        count += n
        if extra is not None:
            usage.append(extra)
    metrics = {"psnr_db": round(psnr / count, 3), "ssim": round(ssim / count, 4), "images": count}
    if usage:
        indices = torch.cat(usage).flatten()
        metrics.update(codebook_health(indices, model.num_codes))
    return metrics


def codebook_health(indices: torch.Tensor, num_codes: int) -> dict:
    """Fraction of codes used and perplexity of the code distribution over `indices`."""
    counts = torch.bincount(indices, minlength=num_codes).double()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {
        "codebook_usage": round(float((counts > 0).double().mean()), 4),
        "perplexity": round(float(entropy.exp()), 2),
    }


def likelihood_metrics(model, batches, iwae_k: int) -> dict:
    """Negative ELBO and IWAE(k) NLL in nats per image, and in bits per dimension."""
    images = torch.cat([x for x, _ in batches])
    labels = None if batches[0][1] is None else torch.cat([y for _, y in batches])
    dims = images[0].numel()
    generator = torch.Generator().manual_seed(0)
    nelbo = negative_elbo(model, images, labels, generator=generator)
    nll = iwae_nll(model, images, labels, k=iwae_k, generator=generator)
    return {
        "nelbo_nats": round(nelbo, 3),
        f"iwae{iwae_k}_nll_nats": round(nll, 3),
        "nelbo_bits_per_dim": round(bits_per_dim(nelbo, dims), 4),
        f"iwae{iwae_k}_bits_per_dim": round(bits_per_dim(nll, dims), 4),
        "images": len(images),
    }


def evaluate_model(model, data: DataConfig, limit: int, iwae_k: int) -> dict:
    """The held-out figures of this model's family (see the module docstring)."""
    return _evaluate(model, data, limit, iwae_k)[0]


def _evaluate(model, data: DataConfig, limit: int, iwae_k: int) -> tuple[dict, LatentScale | None]:
    """(figures, latent scale measured on the same images; None for the textbook VAEs)."""
    model.eval()
    batches = held_out_batches(data, limit)
    if not batches:
        raise ValueError(f"no usable validation images in {data.val_shards}")
    if family_of(model).evaluation == "likelihood":  # the textbook VAEs
        return likelihood_metrics(model, batches, iwae_k), None
    stats = _LatentStats()
    figures = reconstruction_metrics(model, batches, data.value_range, stats.add)
    return figures, stats.scale(data.val_shards)


class _LatentStats:
    """Streaming latent moments (the encode job's ChannelStats): the diffusion scale."""

    def __init__(self) -> None:
        self.stats: ChannelStats | None = None
        self.images = 0

    def add(self, latents: torch.Tensor) -> None:
        array = latents.detach().float().cpu().numpy()
        self.stats = self.stats or ChannelStats(array.shape[1])
        self.stats.update(array)
        self.images += array.shape[0]

    def scale(self, data: str) -> LatentScale | None:
        summary = self.stats.summary() if self.stats else {"std": 0.0}
        if summary["std"] <= 0:
            return None  # constant latents: no scale to measure
        return LatentScale(1.0 / summary["std"], summary["mean"], "measured", self.images, data)


def run_data(card: ModelCard, where: str) -> DataConfig | None:
    """The training data an artifact names (None for imports), as the run's DataConfig."""
    data = card.provenance.data
    return None if data is None else load_dict_as(DataConfig, data, f"{where}: provenance.data")


def evaluate_checkpoint(checkpoint: str, limit: int, iwae_k: int) -> dict | None:
    """Evaluate a checkpoint's model artifact on its run's `data.val_shards`; record the figures
    (and, for autoencoders, the measured latent scale) in the artifact and in `eval.json`
    beside the checkpoint. `checkpoint` may also be a model artifact directory itself.

    A checkpoint with EMA weights (model_ema/, train.ema_decay > 0) has them evaluated on the
    same images too: each artifact records its own figures and latent scale, and the result
    (and eval.json) holds the raw weights' figures with the EMA's under "ema".
    Returns None (and says why) when the run has no validation shards.
    """
    raw_dir = resolve_model_dir(checkpoint)
    model, _, card = load_model_artifact(raw_dir)
    data = run_data(card, checkpoint)
    if data is None or not data.val_shards:
        log.info("no data.val_shards: skipping the held-out evaluation")
        return None
    metrics = _evaluate_artifact(raw_dir, model, data, limit, iwae_k)
    ema_dir = resolve_model_dir(checkpoint, "ema")
    if ema_dir != raw_dir:
        ema_model, _, _ = load_model_artifact(ema_dir)
        metrics["ema"] = _evaluate_artifact(ema_dir, ema_model, data, limit, iwae_k)
    with fsspec.open(join(_eval_dir(raw_dir), EVAL_FILE), "w") as f:
        json.dump(metrics, f, indent=2)
    log.info("held-out evaluation: %s", metrics)
    return metrics


def _evaluate_artifact(directory: str, model, data: DataConfig, limit: int, iwae_k: int) -> dict:
    """The figures of one artifact's model, recorded in that artifact with its latent scale."""
    metrics, scale = _evaluate(model, data, limit, iwae_k)
    update_model_artifact(directory, latent_scale=scale, quality=metrics)
    return dict(metrics)


def _eval_dir(path: str) -> str:
    """eval.json sits beside the checkpoint's model/ (or beside a bare artifact's files)."""
    return checkpoint_of(path.rstrip("/")) or path.rstrip("/")


def read_eval(checkpoint: str) -> dict | None:
    """`eval.json` of a checkpoint, if it has one."""
    fs, root = fsspec.core.url_to_fs(join(_eval_dir(checkpoint), EVAL_FILE))
    return json.loads(fs.cat_file(root)) if fs.exists(root) else None


def _unit(images: torch.Tensor, value_range: str) -> torch.Tensor:
    return images if value_range == "unit" else (images + 1) / 2
