"""Ray Train on a simulated multi-node cluster losing a node (tests/integration/cluster_train.py):
a fixed-size run resumes on a replacement node; an elastic run goes on with one worker at the
global batch and learning rate of one worker."""

from __future__ import annotations

import os

import pytest

from tests.proctools import run_cluster_script

pytestmark = pytest.mark.slow

CLUSTER_SCRIPT = os.path.join(os.path.dirname(__file__), "cluster_train.py")


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory, tiny_shards) -> dict:
    """Both cluster scenarios in one subprocess (one cluster start): fixed, then elastic."""
    workdir = tmp_path_factory.mktemp("cluster_train")
    return run_cluster_script(CLUSTER_SCRIPT, workdir, tiny_shards, "fixed", "elastic", timeout=600)


def test_lost_node_fixed_size_run_resumes_on_a_replacement_node(cluster_runs):
    run = cluster_runs["fixed"]
    assert run["finished"] and "checkpoint" in run, run.get("error")
    assert run["final_step"] == cluster_runs["steps"]
    records = run["metrics"]
    resumed = [r for r in records if "resumed_from" in r]
    assert len(resumed) == 1 and 0 < resumed[0]["resumed_from"] < cluster_runs["steps"]
    assert {r["world_size"] for r in records} == {2}


def test_lost_node_elastic_run_goes_on_smaller_with_scaled_lr(cluster_runs):
    run = cluster_runs["elastic"]
    assert run["finished"] and "checkpoint" in run, run.get("error")
    assert run["final_step"] == cluster_runs["steps"]
    records = run["metrics"]
    before, after = records[0], records[-1]
    assert (before["world_size"], after["world_size"]) == (2, 1)
    assert after["global_batch"] == before["global_batch"] // 2
    assert after["lr"] == pytest.approx(before["lr"] / 2)  # lr_scaling=linear
    resumed = next(r for r in records if "resumed_from" in r)
    assert resumed["world_size"] == 1  # the first record after the restart is already smaller
    assert "world size 1 (elastic 1..2): global batch" in cluster_runs["log"]
