"""pipeline.raynoise: Ray's known-harmless error lines are dropped, everything else passes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

from pipeline.raynoise import NOISE, forward

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Verbatim from Ray 2.60 runs (the driver's own line, a worker's line forwarded with its
# coloured prefix, the GCS line forwarded at the end of an actor pool).
ENCODE = (
    "[2026-12-02 01:05:23,354 E 14509 15052] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(UnitEncoder))' and ID: '4a3403c37d34df0c17b4c80701000000' has "
    "constructor arguments in the object store and max_restarts > 0. If the arguments in the "
    "object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details."
)
TRAIN = (
    "\x1b[36m(TrainController pid=10347)\x1b[0m [2026-12-02 01:03:15,956 E 10347 10445] "
    "core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'b1bca033fe3f2fef095dee2501000000' has constructor arguments in the object store and "
    "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the "
    "actor restart will fail."
)
GCS_KILL = (
    "(pid=gcs_server) [2026-12-02 01:24:51,899 E 12488 12488] (gcs_server) "
    "gcs_actor_scheduler.cc:538: Failed to kill actor d8c8332e36ec36d195b8311e03000000, return "
    "status: Invalid: KillActor RPC failed for actor d8c8332e36ec36d195b8311e03000000: "
    "RpcError: RPC error: Socket closed rpc_code: 14"
)
# Close relatives that must still show: our own actor, another kill failure.
OURS = ENCODE.replace("MapWorker(MapBatches(UnitEncoder))", "OurActor")
OTHER_KILL = GCS_KILL.replace("Socket closed", "Deadline Exceeded")


def _through(chunks: list[bytes], pause_s: float = 0.0) -> bytes:
    """What `forward` makes of ``chunks`` written one by one into a pipe."""
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    worker = threading.Thread(target=forward, args=(r_in, w_out, 0.05))
    worker.start()
    for chunk in chunks:
        os.write(w_in, chunk)
        time.sleep(pause_s)
    os.close(w_in)
    worker.join(timeout=10)
    os.close(w_out)
    with os.fdopen(r_out, "rb") as f:
        out = f.read()
    os.close(r_in)
    return out


def test_noise_matches_exactly_the_known_lines():
    assert all(NOISE.search(line.encode()) for line in (ENCODE, TRAIN, GCS_KILL))
    assert not any(NOISE.search(line.encode()) for line in (OURS, OTHER_KILL))


def test_forward_drops_noise_lines_and_keeps_the_rest_byte_for_byte():
    keep = ["step 2  loss 0.459", OURS, OTHER_KILL, "", "latentpipe: done ✓"]
    lines = [keep[0], ENCODE, keep[1], TRAIN, keep[2], GCS_KILL, keep[3], keep[4]]
    text = "".join(line + "\n" for line in lines).encode()
    assert _through([text]) == "".join(line + "\n" for line in keep).encode()


def test_a_line_written_in_pieces_is_matched_whole():
    """print() writes the text and its newline separately; a read may split anywhere."""
    data = (ENCODE + "\n" + "kept\n").encode()
    pieces = [data[:40], data[40 : len(ENCODE)], data[len(ENCODE) :]]
    assert _through(pieces, pause_s=0.01) == b"kept\n"


def test_a_partial_line_left_alone_goes_on():
    """A prompt or progress bar without a newline is not held back for ever."""
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    worker = threading.Thread(target=forward, args=(r_in, w_out, 0.05), daemon=True)
    worker.start()
    os.write(w_in, b"50%\r")
    time.sleep(0.5)
    os.set_blocking(r_out, False)
    assert os.read(r_out, 100) == b"50%\r"  # while the writer still holds its end open
    os.close(w_in)
    worker.join(timeout=10)
    for fd in (w_out, r_out, r_in):
        os.close(fd)


def test_filter_process_survives_its_command_dying():
    """filter_ray_noise() in a command that aborts: what it wrote before still gets out, the
    noise does not, and the filter process is gone afterwards."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {REPO!r})
        from pipeline import raynoise
        raynoise.filter_ray_noise()
        print("filter pid", raynoise._filter.pid, flush=True)
        print("before", file=sys.stderr)
        os.write(2, {(ENCODE + chr(10)).encode()!r})
        print("last words", file=sys.stderr)
        os.abort()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert proc.stderr == "before\nlast words\n"
    pid = int(proc.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)


def _running(pid: int) -> bool:
    """Alive and not a zombie (whoever inherits an orphan here may reap it late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
