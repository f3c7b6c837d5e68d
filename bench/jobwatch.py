"""Watching an encode job from the side, for the benchmarks: when its units commit, and where
the machine's CPU went while it ran (and, optionally, what the encoder actor was doing).

:class:`JobWatch` runs a thread beside ``encode_corpus`` that lists the output's commit
directory every 50 ms. At the ``skip``-th commit (the job's start-up behind it) and at the last
one it snapshots the CPU time of every process (``/proc/PID/stat``) and of the whole machine
(``/proc/stat``), so the steady state between them can be split into: the encoder actor(s),
the driver (this process), Ray's own processes (raylet, GCS, idle workers, agents), everything
else on the machine (other users of a shared box), and idle. With ``profile=True`` it also runs
``py-spy record --nonblocking`` on the encoder actor over the same window and sorts the samples
into the unit's phases (read, decode, encode, store, write...).

Reading /proc is Linux-only; so is the whole benchmark setup (ru_maxrss in KiB, VmHWM).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
ACTOR_MARK = "ray::MapWorker"  # Ray Data's actor-pool workers set this process title
POLL_S = 0.05
SAMPLE_S = 1.0  # process table samples between the two snapshots

# py-spy frames -> the unit's phases (pipeline/encode/unit.py, actor.py, writer.py), first match
# from the innermost frame outwards wins.
PHASES = (
    ("encode (ORT session.run)", ("run (onnxruntime", "run (pipeline/encode/session.py")),
    ("decode (prepare_image)", ("prepare_image", "_decode (pipeline/encode/unit.py")),
    ("normalise to float32 (actor)", ("_run (pipeline/encode/actor.py",)),
    ("non-finite check (actor)", ("_kl (pipeline/encode/actor.py",)),
    ("store_sample (fp16 + npy)", ("store_sample",)),
    ("statistics", ("unit_statistics",)),
    ("tar + sha256 + write", ("write_shards", "build_tar", "write_bytes_atomic")),
    ("commit record", ("write_record",)),
    ("read input tar + resolve keys", ("read_rows", "resolve_rows")),
    ("fingerprint", ("fingerprint_of",)),
    ("stack batch (np.stack)", ("_encode_window",)),
    ("wait for decode window", ("decoded_windows",)),
    ("Ray worker / other", ("",)),
)


def _proc_cpu(pid: str) -> tuple[str, float, str] | None:
    """(cmdline or comm, CPU seconds, parent pid) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return (cmd or comm), (int(fields[11]) + int(fields[12])) / TICK, fields[1]


def _machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICK, idle / TICK


def descendants(procs: dict[str, tuple[str, float, str]], root: str) -> set[str]:
    """``root`` and every process below it (our Ray cluster: ray.init starts the GCS and the
    raylet from the driver, and the raylet forks the workers)."""
    children: dict[str, list[str]] = {}
    for pid, (_, _, parent) in procs.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def classify(pid: str, cmd: str, ours: set[str]) -> str:
    """driver, actor (our encoder actors), ray (the rest of our cluster) or other (any other
    process on the machine, e.g. another user's tests or Ray cluster)."""
    if int(pid) == os.getpid():
        return "driver"
    if pid not in ours or "py-spy" in cmd:  # --profile's sampler is not the job's
        return "other"
    return "actor" if cmd.startswith(ACTOR_MARK) else "ray"


@dataclass
class Snapshot:
    at: float
    procs: dict[str, tuple[str, float, str]]
    busy: float
    idle: float

    @classmethod
    def take(cls) -> Snapshot:
        procs = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                got = _proc_cpu(pid)
                if got is not None:
                    procs[pid] = got
        busy, idle = _machine_cpu()
        return cls(time.time(), procs, busy, idle)


def cpu_split(a: Snapshot, b: Snapshot) -> dict:
    """Core-seconds between two snapshots by kind of process, and per wall second."""
    ours = descendants(b.procs, str(os.getpid()))
    used: Counter = Counter()
    actors, others = {}, Counter()
    for pid, (cmd, cpu, _) in b.procs.items():
        before = a.procs.get(pid)
        if before is not None and before[0] != cmd and not cmd.startswith("ray::"):
            before = None  # the pid was reused
        kind, spent = classify(pid, cmd, ours), cpu - (before[1] if before else 0.0)
        used[kind] += spent
        if kind == "actor":
            actors[pid] = round(spent, 2)
        elif kind == "other" and spent > 0:
            others[cmd[:60]] += spent
    busy, idle = b.busy - a.busy, b.idle - a.idle
    # Processes that started and ended inside the window appear in neither snapshot: the
    # machine's busy time is the truth, "other" is what the named kinds do not explain.
    named = used["driver"] + used["actor"] + used["ray"]
    used["other"] = max(busy - named, 0.0)
    wall = b.at - a.at
    split = {kind: round(used[kind], 2) for kind in ("actor", "driver", "ray", "other")}
    return {
        "actor_pids_core_s": actors,
        # The busiest processes that were not ours: what disturbed the measurement.
        "other_top_core_s": {cmd: round(cpu, 2) for cmd, cpu in others.most_common(3)},
        "wall_s": round(wall, 2),
        "core_s": split | {"idle": round(idle, 2)},
        "cores": {k: round(v / wall, 3) for k, v in (split | {"idle": idle}).items()},
    }


@dataclass
class JobWatch:
    """Commit times of a running job, CPU snapshots at its ``skip``-th and last commit."""

    commits: Path  # the output's _encode/commits directory
    units: int
    skip: int = 1  # commits counted as start-up (one per actor)
    profile: bool = False
    profile_out: Path | None = None
    times: dict[str, float] = field(default_factory=dict)  # record name -> first seen
    snapshots: list[Snapshot] = field(default_factory=list)
    latest: dict = field(default_factory=dict)  # pid -> its last sample since the first snapshot
    start: float = 0.0
    error: str = ""

    def __enter__(self) -> JobWatch:
        self.start = time.time()
        self._stop = threading.Event()
        self._spy: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._stop_spy()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                names = [n for n in os.listdir(self.commits) if n.endswith(".json")]
            except FileNotFoundError:
                names = []
            now = time.time()
            for name in names:
                self.times.setdefault(name, now)
            if len(self.snapshots) == 0 and len(self.times) >= min(self.skip, self.units):
                self._sample()
                last_sample = time.monotonic()
                if self.profile:
                    self._start_spy()
            elif len(self.snapshots) == 1 and len(self.times) >= self.units:
                self._sample()
                self._stop_spy()
            elif len(self.snapshots) == 1 and time.monotonic() - last_sample >= SAMPLE_S:
                # A process that ends inside the window (an actor the pool replaced) keeps the
                # CPU of its last sample instead of vanishing into "other".
                self.latest.update(Snapshot.take().procs)
                last_sample = time.monotonic()
            self._stop.wait(POLL_S)

    def _sample(self) -> None:
        snap = Snapshot.take()
        self.latest.update(snap.procs)
        if self.snapshots:  # the closing snapshot: every process seen since the first
            snap = Snapshot(snap.at, dict(self.latest), snap.busy, snap.idle)
        self.snapshots.append(snap)

    def _start_spy(self) -> None:
        procs = self.snapshots[0].procs
        ours = descendants(procs, str(os.getpid()))
        actors = [pid for pid in ours if procs[pid][0].startswith(ACTOR_MARK)]
        if not actors or self.profile_out is None:
            self.error = "no encoder actor process found to profile"
            return
        spy = Path(sys.executable).with_name("py-spy")
        self._spy = subprocess.Popen(
            [str(spy), "record", "--nonblocking", "--format", "raw", "--rate", "50"]
            + ["--output", str(self.profile_out), "--pid", actors[0]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def _stop_spy(self) -> None:
        spy, self._spy = self._spy, None
        if spy is None:
            return
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if spy.returncode not in (0, -signal.SIGINT):
            self.error = f"py-spy exited {spy.returncode}: {err.decode(errors='replace')[-500:]}"

    def timeline(self, rows: dict[str, int]) -> dict:
        """Commit times (s since the watch started) and the steady rate after ``skip`` commits:
        images committed after the skip-th commit / time from it to the last."""
        seen = sorted((t, name) for name, t in self.times.items())
        times = [t - self.start for t, _ in seen]
        out = {
            "first_commit_s": round(times[0], 2),
            "last_commit_s": round(times[-1], 2),
            "commit_times_s": [round(t, 2) for t in times],
        }
        k = min(self.skip, len(seen)) - 1
        later = sum(rows[name] for _, name in seen[k + 1 :])
        if times[-1] > times[k] and later:
            out["steady_images"] = later
            out["steady_s"] = round(times[-1] - times[k], 2)
            out["steady_images_per_s"] = later / (times[-1] - times[k])
        if len(self.snapshots) == 2:
            out["steady_cpu"] = cpu_split(*self.snapshots)
        return out


def profile_phases(raw: Path) -> dict:
    """py-spy raw output (``frame;frame;... count`` lines, outermost first) -> samples per
    phase of the unit and per thread kind (the actor's main thread vs its decode threads)."""
    phases: Counter = Counter()
    threads: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        thread = "decode threads" if "decode" in frames[0] else frames[0].split(" ")[0]
        threads[thread] += n
        phases[_phase(frames)] += n
    if not total:
        return {"samples": 0}
    share = {k: round(v / total, 3) for k, v in phases.most_common()}
    return {
        "samples": total,
        "phases": share,
        "threads": {k: round(v / total, 3) for k, v in threads.most_common(6)},
    }


def _phase(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, marks in PHASES[:-1]:
            if any(mark in frame for mark in marks):
                return name
    return PHASES[-1][0]
