"""`latentpipe encode` SIGKILLed at several moments and re-run gives byte-identical output."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.encode import EncodeConfig, encode_corpus
from tests.proctools import kill_tree

pytestmark = pytest.mark.slow


def _encode_cmd(shards: str, output: Path, encoder: str, batch_size: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "encode",
        f"input={shards}",
        f"output={output}",
        f"encoder={encoder}",
        f"batch_size={batch_size}",
        "progress_every_s=1",
    ]


def _commits(output: Path) -> int:
    return len(list((output / "_encode" / "commits").glob("u*.json")))


def _run_and_kill(cmd: list[str], output: Path, until) -> None:
    """Start the command; SIGKILL its whole process tree once ``until()`` holds (or it ends)."""
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and not until() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        kill_tree(proc.pid)
        proc.wait(timeout=60)


def _files(directory: Path) -> dict[str, bytes]:
    """Every file a reader could use, by relative path (run bookkeeping and timings excluded)."""
    skip = {"manifest.json", "encode-config.yaml"}
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_file() and rel not in skip and not rel.startswith("_encode/commits"):
            out[rel] = path.read_bytes()
    return out


def test_killed_runs_resume_to_byte_identical_output(
    ray_local, tiny_shards, tiny_encoder, tmp_path
):
    reference = tmp_path / "reference"
    encode_corpus(EncodeConfig(input=tiny_shards, output=str(reference), encoder=tiny_encoder))
    units = _commits(reference)
    assert units >= 10

    output = tmp_path / "killed"
    cmd = _encode_cmd(tiny_shards, output, tiny_encoder, batch_size=7)
    rng = random.Random(4)
    started = time.monotonic()
    kill_points = [
        ("after 2 commits", lambda: _commits(output) >= 2),
        ("at a random moment", lambda: time.monotonic() - started > rng.uniform(1.0, 8.0)),
        ("after most commits", lambda: _commits(output) >= units - 2),
    ]
    seen = []
    for _name, until in kill_points:
        started = time.monotonic()
        _run_and_kill(cmd, output, until)
        seen.append(_commits(output))
    assert not (output / "manifest.json").exists() or seen[-1] == units
    assert seen[0] >= 2 and seen[-1] >= units - 2

    finished = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    manifest = json.loads((output / "manifest.json").read_text())
    expected = json.loads((reference / "manifest.json").read_text())
    assert manifest["runs"] >= 2
    keys = ("shards_sha256", "inputs_sha256", "samples", "rejects", "channel_mean", "channel_std")
    for key in (*keys, "scaling_factor"):
        assert manifest[key] == expected[key], key
    assert _files(output) == _files(reference)
    assert [p.name for p in output.rglob(".*")] == []  # no temporary file left behind

    written = os.path.getmtime(output / "manifest.json")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert os.path.getmtime(output / "manifest.json") == written
