"""The encode output lease: one writer at a time, on local disk, memory:// and s3:// (moto)."""

import json
import socket
import subprocess
import sys
import threading
import time
import uuid

import fsspec
import pytest

from pipeline.encode.lease import (
    LEASE_FILE,
    Lease,
    LeaseHeldError,
    LeaseLostError,
    LeaseOwner,
    ray_job_id,
)

ELSEWHERE = "host-elsewhere"  # a host whose pids we cannot check: only expiry frees its lease


def _owner(run: str, host: str = ELSEWHERE, pid: int = 4242, job: str = "") -> LeaseOwner:
    return LeaseOwner(run=run, host=host, pid=pid, job=job, started="2026-01-01T00:00:00+00:00")


@pytest.fixture(params=["local", "memory", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "latents")
    if request.param == "memory":
        return f"memory://lease-{uuid.uuid4().hex}/latents"
    _, bucket = request.getfixturevalue("s3_server")
    return f"s3://{bucket}/lease-{uuid.uuid4().hex}/latents"


def _read(output: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(f"{output}/{LEASE_FILE}")
    fs.invalidate_cache(path)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def _write(output: str, record: dict) -> None:
    fs, path = fsspec.core.url_to_fs(f"{output}/{LEASE_FILE}")
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(record).encode())


def test_acquire_release_reacquire(output):
    lease = Lease.acquire(output, _owner("r1"), ttl_s=60)
    record = _read(output)
    assert record["owner"]["run"] == "r1" and record["ttl_s"] == 60
    assert abs(record["expires_at"] - lease.expires_at) < 1e-6 and lease.expires_at > time.time()
    lease.release()
    assert _read(output) is None
    Lease.acquire(output, _owner("r2"), ttl_s=60).release()


def test_second_acquire_refused_naming_the_owner(output):
    me = LeaseOwner.current("run-a", job="raysubmit_123")
    lease = Lease.acquire(output, me, ttl_s=60)
    with pytest.raises(LeaseHeldError) as caught:
        Lease.acquire(output, _owner("run-b"), ttl_s=60)
    text = str(caught.value)
    assert f"another encode job is writing {output}" in text
    for part in ("run run-a", f"host {me.host}", f"pid {me.pid}", "Ray job raysubmit_123"):
        assert part in text
    assert f"started {me.started}" in text and "expires at" in text and "(in 60 s)" in text
    assert "re-run after the lease expires" in text
    assert _read(output)["owner"]["run"] == "run-a"  # the refused job changed nothing
    lease.release()


def test_expired_lease_taken_over_and_old_holder_loses(output):
    old = Lease.acquire(output, _owner("old"), ttl_s=0.2)
    time.sleep(0.25)
    new = Lease.acquire(output, _owner("new"), ttl_s=60)
    assert _read(output)["owner"]["run"] == "new"
    with pytest.raises(LeaseLostError, match="now names run new"):
        old.renew()
    with pytest.raises(LeaseLostError, match="now names run new"):
        old.check()
    old.release()  # not ours any more: left alone
    assert _read(output)["owner"]["run"] == "new"
    new.release()
    assert _read(output) is None


def test_same_host_dead_pid_taken_over_at_once(tmp_path):
    output = str(tmp_path / "latents")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = _owner("killed", host=socket.gethostname(), pid=child.pid)
    Lease.acquire(output, dead, ttl_s=600)  # never released: its process is gone
    lease = Lease.acquire(output, _owner("rerun"), ttl_s=60)
    assert _read(output)["owner"]["run"] == "rerun"
    lease.release()


def test_same_host_live_pid_is_refused(tmp_path):
    output = str(tmp_path / "latents")
    Lease.acquire(output, _owner("alive", host=socket.gethostname(), pid=1), ttl_s=600)
    with pytest.raises(LeaseHeldError, match="pid 1, "):
        Lease.acquire(output, _owner("second"), ttl_s=60)


def test_unreadable_lease_file_is_replaced(output):
    _write(output, {"garbage": True})
    Lease.acquire(output, _owner("fresh"), ttl_s=60).release()


def test_heartbeat_extends_expiry_and_context_releases(output):
    with Lease.acquire(output, _owner("beating"), ttl_s=1.2) as lease:
        first = lease.expires_at
        time.sleep(1.5)  # past the first expiry: renewed every 0.4 s
        lease.check()
        assert lease.expires_at > first + 0.3
        assert _read(output)["expires_at"] > first
        with pytest.raises(LeaseHeldError):
            Lease.acquire(output, _owner("other"), ttl_s=60)
    assert _read(output) is None


def test_heartbeat_records_a_stolen_lease(output):
    lease = Lease.acquire(output, _owner("victim"), ttl_s=0.6)
    lease.start_heartbeat()
    _write(output, {"owner": vars(_owner("thief")), "token": "x", "expires_at": time.time() + 60})
    deadline = time.time() + 5
    while lease._lost is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(LeaseLostError, match="run thief"):
        lease.check()
    lease.stop_heartbeat()
    lease.release()
    assert _read(output)["owner"]["run"] == "thief"


def test_racing_takers_on_an_expired_lease_one_wins(output):
    Lease.acquire(output, _owner("expired"), ttl_s=0.05)
    time.sleep(0.1)
    takers = 6
    barrier = threading.Barrier(takers)
    won, refused, other = [], [], []

    def take(i: int) -> None:
        barrier.wait()
        try:
            won.append(Lease.acquire(output, _owner(f"taker-{i}"), ttl_s=60))
        except LeaseHeldError as err:
            refused.append(err)
        except Exception as err:  # reported below
            other.append(err)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(takers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not other, other
    assert len(won) == 1 and len(refused) == takers - 1
    assert _read(output)["owner"]["run"] == won[0].owner.run
    won[0].renew()
    won[0].release()


def test_owner_job_from_ray_environment(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    assert ray_job_id() == "02000000"
    config = {"metadata": {"job_submission_id": "raysubmit_abc"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(config))
    owner = LeaseOwner.current("r")
    assert owner.job == "raysubmit_abc" and owner.host == socket.gethostname()
    assert owner.started.endswith("+00:00")


def test_credentials_never_in_messages(tmp_path):
    from pipeline.encode.lease import _safe

    assert _safe("s3://key:secret@bucket/out") == "s3://bucket/out"
    assert _safe(str(tmp_path)) == str(tmp_path)
