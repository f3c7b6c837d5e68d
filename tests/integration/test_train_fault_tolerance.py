"""Ray Train runs that lose a worker process, the whole command, or their object store, and
go on (a lost node: test_train_lost_nodes.py).

- The whole command SIGKILLed: the same command resumes from the newest checkpoint. A
  SIGKILLed DDP worker: with train.max_failures=0 the run fails saying how to resume, the
  same command resumes it, and with max_failures=1 it survives another kill in one call.
- The S3 server (moto) stopped and restarted mid-run: writes are retried, the run finishes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline.config import load_config
from pipeline.errors import ResumableError
from pipeline.train.checkpoint import latest_checkpoint, read_state
from pipeline.train.config import TrainRunConfig
from tests.conftest import TINY_TRAIN, _free_port
from tests.proctools import descendants, kill_tree

pytestmark = pytest.mark.slow


def _overrides(shards: str, storage, name: str, steps: int, *extra: str) -> list[str]:
    return [
        f"data.shards={shards}",
        *TINY_TRAIN,
        f"train.storage_path={storage}",
        f"train.run_name={name}",
        f"train.steps={steps}",
        "train.num_workers=2",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "train.eval_images=0",
        *extra,
    ]


def _config(*args) -> TrainRunConfig:
    return load_config(TrainRunConfig, None, _overrides(*args))


def _train_in_thread(cfg: TrainRunConfig) -> tuple[threading.Thread, dict]:
    from pipeline.train.run import train

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = train(cfg)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _checkpoint_step(run: str) -> int:
    latest = latest_checkpoint(run)
    return read_state(latest)["step"] if latest else 0


def _kill_a_worker_after_step(run: str, step: int, thread: threading.Thread) -> int:
    """Wait for a checkpoint past `step`, then SIGKILL one Ray Train worker of this process's
    embedded Ray (found under this process in /proc: other engineers' Ray is not touched)."""
    deadline = time.monotonic() + 240
    while _checkpoint_step(run) <= step:
        assert thread.is_alive(), "training ended before the worker could be killed"
        assert time.monotonic() < deadline, f"no checkpoint past step {step} within 240 s"
        time.sleep(0.2)
    workers = [p for p in descendants(os.getpid()) if _cmdline(p).startswith("ray::RayTrainWorker")]
    assert workers, "no Ray Train worker process found"
    os.kill(workers[-1], signal.SIGKILL)
    return _checkpoint_step(run)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def _records(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _kill_the_command_after_its_first_checkpoint(overrides: list[str], run: str) -> int:
    """`latentpipe train` as a user runs it, SIGKILLed with its embedded Ray (every process
    under it, nothing else) once a checkpoint exists, as a lost machine would end it; the step
    of the newest checkpoint on storage afterwards."""
    cmd = [sys.executable, "-m", "pipeline.cli", "train", *overrides]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while _checkpoint_step(run) == 0:
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        kill_tree(proc.pid)  # mid-run: the driver and every process of its Ray
        proc.wait()
    return _checkpoint_step(run)


def test_killed_command_and_workers_resume_from_their_latest_checkpoints(
    ray_local, tiny_shards, tmp_path
):
    """One run, interrupted three ways, each resuming from the latest checkpoint on storage:
    1. the whole command SIGKILLed (driver and embedded Ray, as a lost machine): the same
       command resumes, from the newest complete checkpoint even where the kill landed after
       its files were written but before Ray's run snapshot recorded it;
    2. with train.max_failures=0, a SIGKILLed DDP worker ends the run with a message naming
       the checkpoint and how to resume;
    3. re-run with max_failures=1, it loses a worker again, restarts within the call and
       finishes at the configured step."""
    storage, steps = tmp_path / "runs", 60
    run = str(storage / "killed")
    first_try = _overrides(tiny_shards, storage, "killed", steps, "train.max_failures=0")
    killed_at = _kill_the_command_after_its_first_checkpoint(first_try, run)
    assert 0 < killed_at < steps
    # max_failures=0: the kill ends the run with a message naming the checkpoint to resume.
    thread, outcome = _train_in_thread(load_config(TrainRunConfig, None, first_try))
    _kill_a_worker_after_step(run, killed_at, thread)
    thread.join(timeout=240)
    error = outcome.get("error")
    assert isinstance(error, ResumableError), outcome
    first = _checkpoint_step(run)
    assert killed_at < first < steps
    assert f"(step {first} of {steps})" in str(error) and "run the same command again" in str(error)
    assert "train.max_failures=0" in str(error) and "rank " in str(error)
    # The same command (here allowed one restart) resumes, loses a worker again and finishes.
    cfg = _config(tiny_shards, storage, "killed", steps, "train.max_failures=1")
    thread, outcome = _train_in_thread(cfg)
    second = _kill_a_worker_after_step(run, first, thread)
    thread.join(timeout=300)
    assert "result" in outcome, outcome.get("error")
    assert read_state(outcome["result"]["checkpoint"])["step"] == steps
    records = _records(run)
    resumed = [r["resumed_from"] for r in records if "resumed_from" in r]
    # Each re-run started from the latest checkpoint, never from step 0.
    assert resumed[:2] == [killed_at, first], records
    assert len(resumed) == 3 and first < resumed[2] <= second  # the restart within one call
    assert records[-1]["step"] == steps and records[-1]["world_size"] == 2


def test_s3_server_restart_mid_run_is_retried_and_the_run_finishes(tiny_shards, tmp_path):
    """A real moto server on its own port is stopped for a few seconds after the first
    checkpoint and started again (moto's state lives in this process, so the bucket survives).
    Ray Train's controller may meet the outage too (its run snapshot): then the run restarts
    from its latest checkpoint within the same command; either way it finishes."""
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port, bucket = _free_port(), "restarting"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    env = {
        **os.environ,
        **creds,
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "RAY_DEDUP_LOGS": "0",
    }
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["AWS_ENDPOINT_URL"])
    fs.mkdir(bucket)
    steps, log = 16, tmp_path / "train.log"
    cmd = [sys.executable, "-m", "pipeline.cli", "train", f"data.shards={tiny_shards}", *TINY_TRAIN]
    cmd += [f"train.storage_path=s3://{bucket}/runs", "train.run_name=s3", f"train.steps={steps}"]
    # Metrics only at the end: the first write the outage meets is a checkpoint upload (the
    # metrics.jsonl retries are tested in tests/unit/test_train_resilience.py).
    cmd += ["train.num_workers=1", f"train.log_every={steps}", "train.checkpoint_every=2"]
    cmd += ["train.eval_images=0", "train.upload_backoff_s=1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not fs.glob(f"{bucket}/runs/s3/checkpoint_*/*", refresh=True):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        server.stop()
        time.sleep(8)  # longer than the storage client's and Ray's own quick retries
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        proc.wait(timeout=360)
        output = log.read_text()
        assert proc.returncode == 0, output[-4000:]
        checkpoint = re.search(r'"checkpoint": "s3://([^"]+)"', output).group(1)
        fs.get(checkpoint, str(tmp_path / "final"), recursive=True)
        listed = fs.ls(f"{bucket}/runs/s3", detail=True, refresh=True)
        kept = sorted(  # directories: Ray's checkpoint_manager_snapshot.json sits beside them
            e["name"] for e in listed if e["type"] == "directory" and "/checkpoint_" in e["name"]
        )
        for i, path in enumerate(kept):
            fs.get(path, str(tmp_path / f"kept{i}"), recursive=True)
    finally:
        if proc.poll() is None:  # after a failure: the CLI and its embedded Ray, no others
            kill_tree(proc.pid)
        server.stop()
    assert read_state(str(tmp_path / "final"))["step"] == steps
    # No checkpoint the outage met was left incomplete: every one on the store loads.
    steps_kept = [read_state(str(tmp_path / f"kept{i}"))["step"] for i in range(len(kept))]
    assert steps_kept == sorted(steps_kept) and steps_kept[-1] == steps, steps_kept
    # The outage was met and retried: by our checkpoint upload, or (when Ray's controller met
    # it first, writing its run snapshot) by restarting the run from its latest checkpoint.
    retried = [line for line in output.splitlines() if "retrying in" in line]
    upload_retried = any("checkpoint upload of step" in line for line in retried)
    run_retried = re.search(r"\(storage unreachable\) succeeded on try [2-9]", output)
    assert upload_retried or run_retried, output[-4000:]
