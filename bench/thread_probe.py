"""Does where the training loop runs cost CPU? Ray Train V2 runs the train function in a thread
of a Ray worker actor; (a) and (b) of bench/train.py run it in the bench's main thread.

    .venv/bin/python bench/thread_probe.py kl-f8-small bf16 main
    .venv/bin/python bench/thread_probe.py kl-f8-small bf16 thread
    .venv/bin/python bench/thread_probe.py kl-f8-small bf16 actor          # a 1-CPU Ray actor
    .venv/bin/python bench/thread_probe.py kl-f8-small bf16 actor-thread   # ... in a thread of it
    .venv/bin/python bench/thread_probe.py kl-f8-small bf16 beside-ray     # main, Ray idle beside
    .venv/bin/python bench/thread_probe.py kl-f8-small bf16 main,actor-thread --repeat 3

The loop is bench/train.py's (a), `plain_loop`, on the same (random) batches, one torch thread.
Each place runs in a fresh process (`actor`: its own embedded Ray, `ray.init(address="local",
num_cpus=2)`, and an actor of 1 CPU, as Ray Train places a worker); with several places and
`--repeat`, they alternate, so a VM's drifting per-core speed falls on all of them alike. Prints
one JSON line per run: steady images/s and, over the same steps, the process's CPU (user, sys)
and minor page faults per image, and what the process runs with (torch threads,
OMP_NUM_THREADS, nice, CPU affinity, LD_PRELOAD, threads).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as bench  # noqa: E402  (bench/train.py)

PLACES = ("main", "thread", "actor", "actor-thread", "beside-ray", "thread-beside-ray")


def measure(name: str, precision: str, steps: int, threads: int) -> dict:
    """bench/train.py's plain loop (a): steady images/s, CPU and page faults per image."""
    full = bench.MODES["full"][name]
    sizes = bench.Sizes(full.batch_size, steps, 2, 0)
    cfg = bench.run_config(name, sizes, "unused", Path("/tmp/latentpipe-thread-probe"))
    res = bench.WORKLOADS[name].resolution
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(sizes.batch_size, 3, res, res, generator=g) * 2 - 1 for _ in range(steps)]
    figures, _ = bench.plain_loop(cfg, batches, precision, sizes, threads)
    return {
        "img_s": figures["steady_images_per_s"],
        **{f"{k}_per_img": v for k, v in figures["rusage"].items()},  # the steady window
        "loss_last": figures["loss_last"],
        "process": process_facts(),
    }


def process_facts() -> dict:
    return {
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "nice": os.nice(0),
        "affinity": sorted(os.sched_getaffinity(0)),
        "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
        "threads_in_process": len(os.listdir("/proc/self/task")),
    }


def in_thread(fn, *args) -> dict:
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(fn(*args)))
    worker.start()
    worker.join()
    return out


def loop_in(place: str, *args) -> dict:
    """The loop in this thread, or in a new thread of this process for the `*thread*` places."""
    return in_thread(measure, *args) if "thread" in place.split("-") else measure(*args)


def with_ray(place: str, *args) -> dict:
    """In a 1-CPU actor (`actor`, `actor-thread`), or in this process beside an idle Ray
    cluster (`beside-ray`, `thread-beside-ray`: what Ray's own processes cost a loop that is
    not in Ray)."""
    import ray

    # Ray's workers inherit this process's environment: let them import bench/train.py too
    # (no runtime_env: Ray Train's workers in bench/train.py run without one).
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        if not place.startswith("actor"):
            return loop_in(place, *args)

        @ray.remote(num_cpus=1)
        class Probe:
            def run(self) -> dict:
                return loop_in(place, *args)

        return ray.get(Probe.remote().run.remote())
    finally:
        ray.shutdown()


def run_here(place: str, *args) -> dict:
    if place in ("main", "thread"):
        return loop_in(place, *args)
    return with_ray(place, *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(bench.WORKLOADS))
    parser.add_argument("precision", choices=["fp32", "bf16"])
    parser.add_argument("places", help=f"comma-separated, of {', '.join(PLACES)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    places = args.places.split(",")
    unknown = sorted(set(places) - set(PLACES))
    if unknown:
        parser.error(f"unknown place(s) {unknown}; choose from {', '.join(PLACES)}")
    if args.child:  # one place, in this fresh process
        out = run_here(places[0], args.workload, args.precision, args.steps, args.threads)
        print(json.dumps(out), flush=True)
        return
    for i in range(args.repeat):
        for place in places:
            cmd = [sys.executable, __file__, args.workload, args.precision, place, "--child"]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
            lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            line = {"run": i, "place": place, **json.loads(lines.strip().splitlines()[-1])}
            line["loadavg"] = bench.loadavg()
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
