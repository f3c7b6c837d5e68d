"""Driver cost of the encode job: does the driver's CPU and memory grow with the corpus?

    .venv/bin/python bench/encode_scale.py --quick    # smoke: 2,000 and 8,000 images (~3 min)
    .venv/bin/python bench/encode_scale.py            # 20,000 and 80,000 images (~10 min)
    .venv/bin/python bench/encode_scale.py --parts units,finalize   # some of the parts

Three measurements, each in a fresh Python process (a subprocess per run), so that
``getrusage(RUSAGE_SELF)`` and the peak RSS are the driver's alone (Ray's raylet, GCS and worker
processes are other processes):

1. **job**: ``encode_corpus`` over a corpus of tiny images at two sizes, on embedded Ray
   (``ray.init(address="local", num_cpus=2, include_dashboard=False)``), with the demo encoder:
   an untrained model of ``configs/model/kl-f4-tiny.yaml``'s architecture exported at 64 px
   with ``export_model`` (as tests/integration/conftest.py exports its tiny encoder), batch
   size 32 (the default), in two layouts (CONFIGS): one actor with 2 ORT threads (the defaults
   until issue 8) and one actor per core with one ORT thread each (what today's defaults
   resolve to on 2 CPUs). Driver CPU = user + sys of the driver
   process over the ``encode_corpus`` call; peak RSS = ``ru_maxrss``, against the RSS right
   after ``ray.init``. The marginal CPU per 1,000 images is the difference between the two sizes
   divided by the difference in images: the fixed costs (pipeline start, dedup job, finalise)
   cancel out. Time to first commit = the first commit record's mtime - the call's start.
2. **floor**: a metadata-only Ray Data pipeline of the same shape (``from_items(units)`` ->
   ``map_batches(trivial actor, batch_size=1, ActorPoolStrategy)`` -> driver), once as fast as it
   goes and once paced (the actor sleeps per unit so the pipeline lasts as long as the job's
   steady state): Ray Data's own bookkeeping per unit and per second of wall time.
3. **units**: the job over 200 and 1,000 input shards of 10 images each, timing the driver's
   CPU and RSS around each of its steps (encode passes, duplicate-key pass, finalise): the
   driver's cost per unit, which 1,000-image units hide.
4. **finalise**: synthetic commit records (1,000 keys, 3 rejects, one shard entry and a real
   statistics state each) in a local directory; ``pipeline.encode.finalize.finalize`` over
   20,000 of them and over 5,000: time and RSS growth (one pass), tracemalloc's peak (a second
   pass: tracemalloc slows allocations several-fold), to show that finalising holds a bounded
   window of records, not the corpus.

Images: seeded random 64x64 crops of the photographs bundled with scikit-image and scikit-learn
(``load_sample_photos``, as ``source=sample`` uses; nothing is downloaded), JPEG quality 90,
1,000 per input shard, written once to ``bench/.cache/encode-scale/`` (gitignored) and reused.
Results: ``bench/results/encode-scale[-quick].json`` and a summary on stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the child processes run this file as a script

CACHE = ROOT / "bench/.cache/encode-scale"
WORK = Path(tempfile.gettempdir()) / "latentpipe-encode-scale"
SEED = 0
TILE = 64  # the demo encoder's resolution: tiles are encoded as they are (no resize)
PER_SHARD = 1000
JPEG_QUALITY = 90
RAY_CPUS = 2
MODES = {
    "quick": {"sizes": (2_000, 8_000), "records": (1_000, 4_000), "units": (50, 200)},
    "full": {"sizes": (20_000, 80_000), "records": (5_000, 20_000), "units": (200, 1_000)},
}
# A realistic commit record: the job's own fields (pipeline/encode/unit.py), keys like a
# web corpus's, a few rejects.
UNIT_IMAGES = 10  # the "units" part: many small input shards, to see the driver's cost per unit
RECORD_KEYS = 1000
RECORD_REJECTS = 3


# ----------------------------------------------------------------------------- helpers


def rss_bytes() -> int:
    """The current resident set size of this process (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    """This process's lifetime peak RSS (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User + system CPU of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def field(manifest, name: str):
    """A manifest figure, whether encode_corpus returns the manifest dict or a typed Manifest."""
    return manifest[name] if isinstance(manifest, dict) else getattr(manifest, name)


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads, summed by thread name (Ray's C++ threads name
    themselves; Python threads show the process's name)."""
    by_name: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        by_name[name] = by_name.get(name, 0.0) + cpu
    return by_name


def thread_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The busiest thread names' CPU seconds between two thread_cpu() calls."""
    used = {name: cpu - before.get(name, 0.0) for name, cpu in after.items()}
    top = sorted(used.items(), key=lambda kv: -kv[1])[:6]
    return {name: round(cpu, 3) for name, cpu in top if cpu > 0.005}


def code_version() -> dict:
    """The pipeline code measured: its commit, and whether pipeline/ had uncommitted changes."""
    marker = ROOT / "COMMIT"  # a snapshot made with `git archive` carries its commit here
    if marker.exists():
        return {"commit": marker.read_text().strip(), "pipeline_dirty": False}
    run = lambda *a: subprocess.run(  # noqa: E731
        ["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "commit": run("rev-parse", "HEAD"),
        "pipeline_dirty": bool(run("status", "--porcelain", "pipeline")),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def start_ray() -> None:
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(
        address="local",
        num_cpus=RAY_CPUS,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )


def corpus_dir(per_shard: int) -> Path:
    return CACHE / ("tiles" if per_shard == PER_SHARD else f"tiles-{per_shard}")


def shard_urls(images: int, per_shard: int = PER_SHARD) -> str:
    """The brace pattern of the first ``images // per_shard`` cached input shards."""
    last = images // per_shard - 1
    return str(corpus_dir(per_shard) / f"shard-{{000000..{last:06d}}}.tar")


# ----------------------------------------------------------------------------- inputs


def build_corpus(images: int, per_shard: int = PER_SHARD) -> Path:
    """``images`` seeded 64x64 JPEG crops of the bundled photos in shards of ``per_shard``,
    written once: a marker file records how many exist, and a larger request extends it."""
    import numpy as np
    from PIL import Image

    from pipeline.data.shards import load_sample_photos
    from pipeline.data.tario import build_tar

    directory = corpus_dir(per_shard)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "corpus.json"
    have = json.loads(marker.read_text())["images"] if marker.exists() else 0
    if have >= images:
        return directory
    photos = load_sample_photos()
    names = sorted(photos)
    started = time.perf_counter()
    for shard in range(have // per_shard, images // per_shard):
        # Each shard seeded alone, so the corpus can be extended.
        seed = [SEED, shard] if per_shard == PER_SHARD else [SEED, per_shard, shard]
        rng = np.random.default_rng(seed)
        samples = []
        for j in range(per_shard):
            i = shard * per_shard + j
            name = names[i % len(names)]
            photo = photos[name]
            top = int(rng.integers(0, photo.shape[0] - TILE + 1))
            left = int(rng.integers(0, photo.shape[1] - TILE + 1))
            buffer = io.BytesIO()
            tile = np.ascontiguousarray(photo[top : top + TILE, left : left + TILE])
            Image.fromarray(tile).save(buffer, "JPEG", quality=JPEG_QUALITY)
            samples.append((f"{name}_{i:07d}", {"jpg": buffer.getvalue()}))
        path = directory / f"shard-{shard:06d}.tar"
        path.with_suffix(".tmp").write_bytes(build_tar(samples))
        path.with_suffix(".tmp").rename(path)
    marker.write_text(json.dumps({"images": images, "per_shard": per_shard}) + "\n")
    print(f"corpus: {images} tiles in {time.perf_counter() - started:.1f} s", flush=True)
    return directory


def build_encoder() -> str:
    """The demo encoder: untrained kl-f4-tiny architecture exported at 64 px (cached)."""
    out = CACHE / "encoder-kl-f4-tiny-64"
    onnx = out / "encoder.onnx"
    if onnx.exists():
        return str(onnx)
    import torch

    from pipeline.config import load_config
    from pipeline.export import export_model
    from pipeline.models import build_model
    from pipeline.train.config import TrainRunConfig

    files = [
        str(ROOT / "configs/train/kl-f4-tiny.yaml"),
        str(ROOT / "configs/model/kl-f4-tiny.yaml"),
    ]
    cfg = load_config(TrainRunConfig, files, ["data.shards=unused"])
    torch.manual_seed(SEED)
    model = build_model(cfg.model).eval()
    shutil.rmtree(out, ignore_errors=True)
    export_model(model, str(out), resolution=TILE, scale_samples=0)
    return str(onnx)


# ----------------------------------------------------------------------------- children


def watch_phases(module, names: tuple[str, ...]) -> list[dict]:
    """Wrap ``module``'s functions ``names`` (where present) to record the driver's time, CPU
    and RSS around each call: which step of the job costs what."""
    phases: list[dict] = []

    def wrap(name, fn):
        def timed(*args, **kwargs):
            rss0, cpu0, t0 = rss_bytes(), cpu_seconds(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases.append(
                    {
                        "step": name,
                        "seconds": round(time.perf_counter() - t0, 2),
                        "driver_cpu_s": round(cpu_seconds() - cpu0, 3),
                        "rss_before_mib": round(rss0 / 2**20, 1),
                        "rss_after_mib": round(rss_bytes() / 2**20, 1),
                        "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
                    }
                )

        return timed

    for name in names:
        if hasattr(module, name):
            setattr(module, name, wrap(name, getattr(module, name)))
    return phases


def child_job(args: dict) -> dict:
    """One encode_corpus run; the driver's CPU and memory around it (and around its steps)."""
    import pipeline.encode.job as job_module
    from pipeline.encode.job import EncodeConfig, encode_corpus

    phases = watch_phases(job_module, ("run_passes", "resolve_duplicates", "finalize"))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    rss_imported = rss_bytes()
    start_ray()
    rss_ray = rss_bytes()
    output = Path(args["output"])
    shutil.rmtree(output, ignore_errors=True)
    cfg = EncodeConfig(
        input=args["input"], output=str(output), encoder=args["encoder"], **args["overrides"]
    )
    threads0, cpu0, wall0, t0 = thread_cpu(), cpu_seconds(), time.time(), time.perf_counter()
    manifest = encode_corpus(cfg)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    threads = thread_split(threads0, thread_cpu())
    commits = sorted(p.stat().st_mtime for p in (output / "_encode/commits").glob("u*.json"))
    rss_end, peak = rss_bytes(), peak_rss_bytes()
    images = int(field(manifest, "input_samples"))
    if field(manifest, "samples") != images or field(manifest, "rejects"):
        raise RuntimeError(f"the job rejected images: see {output}/rejects.jsonl")
    units = len(commits)
    steady = (images - images / units) / (commits[-1] - commits[0]) if units > 1 else None
    shutil.rmtree(output, ignore_errors=True)
    return {
        "images": images,
        "units": units,
        "config": {k: getattr(cfg, k) for k in ("batch_size", "num_actors", "actor_cpus")}
        | {"decode_threads": cfg.decode_threads, "threads_per_actor": cfg.threads_per_actor},
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "manifest_images_per_s": field(manifest, "images_per_s"),
        "first_commit_s": round(commits[0] - wall0, 2),
        "last_commit_s": round(commits[-1] - wall0, 2),
        "after_last_commit_s": round(wall0 + seconds - commits[-1], 2),
        "steady_images_per_s": round(steady, 1) if steady else None,
        "driver_cpu_s": round(cpu, 3),
        "driver_cpu_s_per_1000": round(cpu / images * 1000, 4),
        "driver_cores": round(cpu / seconds, 4),  # driver CPU per second of the job
        "driver_threads_cpu_s": threads,
        "steps": phases,
        "rss_imported_mib": round(rss_imported / 2**20, 1),
        "rss_after_ray_init_mib": round(rss_ray / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "peak_growth_mib": round((peak - rss_ray) / 2**20, 1),
    }


class TrivialUnit:
    """The floor's actor: returns a result row like the encoder actor's, doing nothing else
    (or sleeping ``sleep_s``: a unit that takes as long as the job's)."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.sleep_s = sleep_s

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        if self.sleep_s:
            time.sleep(self.sleep_s)
        info = json.dumps({"status": "ok", "rows": PER_SHARD, "samples": PER_SHARD, "rejects": 0})
        return {
            "unit": np.asarray(batch["unit"], dtype=np.int64),
            "status": np.array(["ok"] * len(batch["unit"]), dtype=object),
            "info": np.array([info] * len(batch["unit"]), dtype=object),
        }


def child_floor(args: dict) -> dict:
    """Metadata-only pipeline of the job's shape; driver CPU over building + iterating it."""
    import ray

    start_ray()
    rss_ray = rss_bytes()
    units, now = int(args["units"]), time.time()
    items = [
        {"unit": u, "url": f"/corpus/shard-{u:06d}.tar", "run": "bench", "run_start": now}
        for u in range(units)
    ]
    threads0, cpu0, t0 = thread_cpu(), cpu_seconds(), time.perf_counter()
    ds = ray.data.from_items(items, override_num_blocks=units)
    ds = ds.map_batches(
        TrivialUnit,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=1, initial_size=1, max_tasks_in_flight_per_actor=2
        ),
        fn_constructor_kwargs={"sleep_s": float(args["sleep_s"])},
        num_cpus=1.0,
    )
    ds.context.enable_progress_bars = False
    ds.context.execution_options.preserve_order = False
    rows = sum(1 for _ in ds.iter_rows())
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    threads = thread_split(threads0, thread_cpu())
    assert rows == units, (rows, units)
    return {
        "units": units,
        "sleep_s_per_unit": float(args["sleep_s"]),
        "seconds": round(seconds, 2),
        "driver_cpu_s": round(cpu, 3),
        "driver_cpu_s_per_unit": round(cpu / units, 4),
        "driver_cores": round(cpu / seconds, 4),
        "driver_threads_cpu_s": threads,
        "peak_growth_mib": round((peak_rss_bytes() - rss_ray) / 2**20, 1),
    }


def synthetic_record(unit: int, stats_state: dict) -> dict:
    """A commit record shaped like pipeline/encode/unit.py's, for a unit of RECORD_KEYS keys."""
    name = f"latents-{unit:06d}.tar"
    source = f"s3://corpus-bucket/laion/part-{unit // 1000:04d}/{unit:06d}.tar"
    keys = [f"{unit:06d}{j:04d}_{(unit * 7919 + j) % 99991:05x}" for j in range(RECORD_KEYS)]
    return {
        "unit": unit,
        "input": source,
        "fingerprint": {"size": 3_500_000 + unit, "etag": f'"{unit:032x}"'},
        "rows": RECORD_KEYS + RECORD_REJECTS,
        "samples": RECORD_KEYS,
        "shards": [
            {
                "name": name,
                "samples": RECORD_KEYS,
                "bytes": 3_584_000 + unit,
                "sha256": f"{unit:064x}",
                "unit": unit,
                "source": source,
                "bucket": None,
                "latent_shape": [4, 16, 16],
            }
        ],
        "rejects": [
            {"key": f"{unit:06d}bad{r}", "shard": source, "reason": "bad image: cannot identify"}
            for r in range(RECORD_REJECTS)
        ],
        "keys": keys,
        "merged_keys": 0,
        "replaced_fields": 0,
        "stats": stats_state,
        "code_counts": None,
        "nonfinite_rejects": 0,
        "overflow_rejects": 0,
        "encoded": RECORD_KEYS,
        "fp16_retries": 0,
        "duplicate_rejects": 0,
        "run": "bench0000000",
        "elapsed_s": round(1.0 + unit * 0.9, 3),
    }


def build_records(directory: Path, count: int) -> None:
    """``count`` synthetic commit records under ``directory/_encode/commits`` (written once)."""
    import numpy as np

    from pipeline.latents.stats import ChannelStats

    commits = directory / "_encode/commits"
    commits.mkdir(parents=True, exist_ok=True)
    marker = directory / "records.json"
    have = json.loads(marker.read_text())["records"] if marker.exists() else 0
    if have >= count:
        return
    stats = ChannelStats(4)
    stats.update(np.random.default_rng(SEED).standard_normal((RECORD_KEYS, 4, 16, 16)))
    state = stats.state()
    started = time.perf_counter()
    for unit in range(have, count):
        path = commits / f"u{unit:06d}.json"
        path.write_text(json.dumps(synthetic_record(unit, state)))
    marker.write_text(json.dumps({"records": count}) + "\n")
    print(f"records: {count} in {time.perf_counter() - started:.1f} s", flush=True)


def child_finalize(args: dict) -> dict:
    """``finalize`` over the first ``units`` synthetic records: time and peak memory."""
    import tracemalloc

    from pipeline.contracts.sidecar import load_sidecar
    from pipeline.encode.config import EncodeConfig
    from pipeline.encode.finalize import FinalizeInputs, finalize
    from pipeline.encode.preprocess import resolve_preprocess

    directory, units = Path(args["records"]), int(args["units"])
    sidecar = load_sidecar(args["encoder"])
    cfg = EncodeConfig(input="unused", output=str(directory), encoder=args["encoder"])
    preprocess = resolve_preprocess(
        cfg.preprocess,
        sidecar.input.resolution,
        sidecar.downsample_factor,
        sidecar.dynamic_spatial,
    )
    inputs = FinalizeInputs(
        cfg=cfg,
        sidecar=sidecar,
        preprocess=preprocess,
        identity={"bench": "synthetic records"},
        units=units,
        codebook=None,
        run="bench0000000",
        run_s=1.0,
    )
    rss0 = rss_bytes()
    # Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is finalise's own.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    # Pass 1, timed and RSS-measured without tracemalloc (which slows every allocation
    # several-fold); pass 2 (finalise is idempotent: same files) for tracemalloc's peak.
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    manifest = finalize(inputs)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    hwm = vm_hwm_bytes()
    tracemalloc.start()
    finalize(inputs)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    samples, rejects = field(manifest, "samples"), field(manifest, "rejects")
    assert samples == units * RECORD_KEYS and rejects == units * RECORD_REJECTS, (samples, rejects)
    sizes = sum(
        (directory / name).stat().st_size
        for name in ("rejects.jsonl", "shards.jsonl", "inputs.jsonl", "index.json")
    )
    return {
        "records": units,
        "keys": units * RECORD_KEYS,
        "record_bytes": sum(
            (directory / f"_encode/commits/u{u:06d}.json").stat().st_size for u in range(units)
        ),
        "written_bytes": sizes,
        "seconds": round(seconds, 2),
        "cpu_s": round(cpu, 2),
        "records_per_s": round(units / seconds, 1),
        "tracemalloc_peak_mib": round(traced_peak / 2**20, 2),
        "rss_before_mib": round(rss0 / 2**20, 1),
        "rss_peak_growth_mib": round((hwm - rss0) / 2**20, 1),
    }


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


CHILDREN = {"job": child_job, "floor": child_floor, "finalize": child_finalize}


def run_child(kind: str, tag: str, **args) -> dict:
    """Run one measurement in a fresh interpreter; its JSON result (its output kept in
    WORK/{kind}-{tag}.log)."""
    WORK.mkdir(parents=True, exist_ok=True)
    result = WORK / f"{kind}-result.json"
    log = WORK / f"{kind}-{tag}.log"
    command = [sys.executable, __file__, "--child", kind, json.dumps(args), str(result)]
    load = loadavg()
    with open(log, "w") as stderr:
        proc = subprocess.run(command, stdout=stderr, stderr=stderr, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{kind} {args} failed (exit {proc.returncode}); see {log}")
    return json.loads(result.read_text()) | {"loadavg_before": load, "loadavg_after": loadavg()}


# ----------------------------------------------------------------------------- report


def marginal(small: dict, large: dict, count: str) -> dict:
    """Differences between the two sizes, per 1,000 images (or per record)."""
    extra = large[count] - small[count]
    out = {
        "cpu_s_per_1000": round((large["driver_cpu_s"] - small["driver_cpu_s"]) / extra * 1000, 4),
        "peak_rss_growth_mib": round(large["peak_rss_mib"] - small["peak_rss_mib"], 1),
    }
    out["peak_rss_bytes_per_image"] = round(out["peak_rss_growth_mib"] * 2**20 / extra, 1)
    return out


def summary(result: dict) -> str:
    """Markdown tables of whatever parts ran."""
    lines = []
    if "job" in result:
        lines.append(
            "| config | images | units | job s | job img/s | steady img/s | 1st commit s "
            "| driver CPU s | per 1,000 img | driver cores | RSS after ray.init MiB "
            "| peak RSS MiB | load before/after |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, block in result["job"].items():
            for j in block["runs"]:
                lines.append(
                    f"| {name} | {j['images']:,} | {j['units']} | {j['seconds']:.1f} "
                    f"| {j['images_per_s']:.0f} | {j['steady_images_per_s']:.0f} "
                    f"| {j['first_commit_s']:.1f} | {j['driver_cpu_s']:.2f} "
                    f"| {j['driver_cpu_s_per_1000']:.3f} | {j['driver_cores']:.3f} "
                    f"| {j['rss_after_ray_init_mib']:.0f} | {j['peak_rss_mib']:.0f} "
                    f"| {j['loadavg_before'][0]} / {j['loadavg_after'][0]} |"
                )
        for name, block in result["job"].items():
            m = block["marginal"]
            lines.append(
                f"{name}: marginal driver CPU {m['cpu_s_per_1000']:.4f} core-s per 1,000 images "
                f"(target <= 0.05); peak RSS {m['peak_rss_growth_mib']:+.1f} MiB between the "
                f"sizes ({m['peak_rss_bytes_per_image']:+.1f} B per image)"
            )
    if "floor" in result:
        lines.append(
            "\n| floor pipeline | units | sleep s/unit | s | driver CPU s | per unit | cores |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for f in result["floor"]:
            lines.append(
                f"| metadata only | {f['units']} | {f['sleep_s_per_unit']:.2f} "
                f"| {f['seconds']:.1f} | {f['driver_cpu_s']:.2f} "
                f"| {f['driver_cpu_s_per_unit']:.4f} | {f['driver_cores']:.3f} |"
            )
        for name, m in result["floor_marginal"].items():
            lines.append(f"floor marginal ({name}): {m:.4f} core-s per unit (1,000 images)")
    if "units" in result:
        u = result["units"]
        lines.append(
            f"\n| small units ({u['unit_images']} images each) | job s | driver CPU s | peak RSS MiB | steps: s / CPU s / RSS before -> after MiB |"
        )
        lines.append("|---|---|---|---|---|")
        for j in u["runs"]:
            steps = "; ".join(
                f"{s['step']} {s['seconds']:.1f} / {s['driver_cpu_s']:.2f} / "
                f"{s['rss_before_mib']:.0f} -> {s['rss_after_mib']:.0f}"
                for s in j["steps"]
            )
            lines.append(
                f"| {j['units']} units | {j['seconds']:.1f} | {j['driver_cpu_s']:.2f} "
                f"| {j['peak_rss_mib']:.0f} | {steps} |"
            )
        lines.append(f"per unit: {json.dumps(u['per_unit'])}")
    if "finalize" in result:
        lines.append(
            "\n| finalise | records | keys | s | records/s | tracemalloc peak MiB "
            "| RSS growth MiB |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for f in result["finalize"]:
            lines.append(
                f"| finalize | {f['records']:,} | {f['keys']:,} | {f['seconds']:.1f} "
                f"| {f['records_per_s']:.0f} | {f['tracemalloc_peak_mib']:.2f} "
                f"| {f['rss_peak_growth_mib']:.1f} |"
            )
    return "\n".join(lines)


# The job's layout: the config's defaults (one actor of 1 CPU, ONNX Runtime's own thread
# count), and one actor per core with one ORT thread each (what bench/encode.py finds fastest
# for small encoders on this machine).
CONFIGS = {
    # The defaults before issue 8's last change: one actor, ORT's own thread count (2 here).
    "one-actor": {"num_actors": 1, "actor_cpus": 1.0, "threads_per_actor": 2, "decode_threads": 1},
    # What the defaults (num_actors=0, threads_per_actor=0) resolve to on 2 CPUs, spelled out.
    "per-core": {"num_actors": 2, "actor_cpus": 1.0, "threads_per_actor": 1, "decode_threads": 1},
}


def run_jobs(result: dict, sizes: tuple[int, ...], configs: list[str], encoder: str) -> None:
    result["job"] = {}
    for name in configs:
        runs = []
        for images in sizes:
            print(f"job ({name}): {images} images ...", flush=True)
            out = str(WORK / f"out-{images}")
            row = run_child(
                "job",
                f"{name}-{images}",
                images=images,
                input=shard_urls(images),
                output=out,
                encoder=encoder,
                overrides=CONFIGS[name],
            )
            runs.append(row)
            print(json.dumps(row), flush=True)
        result["job"][name] = {
            "overrides": CONFIGS[name],
            "runs": runs,
            "marginal": marginal(*runs, "images"),
        }


def run_units(result: dict, counts: tuple[int, ...], encoder: str) -> None:
    """The job over many small units (UNIT_IMAGES images each): the driver's cost per unit,
    step by step (encode passes, duplicate-key pass, finalise)."""
    build_corpus(max(counts) * UNIT_IMAGES, UNIT_IMAGES)
    runs = []
    for units in counts:
        images = units * UNIT_IMAGES
        print(f"units: {units} units of {UNIT_IMAGES} images ...", flush=True)
        row = run_child(
            "job",
            f"units-{units}",
            images=images,
            input=shard_urls(images, UNIT_IMAGES),
            output=str(WORK / f"out-units-{units}"),
            encoder=encoder,
            overrides=CONFIGS["per-core"],
        )
        runs.append(row)
        print(json.dumps(row), flush=True)
    small, large = runs
    extra = large["units"] - small["units"]
    steps = {}
    for a, b in zip(small["steps"], large["steps"], strict=True):
        steps[a["step"]] = {
            "driver_cpu_ms_per_unit": round(
                (b["driver_cpu_s"] - a["driver_cpu_s"]) / extra * 1e3, 3
            ),
            "rss_growth_kib_per_unit": round(
                (
                    (b["rss_after_mib"] - b["rss_before_mib"])
                    - (a["rss_after_mib"] - a["rss_before_mib"])
                )
                * 1024
                / extra,
                2,
            ),
        }
    result["units"] = {
        "unit_images": UNIT_IMAGES,
        "config": CONFIGS["per-core"],
        "runs": runs,
        "per_unit": {
            "driver_cpu_ms": round(
                (large["driver_cpu_s"] - small["driver_cpu_s"]) / extra * 1e3, 3
            ),
            "peak_rss_kib": round(
                (large["peak_rss_mib"] - small["peak_rss_mib"]) * 1024 / extra, 2
            ),
            "steps": steps,
        },
    }


def run_floor(result: dict, sizes: tuple[int, ...], pace: float) -> None:
    result["floor"] = []
    if not pace and "job" in result:
        # Paced: each unit as long as one of the first config's large job's units (steady).
        pace = PER_SHARD / next(iter(result["job"].values()))["runs"][-1]["steady_images_per_s"]
    for sleep_s in (0.0, round(pace or 2.0, 2)):
        for images in sizes:
            print(f"floor: {images // PER_SHARD} units, sleep {sleep_s} s ...", flush=True)
            row = run_child(
                "floor", f"{images}-{sleep_s}", units=images // PER_SHARD, sleep_s=sleep_s
            )
            result["floor"].append(row)
            print(json.dumps(row), flush=True)
    rows = result["floor"]
    result["floor_marginal"] = {
        f"sleep {a['sleep_s_per_unit']} s": round(
            (b["driver_cpu_s"] - a["driver_cpu_s"]) / (b["units"] - a["units"]), 4
        )
        for a, b in (rows[0:2], rows[2:4])
    }


def run_finalize(result: dict, records: tuple[int, ...], encoder: str) -> None:
    directory = CACHE / "records"
    build_records(directory, max(records))
    result["finalize"] = []
    for count in records:
        print(f"finalize: {count} records ...", flush=True)
        row = run_child(
            "finalize", str(count), units=count, records=str(directory), encoder=encoder
        )
        result["finalize"].append(row)
        print(json.dumps(row), flush=True)


def run(mode: str, parts: list[str], configs: list[str], pace: float) -> dict:
    sizes, records = MODES[mode]["sizes"], MODES[mode]["records"]
    result: dict = {
        "mode": mode,
        "date": date.today().isoformat(),
        "code": code_version(),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": loadavg(),
        },
    }
    encoder = build_encoder()
    if "job" in parts or "floor" in parts:
        build_corpus(max(sizes))
    if "job" in parts:
        run_jobs(result, sizes, configs, encoder)
    if "floor" in parts:
        run_floor(result, sizes, pace)
    if "units" in parts:
        run_units(result, MODES[mode]["units"], encoder)
    if "finalize" in parts:
        run_finalize(result, records, encoder)
    result["machine"]["loadavg_end"] = loadavg()
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, args, out = sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
        out.write_text(json.dumps(CHILDREN[kind](args)) + "\n")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 and 8,000 images")
    parser.add_argument(
        "--parts", default="job,floor,units,finalize", help="comma list of job,floor,units,finalize"
    )
    parser.add_argument("--configs", default="one-actor,per-core", help="comma list of CONFIGS")
    parser.add_argument(
        "--pace", type=float, default=0.0, help="floor's s per unit (0: the job's steady rate)"
    )
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    out = Path(
        args.out or ROOT / f"bench/results/encode-scale{'-quick' if args.quick else ''}.json"
    )
    started = time.perf_counter()
    result = run(mode, args.parts.split(","), args.configs.split(","), args.pace)
    result["total_s"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"\n{mode} mode: {result['total_s']} s; results in {out}")


if __name__ == "__main__":
    main()
