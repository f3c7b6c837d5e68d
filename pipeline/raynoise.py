"""Keep Ray's known-harmless error lines out of a command's output; everything else passes.

Ray 2.60 prints one ERROR line on every train and encode run although nothing is wrong:

    [... E 14509 15052] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(
    UnitEncoder))' and ID: '...' has constructor arguments in the object store and
    max_restarts > 0. If the arguments in the object store go out of scope or are lost, the
    actor restart will fail. See https://github.com/ray-project/ray/issues/53727 ...

Ray's core worker logs it once per process when an actor that may be restarted receives a
constructor argument by reference. Both cases are Ray's own internals, not our arguments:
Ray Data hands every actor-pool worker (encode's UnitEncoder actors) its DataContext and UDF
by ObjectRef, and Ray Train hands its PreemptionWatcher the worker actors' handles. Those
references live as long as the driver that made them, which is as long as the job, so the
restart the line warns about does work (tests/integration/test_encode_cluster.py kills a
node under encode's actors and the job finishes). A second, rarer line is listed with :data:`NOISE`. Both stay in Ray's own log files
(the session's logs directory).

No Ray setting targets one message: ``RAY_BACKEND_LOG_LEVEL=fatal`` would hide every real
error of Ray's C++ side too (and prints a line of its own from every process), and
``ray.LoggingConfig`` only configures Python loggers. The C++ core worker writes straight to
file descriptor 2, so :func:`filter_ray_noise` points fd 2 at a small filter process that
drops exactly :data:`NOISE` and copies everything else unchanged, including the lines the
driver forwards from its workers. A separate process rather than a thread: if the command
dies (a crash, abort(), SIGKILL), the filter still drains what the command wrote and exits.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import subprocess
import sys

NOISE = re.compile(
    # Every train and encode run (see above).
    rb"core_worker\.cc:\d+: Actor with class name: '(?:MapWorker\(.*\)|PreemptionWatcher)' "
    rb"and ID: '\w+' has constructor arguments in the object store and max_restarts > 0"
    # When Ray Data retires an actor pool (encode, on a cluster), the GCS may still send a kill
    # to a worker that has already exited: its socket is closed because the actor is gone.
    rb"|gcs_actor_scheduler\.cc:\d+: Failed to kill actor \w+, return status: Invalid: "
    rb"KillActor RPC failed for actor \w+: RpcError: RPC error: Socket closed"
)

_filter: subprocess.Popen | None = None


def filter_ray_noise() -> None:
    """Route this process's stderr (fd 2) through the filter, for the rest of its life.

    For program entry points only (the CLI, ``jobs/*.py``): a library caller's stderr is its
    own business. Idempotent.
    """
    global _filter
    if _filter is not None:
        return
    sys.stderr.flush()
    original = os.dup(2)
    # stdout=2 and stderr=2: the filter writes to where our stderr went so far.
    _filter = subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(__file__)], stdin=subprocess.PIPE, stdout=2, stderr=2
    )
    os.dup2(_filter.stdin.fileno(), 2)
    _filter.stdin.close()  # fd 2 is now the only write end we hold
    atexit.register(_restore, original)


def _restore(original: int) -> None:
    """At exit: give fd 2 back, so the filter sees end-of-file, and let it drain."""
    sys.stderr.flush()
    os.dup2(original, 2)
    try:
        _filter.wait(timeout=5)
    except subprocess.TimeoutExpired:  # a child of ours still holds the pipe: it goes on alone
        pass


def forward(src: int, dst: int, hold_s: float = 0.2) -> None:
    """Copy ``src`` to ``dst`` until end-of-file, dropping the lines that match NOISE.

    Lines are matched whole: print() writes a line and its newline in two writes, so a
    partial line waits for the rest, but only ``hold_s``: alone that long, it is a prompt or
    a progress bar and goes on as it is.
    """
    pending = b""
    while True:
        ready, _, _ = select.select([src], [], [], hold_s if pending else None)
        if not ready:
            _write_all(dst, pending)
            pending = b""
            continue
        chunk = os.read(src, 1 << 16)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        _write_all(dst, b"".join(line + b"\n" for line in lines if not NOISE.search(line)))
    _write_all(dst, pending)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)  # os.write may take less than all of it
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":  # the filter process: stdin -> stdout
    import signal

    # Ctrl-C and `ray job stop` signal the whole process group: the command's last words
    # (a traceback, "stopped") still have to get through, so only end-of-file ends the filter.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    forward(0, 1)
