"""Encode on a simulated multi-node Ray cluster while nodes vanish (run by test_encode_cluster.py).

    python tests/integration/cluster_encode.py WORKDIR ENCODER SCENARIO [SCENARIO ...]

A head without CPUs (the driver) and two worker nodes of one CPU each (one encoder actor
each) run the job once undisturbed (the reference), then once per SCENARIO, each time losing
worker nodes (SIGKILL) after the first unit commits:
  replace  one node is lost and comes back as a new node a few seconds later;
  gone     one node is lost for good: the survivor finishes the job;
  all      both worker nodes are lost for good: the stall watchdog must end the job.
Scenarios run one after the other on the same cluster, each starting with two worker nodes
(nodes are added back in between; "all" leaves none, so it goes last). Writes
WORKDIR/result.json. Runs in its own process: a Ray driver connects to one cluster only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# A killed node is seen as dead in ~5 s (Ray's default: ~15-25 s). Not fewer missed checks or a
# shorter timeout: on a loaded 2-core machine a live raylet can miss two 1-s checks in a row
# and would be declared dead, failing a run that had nothing wrong with it.
FAST_DETECTION = {
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 5,
    "health_check_timeout_ms": 3000,
}


def corpus(root: str, units: int = 10, per_unit: int = 150) -> str:
    from tests.latent_corpus import png_bytes, smooth_image, write_tar

    os.makedirs(root, exist_ok=True)
    for unit in range(units):
        samples = [
            (f"u{unit}_{i}", {"png": png_bytes(smooth_image(40, 48, unit * 1000 + i)), "txt": b"c"})
            for i in range(per_unit)
        ]
        if unit == 3:
            samples.append(("u0_1", samples[0][1]))  # a cross-shard duplicate
        write_tar(os.path.join(root, f"shard-{unit:06d}.tar"), samples)
    return root


def corpus_bytes(out: str) -> dict[str, str]:
    import hashlib

    names = sorted(n for n in os.listdir(out) if n.endswith((".tar", ".jsonl")))
    return {n: hashlib.sha256(open(os.path.join(out, n), "rb").read()).hexdigest() for n in names}


def encode_in_thread(cfg) -> tuple[threading.Thread, dict]:
    from pipeline.encode import encode_corpus

    outcome: dict = {}

    def run() -> None:
        start = time.monotonic()
        try:
            outcome["manifest"] = encode_corpus(cfg).samples
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcome["error"] = f"{type(e).__name__}: {e}"
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_first_commit(out: str, thread: threading.Thread) -> None:
    commits = os.path.join(out, "_encode", "commits")
    while thread.is_alive() and not (os.path.isdir(commits) and os.listdir(commits)):
        time.sleep(0.05)


def disturbed_run(cluster, workers: list, scenario: str, workdir: str, base: dict) -> dict:
    """The job losing nodes as `scenario` says; `workers` is updated to the nodes still up."""
    from pipeline.encode import EncodeConfig

    out = os.path.join(workdir, scenario)
    watchdog = {"stall_warn_s": 3.0, "stall_timeout_s": 20.0}
    cfg = EncodeConfig(output=out, **base, **(watchdog if scenario == "all" else {}))
    thread, outcome = encode_in_thread(cfg)
    wait_first_commit(out, thread)
    lost = list(workers) if scenario == "all" else workers[:1]
    for node in lost:
        cluster.remove_node(node, allow_graceful=False)
        workers.remove(node)
    result = {"killed_after_commits": len(os.listdir(os.path.join(out, "_encode", "commits")))}
    if scenario == "replace":
        time.sleep(3)
        workers.append(cluster.add_node(num_cpus=1))  # must be called from the main thread
    thread.join(timeout=240)
    result["disturbed"] = outcome
    result["finished"] = not thread.is_alive()
    if "manifest" in outcome:
        result["disturbed_files"] = corpus_bytes(out)
    return result


def main(workdir: str, encoder: str, scenarios: list[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.encode import EncodeConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    images = corpus(os.path.join(workdir, "images"))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": FAST_DETECTION,
        },
    )
    result: dict = {}
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        base = dict(input=images, encoder=encoder, num_actors=2, batch_size=16, progress_every_s=2)
        reference = EncodeConfig(output=os.path.join(workdir, "reference"), **base)
        thread, outcome = encode_in_thread(reference)
        thread.join()
        result["reference"] = outcome
        if "manifest" in outcome:
            result["reference_files"] = corpus_bytes(reference.output)
        for scenario in scenarios:
            while len(workers) < 2:
                workers.append(cluster.add_node(num_cpus=1))
            cluster.wait_for_nodes()
            logging.info("scenario %s", scenario)
            result[scenario] = disturbed_run(cluster, workers, scenario, workdir, base)
    finally:
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
