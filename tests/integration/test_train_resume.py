"""Ray Train: a 2-worker DDP run killed (SIGKILL) after a checkpoint resumes and continues."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train.checkpoint import read_state
from tests.conftest import TINY_TRAIN
from tests.proctools import kill_tree

pytestmark = pytest.mark.slow


def _train_cmd(shards: str, storage: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        f"data.shards={shards}",
        *TINY_TRAIN,
        f"train.storage_path={storage}",
        "train.run_name=killme",
        f"train.steps={steps}",
        "train.num_workers=2",
        "train.log_every=5",
        "train.checkpoint_every=5",
    ]


def _checkpoint_steps(run: Path) -> list[int]:
    steps = []
    for state in run.glob("checkpoint_*/training_state.pt"):
        try:
            steps.append(read_state(str(state.parent))["step"])
        except Exception:  # a checkpoint still being copied in
            pass
    return sorted(steps)


def test_killed_run_resumes_and_continues_step_count(tiny_shards, tmp_path):
    storage = tmp_path / "runs"
    run = storage / "killme"
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen(
        _train_cmd(tiny_shards, storage, steps=100_000),
        start_new_session=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not _checkpoint_steps(run) and time.time() < deadline:
            assert proc.poll() is None, "training exited before its first checkpoint"
            time.sleep(1)
        assert _checkpoint_steps(run), "no checkpoint within 240 s"
    finally:
        kill_tree(proc.pid)  # the driver and every process of its embedded Ray, mid-run
        proc.wait()
    killed_at = max(_checkpoint_steps(run))
    target = killed_at + 5
    resumed = subprocess.run(
        _train_cmd(tiny_shards, storage, steps=target),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max(_checkpoint_steps(run)) == target
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == target
    assert logged.count(5) == 1, f"the resumed run restarted from step 0: {logged}"
    # The kill may land after a checkpoint's files were written but before Ray's run snapshot
    # recorded it: the resumed run still starts from it, the newest complete one on storage.
    output = resumed.stdout + resumed.stderr  # Ray forwards worker logs to the driver's stdout
    resumed_at = {int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", output)}
    assert resumed_at == {killed_at}, output[-3000:]
