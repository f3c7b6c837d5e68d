"""The encode driver's progress lines (pipeline.encode.progress) on a fake clock, and how many
encoder actors a cluster's resources hold (pipeline.encode.cluster.actor_capacity)."""

from __future__ import annotations

import logging

import pytest

import pipeline.encode.progress as progress_module
from pipeline.encode.cluster import actor_capacity
from pipeline.encode.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def test_rate_eta_and_first_commit(clock):
    progress = Progress(total=1000, units=10, every_s=5.0)
    assert progress.rate() == 0.0 and progress._eta() == "?" and progress.first_commit_s is None
    clock.now += 4.0
    progress.unit_committed(rows=40, rejects=2)
    clock.now += 6.0
    progress.unit_committed(rows=60, rejects=0)
    assert progress.first_commit_s == pytest.approx(4.0)  # start-up: the first commit only
    assert progress.rate() == pytest.approx(10.0)  # 100 images in 10 s
    assert progress._eta() == "0h01m30s"  # 900 images left at 10 img/s
    assert (progress.done, progress.done_units, progress.rejects) == (100, 2, 2)


def test_resumed_units_count_as_done_but_not_in_the_rate(clock):
    progress = Progress(total=1000, units=10, every_s=5.0)
    progress.resumed(images=500, units=5, rejects=7)
    assert progress.rate() == 0.0 and progress._eta() == "?"
    clock.now += 10.0
    progress.unit_committed(rows=100, rejects=1)
    assert progress.rate() == pytest.approx(10.0)
    assert progress._eta() == "0h00m40s"  # 400 left
    assert (progress.done, progress.done_units, progress.rejects) == (600, 6, 8)


def test_eta_without_an_image_count_extrapolates_this_runs_units(clock):
    progress = Progress(total=None, units=10, every_s=5.0)
    clock.now += 20.0
    progress.unit_committed(rows=50, rejects=0)
    progress.unit_committed(rows=50, rejects=0)
    assert progress._eta() == "0h01m20s"  # 8 units left at 10 s a unit
    resumed = Progress(total=None, units=10, every_s=5.0)
    resumed.resumed(images=500, units=5, rejects=0)
    clock.now += 10.0
    resumed.unit_committed(rows=100, rejects=0)
    assert resumed._eta() == "0h00m40s"  # 4 units left at 10 s a unit (this run's pace)


def test_progress_line(clock, caplog):
    progress = Progress(total=None, units=3, every_s=5.0)
    clock.now += 2.0
    progress.unit_committed(rows=30, rejects=4)
    calls = []

    def capacity() -> str:
        calls.append(1)
        return "nodes 2 alive, encoder actors 2 alive"

    with caplog.at_level(logging.INFO, logger="pipeline.encode.job"):
        progress.maybe_log(capacity)  # 2 s < every_s: nothing, capacity not even asked
        assert caplog.messages == [] and calls == []
        clock.now += 3.0
        progress.maybe_log(capacity)
    (line,) = caplog.messages
    assert line == (
        "encoded 30/? images (6.0 img/s, ETA 0h00m10s), 4 rejected so far; "
        "1/3 input shards committed; nodes 2 alive, encoder actors 2 alive"
    )
    with caplog.at_level(logging.INFO, logger="pipeline.encode.job"):
        Progress(total=10, units=1, every_s=1.0).log()
    assert caplog.messages[-1].startswith("encoded 0/10 images (0.0 img/s, ETA ?)")
    assert caplog.messages[-1].endswith("0/1 input shards committed")


@pytest.mark.parametrize(
    ("resources", "cpus", "gpus", "expected"),
    [
        ({"CPU": 8.0}, 2.0, 0.0, 4),
        ({"CPU": 7.0}, 2.0, 0.0, 3),
        ({"CPU": 1.0}, 2.0, 0.0, 0),
        ({}, 1.0, 0.0, 0),
        ({"CPU": 16.0, "GPU": 2.0}, 1.0, 1.0, 2),  # GPUs bound it
        ({"CPU": 2.0, "GPU": 8.0}, 1.0, 1.0, 2),  # CPUs bound it
        ({"CPU": 16.0}, 1.0, 1.0, 0),  # no GPU at all
        ({"CPU": 4.0, "GPU": 1.0}, 1.0, 0.5, 2),
        # Fractions as Ray counts them (1/10,000 units), not as float floor division does
        ({"CPU": 1.0}, 0.1, 0.0, 10),
        ({"CPU": 2.0}, 0.2, 0.0, 10),
        ({"CPU": 3.0, "GPU": 1.0}, 0.3, 0.1, 10),
    ],
)
def test_actor_capacity(resources, cpus, gpus, expected):
    assert actor_capacity(resources, cpus, gpus) == expected
