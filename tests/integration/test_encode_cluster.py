"""The encode job on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster) losing nodes.

All scenarios run in one process of tests/integration/cluster_encode.py (a Ray driver joins one
cluster only, and the other tests hold an embedded one) on one cluster: an undisturbed
reference run, then the same job losing worker nodes (SIGKILL) after its first commit, once
per scenario.
"""

from __future__ import annotations

import os

import pytest

from tests.proctools import run_cluster_script

pytestmark = pytest.mark.slow

SCRIPT = os.path.join(os.path.dirname(__file__), "cluster_encode.py")
SCENARIOS = ["replace", "gone", "all"]  # "all" leaves no worker node: last


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_encoder) -> dict:
    workdir = tmp_path_factory.mktemp("cluster_encode")
    result = run_cluster_script(SCRIPT, workdir, tiny_encoder, *SCENARIOS, timeout=900)
    assert "manifest" in result["reference"], (result, result["log"][-3000:])
    return result


def _scenario_log(runs: dict, name: str) -> str:
    """The part of the script's log written during scenario `name`."""
    log = runs["log"]
    start = log.index(f"scenario {name}")
    later = [log.find(f"scenario {other}", start) for other in SCENARIOS if other != name]
    return log[start : min([i for i in later if i > start], default=len(log))]


@pytest.mark.parametrize("scenario", ["replace", "gone"])
def test_lost_worker_node_the_job_finishes_in_the_same_run_byte_identical(runs, scenario):
    """A replacement node, or none (the survivor takes over): the same run finishes, with the
    bytes of an undisturbed run (every shard, rejects.jsonl, shards.jsonl, inputs.jsonl)."""
    result = runs[scenario]
    assert result["finished"] and "manifest" in result["disturbed"], result["disturbed"]
    assert result["killed_after_commits"] < 10, "the node was lost after the job had finished"
    assert result["disturbed"]["manifest"] == runs["reference"]["manifest"] == 1500
    assert result["disturbed_files"] == runs["reference_files"]


def test_all_encoder_nodes_lost_the_watchdog_ends_the_job_saying_why(runs):
    result = runs["all"]
    assert result["finished"], "the job hung"
    error = result["disturbed"].get("error", "")
    assert error.startswith(("EncodeStalledError", "EncodeIncompleteError")), result["disturbed"]
    log = _scenario_log(runs, "all")
    assert "waiting for" in log and "input shard" in log
    assert result["disturbed"]["seconds"] < 20 + 60  # stall_timeout_s plus start-up
