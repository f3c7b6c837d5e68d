"""Does running the training loop in a thread cost CPU? Ray Train V2 runs the train function in
a thread of the worker actor; (a) and (b) of bench/train.py run it in the main thread.

    .venv/bin/python bench/thread_probe.py kl-f8-small bf16 main
    .venv/bin/python bench/thread_probe.py kl-f8-small bf16 thread

Same model, same (random) batches, one torch thread; prints images/s and CPU per image of the
steps after the first two.
"""

from __future__ import annotations

import argparse
import resource
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as bench  # noqa: E402  (bench/train.py)


def measure(name: str, precision: str, steps: int, threads: int) -> dict:
    sizes = bench.MODES["full"][name]
    cfg = bench.run_config(name, sizes, "unused", Path("/tmp/latentpipe-thread-probe"))
    res = bench.WORKLOADS[name].resolution
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(sizes.batch_size, 3, res, res, generator=g) * 2 - 1 for _ in range(steps)]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = bench.build_model(cfg.model)
    opt = bench.make_optimizer(model, cfg.train.lr, cfg.train.betas, cfg.train.weight_decay)
    step = bench.step_fn(cfg, precision)
    for i in range(2):
        step(model, batches[i], opt, i)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    for i in range(2, steps):
        step(model, batches[i], opt, i)
    t1, r1 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    n = (steps - 2) * sizes.batch_size
    return {
        "img_s": round(n / (t1 - t0), 2),
        "user_ms_per_img": round((r1.ru_utime - r0.ru_utime) / n * 1e3, 1),
        "sys_ms_per_img": round((r1.ru_stime - r0.ru_stime) / n * 1e3, 1),
        "minor_faults_per_img": round((r1.ru_minflt - r0.ru_minflt) / n),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(bench.WORKLOADS))
    parser.add_argument("precision", choices=["fp32", "bf16"])
    parser.add_argument("where", choices=["main", "thread"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    out: dict = {}

    def body() -> None:
        out.update(measure(args.workload, args.precision, args.steps, args.threads))

    if args.where == "main":
        body()
    else:
        worker = threading.Thread(target=body)
        worker.start()
        worker.join()
    print(args.workload, args.precision, args.where, out, flush=True)


if __name__ == "__main__":
    main()
