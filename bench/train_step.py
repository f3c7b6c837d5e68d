"""Training-step throughput of KL autoencoder sizes on this machine (single process, no Ray).

    .venv/bin/python bench/train_step.py             # 1 thread, batch 16, 64 px
    .venv/bin/python bench/train_step.py --threads 2 --steps 10

Prints one Markdown table row per model; results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from pipeline.models import ModelConfig, build_model
from pipeline.models.losses import LossConfig
from pipeline.train.step import make_optimizer, train_step

MODELS = {
    "kl-f4 ch16 (demo)": ModelConfig(ch=16, ch_mult=[1, 2, 2]),
    "kl-f4 ch32": ModelConfig(ch=32, ch_mult=[1, 2, 2]),
    "kl-f8 ch16": ModelConfig(ch=16, ch_mult=[1, 2, 2, 4]),
}


def time_steps(cfg: ModelConfig, batch: int, resolution: int, steps: int) -> float:
    """Seconds per optimiser step, after one warm-up step."""
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = make_optimizer(model, 4.5e-4, [0.5, 0.9], 0.0)
    images = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    train_step(model, images, optimizer, LossConfig(), 1.0)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, images, optimizer, LossConfig(), 1.0)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), batch {args.batch}, {args.resolution} px"
    )
    print("| model | parameters | s/step | images/s |")
    print("|---|---|---|---|")
    for name, cfg in MODELS.items():
        seconds = time_steps(cfg, args.batch, args.resolution, args.steps)
        params = sum(p.numel() for p in build_model(cfg).parameters())
        print(f"| {name} | {params:,} | {seconds:.3f} | {args.batch / seconds:.1f} |")


if __name__ == "__main__":
    main()
