"""The encode job on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster) losing nodes.

Each scenario runs tests/integration/cluster_encode.py in its own process (a Ray driver joins
one cluster only, and the other tests hold an embedded one): an undisturbed reference run, then
the same job losing a worker node (SIGKILL) after its first commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = os.path.join(os.path.dirname(__file__), "cluster_encode.py")


def _scenario(name: str, tmp_path, encoder: str) -> dict:
    proc = subprocess.run(
        [sys.executable, SCRIPT, name, str(tmp_path), encoder],
        capture_output=True,
        text=True,
        timeout=420,
    )
    result_file = tmp_path / "result.json"
    assert result_file.exists(), proc.stderr[-4000:]
    result = json.loads(result_file.read_text())
    assert "manifest" in result["reference"], (result, proc.stderr[-3000:])
    return {**result, "log": proc.stderr}


@pytest.mark.parametrize("scenario", ["replace", "gone"])
def test_lost_worker_node_the_job_finishes_in_the_same_run_byte_identical(
    tmp_path, tiny_encoder, scenario
):
    """A replacement node, or none (the survivor takes over): the same run finishes, with the
    bytes of an undisturbed run (every shard, rejects.jsonl, shards.jsonl, inputs.jsonl)."""
    result = _scenario(scenario, tmp_path, tiny_encoder)
    assert result["finished"] and "manifest" in result["disturbed"], result["disturbed"]
    assert result["killed_after_commits"] < 10, "the node was lost after the job had finished"
    assert result["disturbed"]["manifest"] == result["reference"]["manifest"] == 1500
    assert result["disturbed_files"] == result["reference_files"]


def test_all_encoder_nodes_lost_the_watchdog_ends_the_job_saying_why(tmp_path, tiny_encoder):
    result = _scenario("all", tmp_path, tiny_encoder)
    assert result["finished"], "the job hung"
    error = result["disturbed"].get("error", "")
    assert error.startswith(("EncodeStalledError", "EncodeIncompleteError")), result["disturbed"]
    assert "waiting for" in result["log"] and "input shard" in result["log"]
    assert result["disturbed"]["seconds"] < 20 + 60  # stall_timeout_s plus start-up
