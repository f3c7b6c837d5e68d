"""Exact resume under DDP: 2 Ray Train workers (gloo, CPU) interrupted at a checkpoint and
resumed log bit-identical losses to the uninterrupted run.

Why bit-identical holds with 2 ranks: each rank's data position is in the checkpoint and every
rank reseeds from (seed, rank, step) before each step, so each rank computes the same local
gradients; the all-reduce of two ranks is one addition per element (a + b == b + a in IEEE
arithmetic), so DDP's bucketing -- which differs in the resumed run's first step, before
buckets are rebuilt -- cannot change the sum. With three or more ranks the summation order
could, and the comparison would need a tolerance.
"""

from __future__ import annotations

import shutil

import pytest

from pipeline.train.checkpoint import read_state
from pipeline.train.run import train
from tests.unit.test_exact_resume import _config, _records, _stable

pytestmark = pytest.mark.slow

STEPS, K = 6, 3


def test_ddp_run_interrupted_and_resumed_logs_the_same_losses(ray_local, tiny_shards, tmp_path):
    options = [
        f"train.steps={STEPS}",
        f"train.checkpoint_every={K}",
        "train.num_workers=2",
        "train.grad_accum_steps=2",  # DDP's no_sync on the first micro-batch
    ]
    train(_config(tiny_shards, tmp_path, "full", *options))
    full = tmp_path / "full"
    checkpoints = [p for p in full.glob("checkpoint_*") if p.is_dir()]
    [at_k] = [p for p in checkpoints if read_state(str(p))["step"] == K]
    shutil.copytree(at_k, tmp_path / "resumed" / at_k.name)
    resumed = train(_config(tiny_shards, tmp_path, "resumed", *options))

    reference, after = _records(full), _records(tmp_path / "resumed")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert after[0]["resumed_from"] == K and after[0]["world_size"] == 2
    assert [_stable(r) for r in after] == [_stable(r) for r in reference[K:]]
    assert len({r["loss"] for r in after}) == len(after)
    # Both ranks' positions were gathered into the checkpoint (one slot each, no loader workers).
    data = read_state(resumed["checkpoint"])["data"]
    assert (data["world_size"], data["consumed"], sorted(data["slots"])) == (
        2,
        2 * STEPS,
        ["0", "1"],
    )
