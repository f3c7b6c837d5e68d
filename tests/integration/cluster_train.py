"""Ray Train on a simulated multi-node cluster losing a node (run by test_train_lost_nodes.py).

    python tests/integration/cluster_train.py WORKDIR SHARDS SCENARIO [SCENARIO ...]

A head without CPUs (the driver and Ray Train's controller, which Ray pins to the driver's
node) and two worker nodes of one CPU each, so each of the two DDP workers runs on its own
node. Each scenario trains a tiny model and, after its first checkpoint, removes one worker
node (SIGKILL, as a machine failure):
  fixed    num_workers=2, max_failures=1; a replacement node joins: the run resumes on it;
  elastic  min_workers=1, num_workers=2, lr_scaling=linear; no replacement: the run goes on
           with one worker at half the global batch and half the learning rate.
Scenarios run one after the other on the same cluster (fixed first leaves two nodes up).
Writes WORKDIR/result.json. Runs in its own process: a Ray driver connects to one cluster only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.conftest import TINY_TRAIN  # noqa: E402
from tests.integration.cluster_encode import FAST_DETECTION  # noqa: E402

STEPS = 20
SCENARIOS = {
    "fixed": ["train.max_failures=1"],
    # A shorter wait than 60 s: the restart after the lost node times out sooner, goes smaller.
    "elastic": [
        "train.max_failures=1",
        "train.min_workers=1",
        "train.lr_scaling=linear",
        "train.resource_wait_s=15",
    ],
}


def train_in_thread(cfg) -> tuple[threading.Thread, dict]:
    from pipeline.train.run import train

    outcome: dict = {}

    def run() -> None:
        start = time.monotonic()
        try:
            outcome["checkpoint"] = train(cfg)["checkpoint"]
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcome["error"] = f"{type(e).__name__}: {e}"
        outcome["seconds"] = round(time.monotonic() - start, 1)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_first_checkpoint(run: str, thread: threading.Thread) -> None:
    while thread.is_alive() and not (
        os.path.isdir(run) and any(n.startswith("checkpoint_") for n in os.listdir(run))
    ):
        time.sleep(0.2)


def scenario(cluster, nodes: list, name: str, workdir: str, shards: str) -> dict:
    from pipeline.config import load_config
    from pipeline.train.checkpoint import read_state
    from pipeline.train.config import TrainRunConfig

    overrides = [
        f"data.shards={shards}",
        *TINY_TRAIN,
        f"train.storage_path={workdir}/runs",
        f"train.run_name={name}",
        f"train.steps={STEPS}",
        "train.num_workers=2",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "train.eval_images=0",
        *SCENARIOS[name],
    ]
    cfg = load_config(TrainRunConfig, None, overrides)
    run = f"{workdir}/runs/{name}"
    thread, outcome = train_in_thread(cfg)
    wait_first_checkpoint(run, thread)
    cluster.remove_node(nodes.pop(0), allow_graceful=False)
    if name == "fixed":
        nodes.append(cluster.add_node(num_cpus=1))  # must be called from the main thread
    thread.join(timeout=300)
    outcome["finished"] = not thread.is_alive()
    if "checkpoint" in outcome:
        outcome["final_step"] = read_state(outcome["checkpoint"])["step"]
    outcome["metrics"] = read_metrics(run)
    return outcome


def read_metrics(run: str) -> list[dict]:
    """The run's metrics.jsonl; none when the run ended before its first log line (the test
    then reports the run's error instead of a missing file)."""
    if not os.path.exists(f"{run}/metrics.jsonl"):
        return []
    with open(f"{run}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def main(workdir: str, shards: str, names: list[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": FAST_DETECTION,
        },
    )
    result: dict = {"steps": STEPS}
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        for name in names:
            try:
                result[name] = scenario(cluster, nodes, name, workdir, shards)
            except Exception as e:  # noqa: BLE001 - the test names the scenario and the error
                result[name] = {"finished": False, "error": f"{type(e).__name__}: {e}"}
    finally:
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
