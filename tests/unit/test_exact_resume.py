"""Exact resume in one process (like torchtitan's checkpoint test): a run interrupted at a
checkpoint and resumed logs bit-identical losses to the uninterrupted run, step for step.

The interruption is the checkpoint alone: the resumed run starts in a run directory holding
nothing but a copy of the uninterrupted run's checkpoint at step K, so everything it continues
with (weights, optimisers, data position, scaler) comes from that checkpoint.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.config import load_config
from pipeline.train.checkpoint import read_state
from pipeline.train.config import TrainRunConfig
from pipeline.train.run import train
from tests.conftest import TINY_TRAIN

STEPS, K = 8, 4
# Fields of a metrics record that may differ between runs: timing, and the resume marker.
UNSTABLE = {"images_per_s", "resumed_from"}


def _config(shards: str, storage, name: str, *extra: str) -> TrainRunConfig:
    overrides = [
        f"data.shards={shards}",
        *TINY_TRAIN,
        "data.shuffle_buffer=8",  # the saved position refers to buffered samples
        f"train.storage_path={storage}",
        f"train.run_name={name}",
        f"train.steps={STEPS}",
        "train.num_workers=0",
        "train.log_every=1",
        f"train.checkpoint_every={K}",
        "train.eval_images=0",
        *extra,
    ]
    return load_config(TrainRunConfig, None, overrides)


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in UNSTABLE}


@pytest.mark.parametrize(
    "options",
    [
        # the adversarial loss from step 2 (its D and optimiser resume too), two micro-batches
        # per step, cosine lr after a warm-up
        [
            "loss.disc_start=2",
            "loss.disc_channels=8",
            "loss.disc_layers=2",
            "train.grad_accum_steps=2",
            "train.lr_schedule=cosine",
            "train.warmup_steps=2",
        ],
        ["train.precision=bf16", "train.channels_last=true"],
    ],
    ids=["adversarial-accum-cosine", "bf16-channels-last"],
)
def test_interrupted_run_logs_the_losses_of_the_uninterrupted_one(tiny_shards, tmp_path, options):
    full = train(_config(tiny_shards, tmp_path, "full", *options))
    # "Interrupted at step K": a run directory with nothing but the checkpoint of step K.
    name = f"checkpoint_{K:08d}"
    shutil.copytree(tmp_path / "full" / name, tmp_path / "resumed" / name)
    resumed = train(_config(tiny_shards, tmp_path, "resumed", *options))

    reference, after = _records(tmp_path / "full"), _records(tmp_path / "resumed")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert after[0]["resumed_from"] == K and "resumed_from" not in after[1]
    assert [_stable(r) for r in after] == [_stable(r) for r in reference[K:]]
    # Not vacuous: the losses moved during the compared steps.
    assert len({r["loss"] for r in after}) == len(after)
    if "train.grad_accum_steps=2" in options:
        assert {"d_loss", "g_loss"} <= set(after[-1])
        assert after[-1]["lr"] < after[0]["lr"]  # cosine decay
    final, again = read_state(full["checkpoint"]), read_state(resumed["checkpoint"])
    assert all(torch.equal(final["model"][k], v) for k, v in again["model"].items())
    assert final["data"] == again["data"]
