"""Killing a command like a machine failure would, for resume tests."""

from __future__ import annotations

import os
import signal


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants: Ray starts some of its processes in their own
    sessions, so killing the process group is not enough."""
    for victim in descendants(pid):
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_cluster_script(script: str, workdir, *args: str, timeout: float) -> dict:
    """``python SCRIPT WORKDIR ARGS...`` (tests/integration/cluster_*.py), its output in
    WORKDIR/cluster.log; on a timeout the script and its cluster's processes are killed, no
    others. Returns the script's WORKDIR/result.json with the log under "log"."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    workdir = Path(workdir)
    log = workdir / "cluster.log"
    with open(log, "w") as out:
        cmd = [sys.executable, script, str(workdir), *args]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    result_file = workdir / "result.json"
    assert result_file.exists(), log.read_text()[-4000:]
    return {**json.loads(result_file.read_text()), "log": log.read_text()}
