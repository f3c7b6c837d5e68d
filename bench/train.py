"""Training throughput: what do the trainer and Ray Train cost over a plain PyTorch loop?

    .venv/bin/python bench/train.py --quick       # smoke: 25 / 3 steps a variant, ~3-4 min
    .venv/bin/python bench/train.py               # full: 80 / 16 steps, ~7-10 min: report these
    .venv/bin/python bench/train.py --workloads kl-f4-tiny --precisions fp32

The same model on the same batches, five ways, per workload and precision, in one run:
  (a) plain loop: `build_model` + `make_optimizer` + the trainer's own `train_step` (fp32) or
      its `compute_loss` under `torch.autocast("cpu", dtype=torch.bfloat16)` followed by the
      same backward / clip / step (bf16), on batches pre-decoded by the trainer's own loader
      (rank 0 of 1) -- the limit, on `--threads` torch threads (default 1);
  (b) the trainer in this process: `pipeline.train.run.train` with `train.num_workers=0`,
      reading the tar shards through the real data loader (`data.num_workers` from the YAML:
      one loader process beside the training thread);
  (c) Ray Train with 1 worker (`train.num_workers=1`, `cpus_per_worker=--threads`);
  (d) plain PyTorch DDP: 2 processes (torch.multiprocessing spawn), gloo, 1 thread each, every
      rank on its own pre-decoded batches (the trainer's loader, rank r of 2), `train_step` on
      the DDP-wrapped model exactly as Ray's `prepare_model` wraps it on CPU;
  (e) Ray Train with 2 workers, 1 CPU each (`train.num_workers=2`).
Ratios b/a, c/a (a = the better of its block's two runs, before and after Ray) and e/d; targets
(issue 11) >= 0.9 each. bf16 in (b), (c), (e) passes `train.precision=bf16`, only when
`TrainConfig` has a `precision` field (else the row says "not available in this build").

Judged on the steady state: every variant runs the same `steps`, and throughput = images of
the steps after the first `log_every` / the time from step `log_every` to the last step. For
(a) and (d) the loop stamps every step; for (b), (c), (e) a thread beside `train` polls the
run's metrics.jsonl every 10 ms and stamps each record as it appears (one per `log_every`
steps). Start-up = time to the first finished step (for the trainer: the first record's time
less `log_every - 1` steps at the steady rate) and the whole call are reported apart. The
records' own `images_per_s` are kept as a cross-check.

Where the rest goes: the loader alone (the trainer's loader as configured, and in-process for
its CPU per image), the trainer's per-step bookkeeping (MetricMeter, metrics.jsonl writes),
checkpointing ((b) and (e) again with `train.checkpoint_every` small vs never: seconds per
checkpoint, and what that costs at the YAML's default interval), and the machine's CPU over
each steady window from /proc (ours: this process and everything it started; other: the rest
of a shared machine; a window with "other" well above 0 was disturbed).

Workloads: kl-f4-tiny at 64 px (configs/train/kl-f4-tiny.yaml, batch 16 as there) and
kl-f8-small at 128 px (configs/model/kl-f8-small.yaml layered on it; batch 2, since one 2-image
step takes seconds on a CPU core). Weights untrained and seeded (`train.seed`). Corpus: tiles of
the photos bundled with scikit-image and scikit-learn (`build_sample_corpus`, what
`latentpipe shards source=sample` writes; nothing is downloaded), 96 px tiles for 64 px and
160 px tiles for 128 px, so every image is decoded and resized.

Order: one block per workload and precision, its variants minutes apart (a 2-vCPU VM's
per-core speed drifts over a long run): (a), (d), (b) without Ray; embedded Ray started with
the trainer's own `init_ray(num_cpus=2)` (in the first block, one untimed 1-step Ray Train fit
whose workers report their torch thread counts); (c), (e); Ray shut down; (a) again.
Markdown tables go to stdout, everything to the JSON file (default
bench/results/train[-quick].json).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import platform
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from jobwatch import Snapshot, descendants  # bench/ (this script's directory)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

import pipeline.train.loop as trainer_loop
from pipeline.config import load_config
from pipeline.data.reader import make_loader
from pipeline.data.shards import ShardsConfig, build_sample_corpus
from pipeline.models import build_model
from pipeline.train.config import TrainConfig, TrainRunConfig, run_dir
from pipeline.train.step import compute_loss, make_optimizer, train_step

# Ray and the trainer's entry point are imported where used: the DDP processes of (d) re-import
# this module when spawned and, like a plain DDP script, need neither (~2 s and 140 MB each).

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
RAY_CPUS = 2  # the whole dev machine
SHARD_SAMPLES = 64  # tiles per tar shard: several shards, so ranks read whole shards
# checkpoint_every that never fires (the last step still checkpoints, after the window)
NEVER = 10**9
DEFAULT_TRAIN_YAML = "configs/train/kl-f4-tiny.yaml"


@dataclass(frozen=True)
class Workload:
    files: tuple[str, ...]  # train YAMLs, merged in order
    resolution: int
    tile: int  # corpus tile edge (resized to `resolution` by the loader)
    stride: int


@dataclass(frozen=True)
class Sizes:
    batch_size: int  # per rank
    steps: int  # every variant runs exactly this many optimiser steps
    log_every: int  # the first log_every steps are start-up; also train.log_every
    checkpoint_every: int  # 2 x log_every: the checkpoint-cost runs of (b), (e); 0 = none


WORKLOADS = {
    "kl-f4-tiny": Workload((DEFAULT_TRAIN_YAML,), 64, 96, 64),
    "kl-f8-small": Workload((DEFAULT_TRAIN_YAML, "configs/model/kl-f8-small.yaml"), 128, 160, 64),
}
# One core runs a 16-image kl-f4-tiny step in ~0.25 s (fp32, 55-75 img/s) and a 2-image
# kl-f8-small step at 128 px in ~1.3 s: full mode's steady windows (70 and 14 steps) last
# ~18 s each per variant; quick mode's (20 and 2 steps) only check that everything runs.
MODES = {
    "quick": {"kl-f4-tiny": Sizes(16, 25, 5, 10), "kl-f8-small": Sizes(2, 3, 1, 0)},
    "full": {"kl-f4-tiny": Sizes(16, 80, 10, 20), "kl-f8-small": Sizes(2, 16, 2, 0)},
}
LOADER_MIN_S = {"quick": 2.0, "full": 5.0}
NOT_AVAILABLE = "not available in this build (TrainConfig has no `precision` field)"


def now() -> float:
    """CLOCK_MONOTONIC: one clock for this process, its DDP children and the Ray workers."""
    return time.monotonic()


# -- configs and batches ----------------------------------------------------------------------


def precision_in_trainer() -> bool:
    return "precision" in {f.name for f in dataclasses.fields(TrainConfig)}


def run_config(name: str, sizes: Sizes, shards: str, work: Path, **train_keys) -> TrainRunConfig:
    """The workload's YAMLs with the bench's overrides (every variant's config comes from here)."""
    w = WORKLOADS[name]
    keys = {
        "data.shards": shards,
        "data.resolution": w.resolution,
        "data.batch_size": sizes.batch_size,
        "train.storage_path": str(work / "runs"),
        "train.steps": sizes.steps,
        "train.log_every": sizes.log_every,
        "train.checkpoint_every": NEVER,
        "train.eval_images": 0,
        "train.seed": SEED,
    }
    keys |= {f"train.{k}": v for k, v in train_keys.items()}
    files = [str(ROOT / f) for f in w.files]
    return load_config(TrainRunConfig, files, [f"{k}={v}" for k, v in keys.items()])


def loop_uses_stream() -> bool:
    """Whether `run_loop` reads through the resumable stream (pipeline/data/stream.py, issue
    11) rather than the shard reader: read from its source, whichever way it imports it."""
    return "make_train_loader" in inspect.getsource(trainer_loop)


def trainer_loader(cfg, rank: int, world_size: int):
    """The loader `run_loop` uses, so (a) and (d) get exactly the batches the trainer reads."""
    if loop_uses_stream():
        from pipeline.data.stream import make_train_loader

        return make_train_loader(cfg, rank, world_size)
    return make_loader(cfg, rank, world_size, repeat=True, epoch=0)


def images_of(batch) -> torch.Tensor:
    """The image tensor of a loader batch (a tensor, an (images, labels) pair or a dict)."""
    if isinstance(batch, dict):
        return batch["images"]
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def predecode(cfg, rank: int, world_size: int, count: int, min_s: float = 0.0) -> tuple:
    """The first `count` batches of the rank's loader, as tensors; keeps reading (and timing)
    until `min_s` have passed, so the same pass times the loader alone."""
    batches, images, first = [], 0, None
    started, cpu = now(), time.process_time()
    for batch in trainer_loader(cfg.data, rank, world_size):
        x = images_of(batch)
        if first is None:
            first, steady_from, images = now() - started, now(), 0
        else:
            images += len(x)
        if len(batches) < count:
            batches.append(x.clone())
        if len(batches) >= count and now() - started >= min_s and images:
            break
    seconds = now() - steady_from
    timing = {
        "num_workers": cfg.data.num_workers,
        "first_batch_s": round(first, 3),
        "images_after_first": images,
        "images_per_s": round(images / seconds, 1),
        # CPU of this process only: the decoding itself when num_workers=0
        "core_ms_per_image": round(
            (time.process_time() - cpu) / (images + len(batches[0])) * 1e3, 3
        ),
    }
    return batches, timing


def step_fn(cfg: TrainRunConfig, precision: str):
    """One optimiser step as the trainer computes it: `train_step` itself for fp32; for bf16
    the same sequence with the forward pass and loss under CPU autocast."""
    if precision == "fp32":
        return lambda model, x, opt, step: train_step(
            model, x, opt, cfg.loss, cfg.train.grad_clip, None, step
        )

    def bf16_step(model, x, opt, step):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms, _ = compute_loss(model, x, None, cfg.loss, step)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        return {k: v.detach() for k, v in terms.items()}

    return bf16_step


def train_flops(cfg: TrainRunConfig, resolution: int) -> int:
    """FLOPs of one training image: forward + loss + backward (FlopCounterMode, 2 per MAC)."""
    torch.manual_seed(SEED)
    model = build_model(cfg.model)
    x = torch.zeros(1, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter:
        terms, _ = compute_loss(model, x, None, cfg.loss, 0)
        terms["loss"].backward()
    return int(counter.get_total_flops())


# -- steady state and CPU ---------------------------------------------------------------------


def cpu_window(a: Snapshot, b: Snapshot, root: int) -> dict:
    """Cores used between two snapshots: ours (`root` and its descendants: this bench, its DDP
    children, loader processes, our Ray cluster), other (the rest of the machine), idle."""
    ours_pids = descendants(b.procs, str(root))
    ours, roles, ray_procs = 0.0, dict.fromkeys(ROLES, 0.0), {}
    for pid in ours_pids:
        cmd, cpu, _ = b.procs[pid]
        before = a.procs.get(pid)
        if before is not None and before[0] != cmd and not cmd.startswith("ray::"):
            before = None  # the pid was reused (Ray workers retitle themselves: not that)
        used = cpu - (before[1] if before else 0.0)
        ours += used
        role = process_role(pid, b.procs, root)
        roles[role] += used
        if role == "ray":
            ray_procs[cmd[:90]] = ray_procs.get(cmd[:90], 0.0) + used
    busy, idle, wall = b.busy - a.busy, b.idle - a.idle, b.at - a.at
    return {
        "wall_s": round(wall, 2),
        "ours": round(ours / wall, 3),
        "other": round(max(busy - ours, 0.0) / wall, 3),
        "idle": round(idle / wall, 3),
        "ours_core_s": round(ours, 2),
        "ours_by_role": {role: round(used / wall, 3) for role, used in roles.items()},
        # Ray's own processes using the most, by command line: what its share is spent on
        "ray_top": [
            [cmd, round(used / wall, 3)]
            for cmd, used in sorted(ray_procs.items(), key=lambda kv: -kv[1])[:6]
            if used > 0
        ],
    }


# Where our cores go: the training processes (Ray Train workers, DDP ranks, or this bench in
# (a)/(b)), their data-loader processes, Ray's own processes (GCS, raylet, dashboard and its
# agents, Train's controller, idle workers), and this bench's process when it does not train.
ROLES = ("train", "loader", "ray", "bench")
TRAIN_MARK = "ray::RayTrainWorker"


def process_role(pid: str, procs: dict, root: int) -> str:
    """The role of one of our processes (loader workers are forked: they carry their parent's
    command line, a Ray Train worker's retitled one included; DDP ranks are spawned)."""
    cmd, _, parent = procs[pid]
    parent_cmd = procs.get(parent, ("", 0.0, ""))[0]
    if int(pid) == root:
        return "bench"
    if cmd.startswith(TRAIN_MARK):
        return "loader" if parent_cmd.startswith(TRAIN_MARK) else "train"
    if int(parent) == root and "spawn_main" in cmd:
        return "train"  # a DDP rank of (d)
    if cmd == parent_cmd:
        return "loader"  # forked by the bench in (b) or by a DDP rank
    return "ray"


def steady(marks: dict[int, float], t0: float, end: float, sizes: Sizes, world: int) -> dict:
    """Figures from the times at which steps finished (`marks`: step -> time)."""
    first, last = sizes.log_every, sizes.steps
    if first not in marks or last not in marks:
        raise RuntimeError(f"no time for step {first} or {last}: {sorted(marks)}")
    window = marks[last] - marks[first]
    step_s = window / (last - first)
    images = (last - first) * sizes.batch_size * world
    return {
        "steady_images": images,
        "steady_s": round(window, 3),
        "steady_images_per_s": round(images / window, 2),
        "step_s": round(step_s, 4),
        # 1st step done: measured when stamped, else the 1st record less its other steps
        "first_step_s": round(
            (marks[1] if 1 in marks else marks[first] - (first - 1) * step_s) - t0, 2
        ),
        "first_step_measured": 1 in marks,
        "whole_s": round(end - t0, 2),
        "after_last_step_s": round(end - marks[last], 2),
        "marks_s": {k: round(t - t0, 3) for k, t in sorted(marks.items())},  # since the call
    }


class MetricsWatch(threading.Thread):
    """Stamps each metrics.jsonl record as it appears; CPU snapshots at two steps."""

    def __init__(self, path: Path, snapshot_steps: tuple[int, int]):
        super().__init__(daemon=True)
        self.path, self.snapshot_steps = path, snapshot_steps
        self.marks: dict[int, float] = {}
        self.records: list[dict] = []
        self.snapshots: list[Snapshot] = []
        self.done = threading.Event()

    def run(self) -> None:
        offset, pending = 0, b""
        while not self.done.is_set():
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            seen = now()
            offset += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._record(json.loads(line), seen)
            self.done.wait(0.01)

    def _record(self, record: dict, seen: float) -> None:
        if "eval" in record or "step" not in record:
            return
        self.marks.setdefault(record["step"], seen)
        self.records.append(record)
        if record["step"] in self.snapshot_steps:
            self.snapshots.append(Snapshot.take())

    def __enter__(self) -> MetricsWatch:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.05)  # the last line, if written just now
        self.done.set()
        self.join()


def reported_rate(records: list[dict], sizes: Sizes, world: int) -> float | None:
    """The trainer's own images/s over the records after the first (its interval timers)."""
    later = [r for r in records if sizes.log_every < r["step"] <= sizes.steps]
    images = sizes.log_every * sizes.batch_size * world * len(later)
    seconds = sum(sizes.log_every * sizes.batch_size * world / r["images_per_s"] for r in later)
    return round(images / seconds, 2) if seconds else None


# -- (a) plain loop ---------------------------------------------------------------------------


def plain_loop(cfg: TrainRunConfig, batches: list, precision: str, sizes: Sizes, threads: int):
    """(a): returns the figures and the last step's loss terms."""
    torch.set_num_threads(threads)
    t0 = now()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.betas, cfg.train.weight_decay)
    step = step_fn(cfg, precision)
    marks, snaps, usage, terms = {}, [], [], {}
    for i, x in enumerate(batches[: sizes.steps], start=1):
        terms = step(model, x, optimizer, i - 1)
        marks[i] = now()
        if i in (sizes.log_every, sizes.steps):
            snaps.append(Snapshot.take())
            usage.append(resource.getrusage(resource.RUSAGE_SELF))
    figures = steady(marks, t0, now(), sizes, 1)
    figures["cpu"] = cpu_window(*snaps, os.getpid())
    figures["rusage"] = usage_per_image(*usage, figures["steady_images"])
    figures["loss_last"] = round(float(terms["loss"]), 5)
    return figures | {"loadavg": loadavg()}, terms


def usage_per_image(a, b, images: int) -> dict:
    """This process's CPU (user, sys) and minor page faults per image between two rusages."""
    return {
        "user_ms": round((b.ru_utime - a.ru_utime) / images * 1e3, 1),
        "sys_ms": round((b.ru_stime - a.ru_stime) / images * 1e3, 1),
        "minor_faults": round((b.ru_minflt - a.ru_minflt) / images),
    }


# -- (d) plain DDP ----------------------------------------------------------------------------


def ddp_worker(rank: int, spec: dict) -> None:
    """One rank of (d); rank 0 writes the figures to spec["out"]."""
    torch.set_num_threads(1)
    cfg, sizes = spec["cfg"], spec["sizes"]
    decode_started = now()
    batches, _ = predecode(cfg, rank, 2, sizes.steps)
    decode_s = now() - decode_started
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank, world_size=2
    )
    try:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        optimizer = make_optimizer(model, cfg.train.lr, cfg.train.betas, cfg.train.weight_decay)
        wrapped = DistributedDataParallel(model)  # what ray.train.torch.prepare_model does on CPU
        step = step_fn(cfg, spec["precision"])
        marks, snaps = {}, []
        for i, x in enumerate(batches, start=1):
            step(wrapped, x, optimizer, i - 1)
            marks[i] = now()
            if rank == 0 and i in (sizes.log_every, sizes.steps):
                snaps.append(Snapshot.take())
        dist.barrier()
        if rank == 0:
            # Start-up counts from the spawn call, less this rank's pre-decoding (not DDP's cost).
            figures = steady(marks, spec["t0"] + decode_s, now(), sizes, 2)
            figures["cpu"] = cpu_window(*snaps, spec["root"])
            figures["predecode_s"] = round(decode_s, 2)
            figures["torch_threads"] = torch.get_num_threads()
            Path(spec["out"]).write_text(json.dumps(figures))
    finally:
        dist.destroy_process_group()


def plain_ddp(cfg: TrainRunConfig, precision: str, sizes: Sizes, work: Path) -> dict:
    """(d): 2 spawned processes, gloo over 127.0.0.1 on a free port."""
    out = work / f"ddp-{os.getpid()}-{time.monotonic_ns()}.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {
        "cfg": cfg,
        "sizes": sizes,
        "precision": precision,
        "port": port,
        "out": str(out),
        "root": os.getpid(),
        "t0": now(),
    }
    mp.start_processes(ddp_worker, args=(spec,), nprocs=2, start_method="spawn")
    return json.loads(out.read_text()) | {"loadavg": loadavg()}


# -- (b), (c), (e) the trainer ----------------------------------------------------------------


def trainer_run(cfg: TrainRunConfig, sizes: Sizes, world: int) -> dict:
    """One `train(cfg)` call in a fresh run directory, stamped from its metrics.jsonl."""
    from pipeline.train.run import train

    directory = Path(run_dir(cfg.train))
    shutil.rmtree(directory, ignore_errors=True)  # the same run name would resume
    watch = MetricsWatch(directory / "metrics.jsonl", (sizes.log_every, sizes.steps))
    with watch:
        t0 = now()
        result = train(cfg)
        end = now()
    figures = steady(watch.marks, t0, end, sizes, world)
    if len(watch.snapshots) == 2:
        figures["cpu"] = cpu_window(*watch.snapshots, os.getpid())
    figures["trainer_reported_images_per_s"] = reported_rate(watch.records, sizes, world)
    figures["loss_last"] = (result.get("metrics") or {}).get("loss")
    shutil.rmtree(directory, ignore_errors=True)
    return figures | {"loadavg": loadavg()}


def trainer_variant(name, sizes, shards, work, precision, workers, cpus, ckpt=NEVER) -> dict:
    if precision != "fp32" and not precision_in_trainer():
        return {"status": NOT_AVAILABLE}
    keys = {"num_workers": workers, "cpus_per_worker": cpus, "checkpoint_every": ckpt}
    keys["run_name"] = f"bench-{name}-{precision}-w{workers}-c{ckpt}"
    if precision_in_trainer():
        keys["precision"] = precision
    cfg = run_config(name, sizes, shards, work, **keys)
    print(f"[{name} {precision}] trainer, num_workers={workers} ... load {loadavg()}", flush=True)
    return trainer_run(cfg, sizes, max(workers, 1))


def checkpoint_cost(base: dict, probe: dict, sizes: Sizes, default_every: int) -> dict:
    """Seconds per checkpoint. Paired, within the probe run (checkpoint_every = 2 x
    log_every): log intervals that begin with a checkpoint vs those that do not, neighbours in
    time, so a shared machine's drifting load cancels out better than across runs; also the
    probe's whole window vs the run without checkpoints."""
    every, log = sizes.checkpoint_every, sizes.log_every
    marks = {int(k): t for k, t in probe["marks_s"].items()}
    starts = range(log, sizes.steps, log)
    span = {k: marks[k + log] - marks[k] for k in starts}
    with_ckpt = [span[k] for k in starts if k % every == 0]
    without = [span[k] for k in starts if k % every]
    paired = sum(with_ckpt) / len(with_ckpt) - sum(without) / len(without)
    across = (probe["steady_s"] - base["steady_s"]) / len(with_ckpt)
    return {
        "checkpoint_every": every,
        "checkpoints_in_window": len(with_ckpt),
        "intervals_with_without_s": [
            [round(x, 3) for x in with_ckpt],
            [round(x, 3) for x in without],
        ],
        "s_per_checkpoint": round(paired, 3),
        "s_per_checkpoint_across_runs": round(across, 3),
        "default_checkpoint_every": default_every,
        "share_at_default": round(paired / (default_every * base["step_s"] + paired), 4),
    }


def thread_probe(config: dict) -> None:
    """Ray Train worker function: which torch thread count does a worker get?"""
    import ray.train

    ctx = ray.train.get_context()
    line = {"rank": ctx.get_world_rank(), "torch_threads": torch.get_num_threads()}
    line["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    Path(config["dir"], f"rank{line['rank']}.json").write_text(json.dumps(line))
    ray.train.report({"done": 1})


def probe_ray_workers(work: Path, workers: int, cpus: int) -> dict:
    """An untimed 1-report fit, also a warm-up (the first fit imports libraries in workers)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = work / f"probe-{workers}x{cpus}"
    out.mkdir(parents=True, exist_ok=True)
    started = now()
    TorchTrainer(
        thread_probe,
        train_loop_config={"dir": str(out)},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"probe-{workers}x{cpus}", storage_path=str(work / "runs")),
    ).fit()
    lines = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {
        "workers": workers,
        "cpus_per_worker": cpus,
        "seconds": round(now() - started, 1),
        "ranks": lines,
    }


# -- where the rest goes ----------------------------------------------------------------------


def bookkeeping_cost(terms: dict, batch_size: int, directory: Path, repeats: int = 200) -> dict:
    """The loop's per-step metric accumulation and per-record work (means, metrics.jsonl)."""
    try:
        meter = trainer_loop.MetricMeter()
        started = now()
        for _ in range(repeats):
            meter.add(terms, batch_size)
        add = (now() - started) / repeats
        started = now()
        for _ in range(repeats):
            means = meter.means()
        mean = (now() - started) / repeats
        directory.mkdir(parents=True, exist_ok=True)
        metrics = trainer_loop.MetricsLog(str(directory))
        record = {"step": 1, **means, "images_per_s": 1.0}
        started = now()
        for _ in range(repeats):
            metrics.write(record)
        write = (now() - started) / repeats
    except (AttributeError, TypeError) as err:  # the loop's API changed under the bench
        return {"error": f"{type(err).__name__}: {err}"}
    return {"add_us_per_step": round(add * 1e6, 1), "record_us": round((mean + write) * 1e6, 1)}


# -- one workload -----------------------------------------------------------------------------


def prepare(name: str, sizes: Sizes, work: Path, mode: str) -> dict:
    """Corpus, config, pre-decoded batches and the loader-alone timings (nothing else timed)."""
    w = WORKLOADS[name]
    corpus = build_sample_corpus(
        ShardsConfig(
            source="sample",
            output=str(work / f"corpus-{w.tile}"),
            tile_size=w.tile,
            tile_stride=w.stride,
            samples_per_shard=SHARD_SAMPLES,
        )
    )
    shards = corpus["train"]
    cfg = run_config(name, sizes, shards, work)
    print(f"[{name}] loader alone ... load {loadavg()}", flush=True)
    batches, loader = predecode(cfg, 0, 1, sizes.steps, LOADER_MIN_S[mode])
    in_process = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))
    _, decode = predecode(in_process, 0, 1, 1, LOADER_MIN_S[mode])
    info = {
        "workload": name,
        "files": list(w.files),
        "resolution": w.resolution,
        "sizes": asdict(sizes),
        "model": {
            k: getattr(cfg.model, k)
            for k in ("kind", "ch", "ch_mult", "num_res_blocks", "attention")
        },
        "params": sum(p.numel() for p in build_model(cfg.model).parameters()),
        "train_flops_per_image": train_flops(cfg, w.resolution),
        "corpus": {"tile": w.tile, "stride": w.stride, "train_tiles": corpus["train_samples"]},
        "yaml_checkpoint_every": run_config_default(name, shards, "checkpoint_every"),
        "yaml_log_every": run_config_default(name, shards, "log_every"),
    }
    return {
        "info": info,
        "cfg": cfg,
        "shards": shards,
        "batches": batches,
        "loader": {"configured": loader, "in_process": decode},
    }


def run_config_default(name: str, shards: str, key: str):
    """A train key as the workload's YAMLs set it (the bench overrides some)."""
    files = [str(ROOT / f) for f in WORKLOADS[name].files]
    return getattr(load_config(TrainRunConfig, files, [f"data.shards={shards}"]).train, key)


def phase_plain(p: dict, precisions, threads: int, work: Path, rows: dict) -> None:
    """(a) first run, (d), (b) and its checkpoint probe: everything without Ray running."""
    name, cfg, sizes = p["info"]["workload"], p["cfg"], Sizes(**p["info"]["sizes"])
    for precision in precisions:
        row = rows.setdefault(precision, {})
        print(f"[{name} {precision}] (a) plain loop ... load {loadavg()}", flush=True)
        row["a"], terms = plain_loop(cfg, p["batches"], precision, sizes, threads)
        if precision == "fp32":
            p["bookkeeping"] = bookkeeping_cost(terms, sizes.batch_size, work / "bookkeeping")
        print(f"[{name} {precision}] (d) plain DDP x2 ... load {loadavg()}", flush=True)
        row["d"] = plain_ddp(cfg, precision, sizes, work)
        row["b"] = trainer_variant(name, sizes, p["shards"], work, precision, 0, threads)
        if sizes.checkpoint_every and precision == "fp32":
            row["b_ckpt"] = trainer_variant(
                name, sizes, p["shards"], work, "fp32", 0, threads, sizes.checkpoint_every
            )


def phase_ray(p: dict, precisions, threads: int, work: Path, rows: dict) -> None:
    name, sizes = p["info"]["workload"], Sizes(**p["info"]["sizes"])
    for precision in precisions:
        rows[precision]["c"] = trainer_variant(
            name, sizes, p["shards"], work, precision, 1, threads
        )
        rows[precision]["e"] = trainer_variant(name, sizes, p["shards"], work, precision, 2, 1)
        if sizes.checkpoint_every and precision == "fp32":
            rows["fp32"]["e_ckpt"] = trainer_variant(
                name, sizes, p["shards"], work, "fp32", 2, 1, sizes.checkpoint_every
            )


def phase_again(p: dict, precisions, threads: int, rows: dict) -> None:
    """(a) again after the Ray runs, Ray shut down: (a) is the limit, so its best counts."""
    name, sizes = p["info"]["workload"], Sizes(**p["info"]["sizes"])
    for precision in precisions:
        print(f"[{name} {precision}] (a) plain loop again ... load {loadavg()}", flush=True)
        rows[precision]["a_again"] = plain_loop(p["cfg"], p["batches"], precision, sizes, threads)[
            0
        ]


def ratio(x: dict, y: dict) -> float | None:
    if "steady_images_per_s" not in x or "steady_images_per_s" not in y:
        return None
    return round(x["steady_images_per_s"] / y["steady_images_per_s"], 3)


def workload_result(p: dict, rows: dict) -> dict:
    sizes = Sizes(**p["info"]["sizes"])
    out = {"info": p["info"], "loader": p["loader"], "bookkeeping": p.get("bookkeeping")}
    for row in rows.values():
        best = max(row["a"], row["a_again"], key=lambda r: r["steady_images_per_s"])
        row["best_a_images_per_s"] = best["steady_images_per_s"]
        row["ratios"] = {
            "b_over_a": ratio(row["b"], best),
            "c_over_a": ratio(row["c"], best),
            "e_over_d": ratio(row["e"], row["d"]),
            "d_over_a": ratio(row["d"], best),
        }
        # Data loading: (a)'s CPU per image vs decoding's; on 2 cores with 2 ranks and their
        # loader processes, decoding takes this share of the CPU the images need.
        decode_ms = p["loader"]["in_process"]["core_ms_per_image"]
        step_ms = row["a"]["cpu"]["ours_core_s"] / row["a"]["steady_images"] * 1e3
        row["decode_share_of_cpu"] = round(decode_ms / (decode_ms + step_ms), 4)
        for probe in ("b", "e"):
            if f"{probe}_ckpt" in row and "steady_s" in row[probe]:
                default = p["info"]["yaml_checkpoint_every"]
                row[f"checkpoint_{probe}"] = checkpoint_cost(
                    row[probe], row[f"{probe}_ckpt"], sizes, default
                )
    out["precisions"] = rows
    return out


# -- report -----------------------------------------------------------------------------------


def _rate(r: dict | None) -> str:
    if not r:
        return "-"
    return f"{r['steady_images_per_s']:.2f}" if "steady_images_per_s" in r else "n/a"


def _num(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(result: dict) -> str:
    m, code = result["machine"], result["code"]
    probe = "; ".join(
        f"{p['workers']} x {p['cpus_per_worker']} CPU: torch threads "
        f"{[r['torch_threads'] for r in p['ranks']]}"
        for p in result["ray_thread_probe"]
    )
    lines = [
        f"{result['mode']} mode, {result['date']}, {m['cpu']} ({m['cores']} cores), "
        f"{m['threads']} thread(s) for (a)/(b)/(c), 1 per process for (d)/(e); load average "
        f"{m['loadavg_start']} at start, {m['loadavg_end']} at end; code {code['commit']}"
        f"{' (pipeline/ with uncommitted changes)' if code['pipeline_dirty'] else ''}",
        f"Ray start-up {result['ray_init_s']} s (not timed in any variant); Ray Train workers "
        f"({probe}); trainer loader: {result['trainer_loader']}; train.precision in the "
        f"trainer: {result['precision_in_trainer']}",
        "",
        "| workload | px | batch | precision | (a) plain img/s, before / after | (b) trainer "
        "1 proc | **b / a** | (c) Ray 1 worker | **c / a** | (d) DDP 2 proc | (e) Ray 2 workers "
        "| **e / d** | d / a |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in result["workloads"]:
        info = w["info"]
        for precision, r in w["precisions"].items():
            q = r["ratios"]
            lines.append(
                f"| {info['workload']} | {info['resolution']} | {info['sizes']['batch_size']} "
                f"| {precision} | {_rate(r['a'])} / {_rate(r['a_again'])} | {_rate(r['b'])} "
                f"| **{_num(q['b_over_a'])}** | {_rate(r['c'])} | **{_num(q['c_over_a'])}** "
                f"| {_rate(r['d'])} | {_rate(r['e'])} | **{_num(q['e_over_d'])}** "
                f"| {_num(q['d_over_a'])} |"
            )
    lines += [
        "",
        "Start-up (s to the first finished step) / whole call (s), and other users' cores in "
        "the steady window:",
        "",
        "| workload | precision | steps (window) | (a) | (b) | (c) | (d) | (e) "
        "| other cores a / b / c / d / e |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in result["workloads"]:
        s = w["info"]["sizes"]
        for precision, r in w["precisions"].items():
            cells = []
            for k in "abcde":
                v = r[k]
                cells.append(
                    f"{v['first_step_s']:.1f} / {v['whole_s']:.1f}" if "whole_s" in v else "n/a"
                )
            other = " / ".join(
                _num(r[k].get("cpu", {}).get("other")) if "whole_s" in r[k] else "-"
                for k in "abcde"
            )
            lines.append(
                f"| {w['info']['workload']} | {precision} | {s['steps']} "
                f"({s['steps'] - s['log_every']}) | {' | '.join(cells)} | {other} |"
            )
    lines += [
        "",
        "Our cores in the steady window by process: train / loader / Ray's own / bench (in (a) "
        "and (b) the bench's own process is the one training):",
        "",
        "| workload | precision | (a) | (b) | (c) | (d) | (e) |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in result["workloads"]:
        for precision, r in w["precisions"].items():
            cells = [_roles(r[k]) for k in "abcde"]
            lines.append(f"| {w['info']['workload']} | {precision} | {' | '.join(cells)} |")
    lines += [
        "",
        "| workload | loader alone img/s (workers, 1st batch s) | decode core-ms/img "
        "| (a) core-ms/img fp32 (best GFLOP/s) | decode share of CPU | bookkeeping us/step, us/record "
        "| checkpoint s each: (b) / (e) | share at the YAML's checkpoint_every |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in result["workloads"]:
        conf, inproc = w["loader"]["configured"], w["loader"]["in_process"]
        r = w["precisions"].get("fp32") or next(iter(w["precisions"].values()))
        a_ms = r["a"]["cpu"]["ours_core_s"] / r["a"]["steady_images"] * 1e3
        book = w["bookkeeping"] or {}
        cb, ce = r.get("checkpoint_b"), r.get("checkpoint_e")
        ck = " / ".join(_num(c["s_per_checkpoint"], ".3f") if c else "-" for c in (cb, ce))
        share = " / ".join(f"{c['share_at_default']:.2%}" if c else "-" for c in (cb, ce))
        lines.append(
            f"| {w['info']['workload']} | {conf['images_per_s']:.0f} ({conf['num_workers']}, "
            f"{conf['first_batch_s']:.2f}) | {inproc['core_ms_per_image']:.2f} | {a_ms:.1f} "
            f"({r['best_a_images_per_s'] * w['info']['train_flops_per_image'] / 1e9:.0f}) "
            f"| {r['decode_share_of_cpu']:.1%} | {book.get('add_us_per_step', '-')}, "
            f"{book.get('record_us', '-')} | {ck} | {share} |"
        )
    return "\n".join(lines)


def _roles(variant: dict) -> str:
    roles = variant.get("cpu", {}).get("ours_by_role")
    if not roles:
        return "n/a"
    return " / ".join(_num(roles[k]) for k in ROLES)


# -- driver -----------------------------------------------------------------------------------


def loadavg() -> list[float]:
    """1/5/15-minute load: on a shared machine, how much else was running."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(threads: int) -> dict:
    import ray

    with open("/proc/cpuinfo") as f:  # platform.processor() is often just "x86_64"
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return {
        "cpu": names[0] if names else platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "gpu": torch.cuda.is_available(),
        "loadavg_start": loadavg(),
    }


def code_version() -> dict:
    """The code measured: its commit, and whether pipeline/ had uncommitted changes."""
    run = lambda *a: subprocess.run(  # noqa: E731
        ["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "commit": run("rev-parse", "--short", "HEAD"),
        "pipeline_dirty": bool(run("status", "--porcelain", "pipeline")),
    }


def run(mode: str, names: list[str], precisions: list[str], threads: int, work: Path) -> dict:
    import ray

    from pipeline.raysetup import init_ray

    result = {"mode": mode, "date": date.today().isoformat(), "machine": machine_info(threads)}
    result["code"] = code_version()
    result["precision_in_trainer"] = precision_in_trainer()
    result["trainer_loader"] = "make_train_loader" if loop_uses_stream() else "make_loader"
    torch.set_num_threads(threads)
    prepared = {n: prepare(n, MODES[mode][n], work, mode) for n in names}
    rows: dict = {n: {} for n in names}
    # One block per workload and precision, its variants minutes apart: a 2-vCPU VM's per-core
    # speed drifts (the same (a) loop took 21% more CPU per image 15 minutes later in one
    # run), so comparing variants run far apart measures the drift, not the trainer.
    for n in names:
        for precision in precisions:
            phase_plain(prepared[n], [precision], threads, work, rows[n])
            started = now()
            init_ray(num_cpus=RAY_CPUS)  # the trainer's own set-up: train() finds Ray running
            result.setdefault("ray_init_s", []).append(round(now() - started, 2))
            if "ray_thread_probe" not in result:
                shapes = [(2, 1)] + ([(1, threads)] if threads != 1 else [])
                result["ray_thread_probe"] = [probe_ray_workers(work, w, c) for w, c in shapes]
            phase_ray(prepared[n], [precision], threads, work, rows[n])
            ray.shutdown()
            phase_again(prepared[n], [precision], threads, rows[n])
    result["workloads"] = [workload_result(prepared[n], rows[n]) for n in names]
    result["machine"]["loadavg_end"] = loadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized runs (~3-4 min)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    parser.add_argument("--threads", type=int, default=1, help="(a)/(b) threads, (c) CPUs")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--workdir", default=None, help="corpora and runs here (default: tmp)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    names, precisions = args.workloads.split(","), args.precisions.split(",")
    if "fp32" not in precisions:
        parser.error("--precisions must include fp32 (the checkpoint and data figures use it)")
    # Embedded Ray on this machine, never a cluster named in the environment.
    os.environ.pop("RAY_ADDRESS", None)
    # The trainer's log lines as `latentpipe train` prints them (INFO); other modules quiet.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("latentpipe").setLevel(logging.INFO)
    out = Path(args.out or ROOT / f"bench/results/train{'-quick' if args.quick else ''}.json")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="latentpipe-train-bench-"))
    started = now()
    try:
        result = run(mode, names, precisions, args.threads, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["total_s"] = round(now() - started, 1)
    # CPU of this process and its waited-for descendants (DDP ranks, loader workers, the Ray
    # cluster after shutdown): the run needs at least this / 2 s on 2 idle cores.
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    result["cpu_core_s"] = round(sum(u.ru_utime + u.ru_stime for u in usage), 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\n{mode} mode: {result['total_s']} s ({result['cpu_core_s']} core-s); results in {out}")
    if mode == "quick":
        print(
            "quick mode is a smoke run: steady windows of a few steps, noisy. The targets "
            "(b/a, c/a, e/d >= 0.9) are judged in full mode (no --quick) on a quiet machine."
        )


if __name__ == "__main__":
    main()
