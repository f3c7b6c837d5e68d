"""Fault-tolerance pieces that need no Ray: storage retries, learning-rate scaling, config checks.

The Ray Train side (killed workers, lost nodes, elastic runs, an S3 server restarting) is in
tests/integration/test_train_fault_tolerance.py and test_train_lost_nodes.py.
"""

from __future__ import annotations

import json
import logging
import math
import os

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.config import load_config
from pipeline.errors import ResumableError
from pipeline.train.checkpoint import (
    check_upload_complete,
    latest_checkpoint,
    local_file_sizes,
    pyarrow_file_sizes,
    read_state,
    remote_file_sizes,
)
from pipeline.train.config import TrainRunConfig
from pipeline.train.loop import check_run_config
from pipeline.train.retry import MAX_BACKOFF_S, backoff_delays, with_retries
from pipeline.train.run import _interrupted, train
from pipeline.train.step import lr_factor
from tests.conftest import TINY_TRAIN


class _Flaky:
    """A callable failing `failures` times with OSError, then returning its call count."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(f"connection refused (call {self.calls})")
        return self.calls


def test_retries_wait_doubling_and_succeed(caplog):
    waits: list[float] = []
    with caplog.at_level(logging.WARNING, logger="latentpipe.train"):
        assert with_retries(_Flaky(3), "upload x", 5, 0.5, sleep=waits.append) == 4
    assert waits == backoff_delays(5, 0.5)[:3] == [0.5, 1.0, 2.0]
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 3 and "try 1 of 5" in retries[0] and "OSError" in retries[0]


def test_retries_are_bounded_and_raise_the_last_error():
    flaky, waits = _Flaky(10), []
    with pytest.raises(OSError, match="call 4"):
        with_retries(flaky, "upload x", 4, 1.0, sleep=waits.append)
    assert flaky.calls == 4 and len(waits) == 3
    assert backoff_delays(12, 1.0)[-1] == MAX_BACKOFF_S  # capped, never unbounded waits


def test_bugs_and_unretryable_errors_are_not_retried():
    def bug():
        raise TypeError("not a storage problem")

    with pytest.raises(TypeError):
        with_retries(bug, "x", 5, 0.0, sleep=lambda s: pytest.fail("slept"))
    flaky = _Flaky(1)
    with pytest.raises(OSError):
        with_retries(flaky, "x", 5, 0.0, retryable=lambda e: False)
    assert flaky.calls == 1


@pytest.mark.parametrize(
    "mode, world, base, expected",
    [("none", 1, 4, 1.0), ("linear", 1, 4, 0.25), ("linear", 3, 2, 1.5), ("sqrt", 1, 4, 0.5)],
)
def test_lr_factor(mode, world, base, expected):
    assert math.isclose(lr_factor(mode, world, base), expected)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.min_workers=3", "train.min_workers"),
        ("train.min_workers=-1", "train.min_workers"),
        ("train.base_world_size=-2", "train.base_world_size"),
        ("train.upload_attempts=0", "train.upload_attempts"),
        ("train.resource_wait_s=0", "train.resource_wait_s"),
        ("train.resource_wait_s=-5", "train.resource_wait_s"),
    ],
)
def test_bad_scaling_settings_are_refused_naming_the_key(override, key):
    """(train.lr_scaling is an Enum: a bad value fails at load, tests/unit/test_models.py.)"""
    cfg = load_config(TrainRunConfig, None, ["data.shards=x", "train.num_workers=2", override])
    with pytest.raises(ValueError, match=key):
        check_run_config(cfg)


class FlakyMemoryFS(MemoryFileSystem):
    """memory:// whose first `FAILURES[op]` checkpoint uploads / metrics writes raise OSError,
    like an object store that is restarting."""

    protocol = "flaky"
    FAILURES: dict[str, int] = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).replace("flaky://", "memory://", 1))

    def _maybe_fail(self, op: str) -> None:
        if self.FAILURES.get(op, 0) > 0:
            self.FAILURES[op] -= 1
            raise OSError(f"{op}: connection reset by peer")

    def put_file(self, lpath, rpath, **kwargs):
        self._maybe_fail("put_file")
        if self.FAILURES.get("lost_write", 0) > 0 and os.path.getsize(lpath) > 1:
            # A store that acknowledges a write it did not keep: half the bytes, no error.
            self.FAILURES["lost_write"] -= 1
            with open(lpath, "rb") as src:
                data = src.read()
            return self.pipe_file(rpath, data[: len(data) // 2])
        return super().put_file(lpath, rpath, **kwargs)

    def open(self, path, mode="rb", **kwargs):
        if "w" in mode and str(path).endswith("metrics.jsonl"):
            self._maybe_fail("metrics")
        return super().open(path, mode, **kwargs)


def test_single_process_run_survives_a_failing_store_and_says_how_to_resume(tiny_shards, caplog):
    fsspec.register_implementation("flaky", FlakyMemoryFS, clobber=True)
    FlakyMemoryFS.FAILURES.update({"put_file": 2, "metrics": 2, "lost_write": 1})
    overrides = [
        f"data.shards={tiny_shards}",
        *TINY_TRAIN,
        "train.storage_path=flaky://flaky-runs",
        "train.run_name=flaky",
        "train.num_workers=0",
        "train.steps=4",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "train.eval_images=0",
        "train.upload_backoff_s=0",
    ]
    cfg = load_config(TrainRunConfig, None, overrides)
    with caplog.at_level(logging.INFO, logger="latentpipe.train"):
        result = train(cfg)
    assert FlakyMemoryFS.FAILURES == {"put_file": 0, "metrics": 0, "lost_write": 0}  # all hit
    assert read_state(result["checkpoint"])["step"] == 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum("retrying in" in m for m in messages) == 5
    # Two refused writes, then one the store "kept" short: found by the size check, retried.
    assert any("checkpoint upload of step 2" in m and "incomplete: 1 of" in m for m in messages)
    assert any("checkpoint upload of step 2" in m and "succeeded on try 4" in m for m in messages)
    lines = fsspec.filesystem("memory").cat_file("/flaky-runs/flaky/metrics.jsonl").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 4]  # nothing lost, nothing written twice
    assert {(r["world_size"], r["global_batch"], r["lr"]) for r in records} == {
        (1, cfg.data.batch_size, cfg.train.lr)
    }
    # How a failed run ends: the message names the latest checkpoint and how to resume.
    error = _interrupted(cfg.train, RuntimeError("worker died"))
    assert isinstance(error, ResumableError)
    message = str(error)
    assert latest_checkpoint("flaky://flaky-runs/flaky") in message
    assert "step 4 of 4" in message and "run the same command again" in message
    assert "train.max_failures >= 1" in message


def test_worker_group_waits_for_resources_as_configured(monkeypatch):
    """Ray Train's controller reads its start timeout from the driver's environment; ours is
    train.resource_wait_s (a queued job would otherwise print a traceback every 60 s)."""
    from pipeline.train.run import WORKER_GROUP_START_TIMEOUT, _trainer

    monkeypatch.delenv(WORKER_GROUP_START_TIMEOUT, raising=False)
    keys = ["data.shards=x.tar", "train.resource_wait_s=1234.5"]
    _trainer(load_config(TrainRunConfig, None, keys))  # the monkeypatch restores the environment
    assert float(os.environ[WORKER_GROUP_START_TIMEOUT]) == 1234.5
    # Elastic: at most Ray's 60 s, the timeout after which a restart tries a smaller group.
    _trainer(load_config(TrainRunConfig, None, [*keys, "train.min_workers=1"]))
    assert float(os.environ[WORKER_GROUP_START_TIMEOUT]) == 60
    elastic = [*keys, "train.min_workers=1", "train.resource_wait_s=15"]
    _trainer(load_config(TrainRunConfig, None, elastic))
    assert float(os.environ[WORKER_GROUP_START_TIMEOUT]) == 15


def test_upload_check_finds_missing_and_short_files_on_both_filesystem_kinds(tmp_path):
    """The listing Ray's uploads are checked through (pyarrow) and ours (fsspec) agree, and a
    copy missing a file or holding a short one is refused by name."""
    import shutil

    from pyarrow.fs import LocalFileSystem

    local = tmp_path / "built"
    (local / "model").mkdir(parents=True)
    (local / "training_state.pt").write_bytes(b"x" * 100)
    (local / "model" / "weights.safetensors").write_bytes(b"w" * 1000)
    sizes = local_file_sizes(str(local))
    assert sizes == {"training_state.pt": 100, "model/weights.safetensors": 1000}

    remote = tmp_path / "store" / "checkpoint_1"
    shutil.copytree(local, remote)
    fs = fsspec.filesystem("file")
    for listed in (
        pyarrow_file_sizes(LocalFileSystem(), str(remote)),
        remote_file_sizes(fs, str(remote)),
    ):
        assert listed == sizes
        check_upload_complete(sizes, listed, str(remote))

    (remote / "model" / "weights.safetensors").write_bytes(b"w" * 10)
    (remote / "training_state.pt").unlink()
    for listed in (
        pyarrow_file_sizes(LocalFileSystem(), str(remote)),
        remote_file_sizes(fs, str(remote)),
    ):
        with pytest.raises(OSError, match="incomplete: 2 of 2 files") as err:
            check_upload_complete(sizes, listed, str(remote))
        assert "model/weights.safetensors (10 of 1000 bytes)" in str(err.value)
        assert "training_state.pt (missing)" in str(err.value)
    assert remote_file_sizes(fs, str(tmp_path / "nowhere")) == {}
    assert pyarrow_file_sizes(LocalFileSystem(), str(tmp_path / "nowhere")) == {}
