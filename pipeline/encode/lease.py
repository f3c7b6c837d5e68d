"""An exclusive, expiring lease on an encode output: two jobs never write one output at once.

The lease is ``{output}/_encode/lease.json``::

    {"owner": {"run", "host", "pid", "job", "started"}, "token": <random, this Lease object>,
     "host_id": <boot id / pid namespace>, "expires_at": <epoch s>, "ttl_s": <s>}

Every change is a compare-and-swap, so two jobs racing for a free or expired lease end with
exactly one holder and the other gets `LeaseHeldError`:

* local disk: every operation runs under ``fcntl.flock`` on ``_encode/lease.lock``; a new lease is
  created with ``open(..., "xb")`` (O_EXCL), a renewal or takeover replaces the file by rename.
* s3://: conditional PUT. s3fs 2026.9's ``pipe_file(mode="create")`` sends ``If-None-Match: *``
  (and maps the 412 to FileExistsError); renewal, takeover and release need ``If-Match: <etag>``,
  which s3fs has no mode for, so this module calls PutObject / DeleteObject itself through
  ``S3FileSystem.call_s3`` with ``IfNoneMatch="*"`` / ``IfMatch=etag``. AWS S3 honours both (since
  2024), and so does moto 5.2.5, which the tests run against.
* any other store (memory://, GCS, ...): write, then read back and compare, under a lock that is
  only process-wide. That is exact for memory:// (one process) and best effort elsewhere.

A holder renews its lease every ``ttl_s / 3`` from a heartbeat thread. A crashed job stops
renewing, so its lease expires; one on this host whose process is gone is stale at once (a
SIGKILLed job re-run on the same machine must not wait). Expiry compares wall clocks, so hosts
sharing an output need clocks in sync to well within ``ttl_s``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields

from fsspec.asyn import sync
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger("pipeline.encode.job")

LEASE_FILE = "_encode/lease.json"
_LOCK_FILE = "_encode/lease.lock"
_ATTEMPTS = 8  # rounds of create / judge / take over before giving up on a lease that churns
_RETRY_FLOOR_S = 0.05


class LeaseHeldError(RuntimeError):
    """Another live job holds the lease on this output."""


class LeaseLostError(RuntimeError):
    """Our lease was taken over or could not be renewed: this job must stop writing."""


class _Conflict(Exception):
    """The lease file is not the version a compare-and-swap expected (internal)."""


@dataclass
class LeaseOwner:
    """Who holds a lease: enough for a person to find the job (and its Ray job) and stop it."""

    run: str
    host: str
    pid: int
    job: str
    started: str

    @classmethod
    def current(cls, run: str, job: str | None = None) -> LeaseOwner:
        """This process as an owner; `job` defaults to the Ray job (submission) id, if any."""
        return cls(
            run=run,
            host=socket.gethostname(),
            pid=os.getpid(),
            job=ray_job_id() if job is None else job,
            started=_iso(time.time()),
        )

    @classmethod
    def from_dict(cls, data: dict) -> LeaseOwner:
        values = {f.name: data.get(f.name) for f in fields(cls)}
        values["pid"] = int(values["pid"] or 0)
        return cls(**{k: "" if v is None else v for k, v in values.items()})

    def describe(self) -> str:
        ray_job = f" (Ray job {self.job})" if self.job else ""
        return f"run {self.run} on host {self.host} pid {self.pid}{ray_job}, started {self.started}"


def ray_job_id() -> str:
    """The Ray job submission id (what `ray job stop` takes), else the Ray job id, else ""."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if config:
        with contextlib.suppress(ValueError, AttributeError):
            submission = json.loads(config).get("metadata", {}).get("job_submission_id")
            if submission:
                return str(submission)
    if os.environ.get("RAY_JOB_ID"):
        return os.environ["RAY_JOB_ID"]
    ray = sys.modules.get("ray")  # only when the caller already uses Ray: never import it here
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        with contextlib.suppress(Exception):
            return ray.get_runtime_context().get_job_id()
    return ""


class Lease:
    """A held lease on `output`; get one with `Lease.acquire` (or ``with Lease.acquire(...)``)."""

    def __init__(self, output: str, owner: LeaseOwner, ttl_s: float):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        self.output = output.rstrip("/")
        self.url = f"{self.output}/{LEASE_FILE}"
        self.owner = owner
        self.ttl_s = float(ttl_s)
        self.expires_at = 0.0
        self.token = uuid.uuid4().hex
        self._store = _store_for(self.output)
        self._version: object = None
        self._lock = threading.RLock()
        self._released = False
        self._lost: LeaseLostError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, output: str, owner: LeaseOwner, ttl_s: float = 120.0) -> Lease:
        """Take the lease on `output`, or raise LeaseHeldError naming the job that holds it."""
        lease = cls(output, owner, ttl_s)
        lease._take()
        return lease

    def renew(self) -> None:
        """Push our expiry ``ttl_s`` ahead; LeaseLostError if the file no longer names us."""
        with self._lock:
            if self._released:
                raise LeaseLostError(f"the lease on {_safe(self.output)} was released")
            try:
                self._renew()
            except LeaseLostError as err:
                self._lost = err  # `check` keeps saying so
                raise

    def _renew(self) -> None:
        for _ in range(2):
            payload, expires_at = self._payload()
            try:
                self._version = self._store.replace(payload, self._version)
            except _Conflict:
                self._adopt_or_lose()  # a retried write of ours can change the version
                continue
            self.expires_at = expires_at
            return
        raise self._lost_error(self._store.read())

    def release(self) -> None:
        """Delete the lease if it is still ours; leave another job's lease alone."""
        self.stop_heartbeat()
        with self._lock:
            if self._released:
                return
            for _ in range(2):
                try:
                    self._store.delete(self._version)
                    log.info("lease on %s released", _safe(self.output))
                    break
                except _Conflict:
                    if not self._adopt():
                        log.warning("lease on %s is no longer ours: left alone", _safe(self.output))
                        break
            self._released = True

    def start_heartbeat(self) -> None:
        """Renew every ``ttl_s / 3`` from a daemon thread; a loss is kept for `check`."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._thread = None

    def check(self) -> None:
        """Raise LeaseLostError if the lease was lost or ran out: stop writing the output."""
        if self._lost is not None:
            raise self._lost
        if not self._released and time.time() >= self.expires_at:
            raise LeaseLostError(
                f"our lease on {_safe(self.output)} expired at {_iso(self.expires_at)} without "
                "being renewed; another job may have taken the output over"
            )

    def __enter__(self) -> Lease:
        self.start_heartbeat()
        return self

    def __exit__(self, *exc_info) -> bool:
        self.stop_heartbeat()
        if self._lost is None:
            try:
                self.release()
            except Exception as err:  # the lease then expires on its own; do not mask the exit
                log.warning(
                    "lease on %s not released (%s: %s)", _safe(self.output), type(err).__name__, err
                )
        return False

    # -- taking the lease ---------------------------------------------------------------

    def _take(self) -> None:
        for _ in range(_ATTEMPTS):
            payload, expires_at = self._payload()
            try:
                self._version = self._store.create(payload)
            except FileExistsError:
                if self._take_over():
                    return
                continue
            self._confirm(expires_at)
            log.info("lease on %s taken (ttl %.0f s)", _safe(self.output), self.ttl_s)
            return
        raise LeaseHeldError(
            f"could not take the lease on {_safe(self.output)}: it changed hands {_ATTEMPTS} "
            "times while we tried; another encode job is starting on this output"
        )

    def _take_over(self) -> bool:
        """Replace a stale lease with ours; False to retry (the lease changed meanwhile)."""
        current = self._store.read()
        if current is None:
            return False  # released between our create and our read
        body, version = current
        held = _parse(body)
        if held is not None and held.get("token") == self.token:
            self._version = version  # our own create, answered late (a retried PUT)
            self._confirm(float(held["expires_at"]))
            return True
        reason = _stale_reason(held)
        if reason is None:
            raise self._held_error(held)
        payload, expires_at = self._payload()
        try:
            self._version = self._store.replace(payload, version)
        except _Conflict:
            return False  # someone else changed it first: look again
        self._confirm(expires_at)
        previous = LeaseOwner.from_dict(held["owner"]).describe() if held else "unreadable file"
        log.warning("lease on %s taken over (%s): was %s", _safe(self.output), reason, previous)
        return True

    def _confirm(self, expires_at: float) -> None:
        """Read the lease back: it must be ours, or another taker won the race."""
        current = self._store.read()
        held = _parse(current[0]) if current else None
        if held is None or held.get("token") != self.token:
            raise self._held_error(held)
        self._version = current[1]
        self.expires_at = expires_at

    def _payload(self) -> tuple[bytes, float]:
        expires_at = time.time() + self.ttl_s
        record = {
            "owner": asdict(self.owner),
            "token": self.token,
            "host_id": _host_id(),
            "expires_at": expires_at,
            "ttl_s": self.ttl_s,
        }
        return json.dumps(record, indent=2, sort_keys=True).encode(), expires_at

    def _held_error(self, held: dict | None) -> LeaseHeldError:
        if held is None:
            return LeaseHeldError(
                f"another encode job is taking the lease on {_safe(self.output)} right now; "
                "wait for it to finish"
            )
        owner = LeaseOwner.from_dict(held.get("owner") or {})
        expires_at = float(held.get("expires_at", 0))
        left = max(0.0, expires_at - time.time())
        return LeaseHeldError(
            f"another encode job is writing {_safe(self.output)}: {owner.describe()}; its lease "
            f"expires at {_iso(expires_at)} (in {left:.0f} s) unless it renews it. Wait for it "
            "to finish, or if that job is gone, re-run after the lease expires"
        )

    # -- keeping it -----------------------------------------------------------------------

    def _adopt(self) -> bool:
        """If the lease file still holds our token, take its version as ours."""
        current = self._store.read()
        held = _parse(current[0]) if current else None
        if held is not None and held.get("token") == self.token:
            self._version = current[1]
            return True
        return False

    def _adopt_or_lose(self) -> None:
        current = self._store.read()
        held = _parse(current[0]) if current else None
        if held is None or held.get("token") != self.token:
            raise self._lost_error(current)
        self._version = current[1]

    def _lost_error(self, current) -> LeaseLostError:
        held = _parse(current[0]) if current else None
        if held is None:
            now = "it is gone"
        else:
            now = "it now names " + LeaseOwner.from_dict(held.get("owner") or {}).describe()
        return LeaseLostError(
            f"lost the lease on {_safe(self.output)} ({now}); this job must stop writing it"
        )

    def _beat(self) -> None:
        interval = self.ttl_s / 3
        wait = interval
        while not self._stop.wait(wait):
            try:
                self.renew()
                wait = interval
            except LeaseLostError as err:
                self._lost = err
                log.error("%s", err)
                return
            except Exception as err:  # a transient store error: retry until the lease runs out
                left = self.expires_at - time.time()
                if left <= 0:
                    self._lost = LeaseLostError(
                        f"could not renew the lease on {_safe(self.output)} before it expired "
                        f"({type(err).__name__}: {err}); this job must stop writing it"
                    )
                    log.error("%s", self._lost)
                    return
                wait = max(_RETRY_FLOOR_S, min(interval, left / 3))
                log.warning(
                    "lease renewal failed (%s); retrying in %.1f s", type(err).__name__, wait
                )


def _parse(body: bytes) -> dict | None:
    """The lease record, or None for a file that is not one (a torn write of a dead job)."""
    try:
        held = json.loads(body)
        float(held["expires_at"])
    except (ValueError, TypeError, KeyError):
        return None
    return held if isinstance(held, dict) and isinstance(held.get("owner"), dict) else None


def _stale_reason(held: dict | None) -> str | None:
    """Why a lease no longer protects anything (expired, its process gone), or None if live."""
    if held is None:
        return "the lease file is unreadable"
    expires_at = float(held["expires_at"])
    if expires_at <= time.time():
        return f"it expired at {_iso(expires_at)}"
    owner = LeaseOwner.from_dict(held["owner"])
    same_host = owner.host == socket.gethostname() and held.get("host_id", _host_id()) == _host_id()
    if same_host and not _pid_alive(owner.pid):
        return f"its process {owner.pid} on this host is gone"
    return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown: assume alive and let the lease expire
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")  # a zombie no longer writes
    except (OSError, IndexError):
        return True


_HOST_ID: str | None = None


def _host_id() -> str:
    """Boot id and pid namespace: a pid only means something where both are the same."""
    global _HOST_ID
    if _HOST_ID is None:
        parts = []
        with contextlib.suppress(OSError):
            with open("/proc/sys/kernel/random/boot_id") as f:
                parts.append(f.read().strip())
        with contextlib.suppress(OSError):
            parts.append(os.readlink("/proc/self/ns/pid"))
        _HOST_ID = "/".join(parts)
    return _HOST_ID


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds")


def _safe(url: str) -> str:
    """`url` without any user:password@ part, for messages and logs."""
    return re.sub(r"(://)[^/@]*@", r"\1", url)


# -- stores: create / read / compare-and-swap of one small file ------------------------------


def _store_for(output: str):
    fs, path = url_to_fs(output)
    if isinstance(fs, LocalFileSystem):
        return _LocalStore(path)
    if "s3" in _protocols(fs) and hasattr(fs, "call_s3"):
        return _S3Store(fs, f"{path}/{LEASE_FILE}")
    return _FsStore(fs, f"{path}/{LEASE_FILE}")


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


class _LocalStore:
    """Local disk: flock serialises every step across processes (and threads: one fd each)."""

    def __init__(self, output_path: str):
        self.path = os.path.join(output_path, LEASE_FILE)
        self.lock_path = os.path.join(output_path, _LOCK_FILE)

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> tuple[bytes, bytes] | None:
        with self._locked():
            return self._read()

    def _read(self) -> tuple[bytes, bytes] | None:
        try:
            with open(self.path, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None
        return body, body

    def create(self, data: bytes) -> bytes:
        with self._locked(), open(self.path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return data

    def replace(self, data: bytes, version) -> bytes:
        with self._locked():
            current = self._read()
            if current is None or current[1] != version:
                raise _Conflict
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return data

    def delete(self, version) -> None:
        with self._locked():
            current = self._read()
            if current is None or current[1] != version:
                raise _Conflict
            os.unlink(self.path)


class _S3Store:
    """S3: conditional PutObject / DeleteObject; the version is the object's ETag."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.path = path
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[bytes, str] | None:
        try:
            return sync(self.fs.loop, self._get)
        except FileNotFoundError:
            return None

    async def _get(self) -> tuple[bytes, str]:
        # Body and ETag from one GET: a HEAD then a GET could pair new content with an old ETag.
        resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        async with resp["Body"] as stream:
            body = await stream.read()
        return body, resp["ETag"]

    def create(self, data: bytes) -> str:
        try:
            return self._put(data, IfNoneMatch="*")
        except OSError as err:
            if _s3_code(err) == "ConditionalRequestConflict":  # a concurrent conditional write
                raise FileExistsError(self.path) from err
            raise

    def replace(self, data: bytes, version) -> str:
        try:
            return self._put(data, IfMatch=version)
        except OSError as err:
            _raise_conflict(err)
            raise

    def delete(self, version) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except OSError as err:
            _raise_conflict(err)
            raise
        finally:
            self.fs.invalidate_cache(self.path)

    def _put(self, data: bytes, **condition) -> str:
        try:
            resp = self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition
            )
        finally:
            self.fs.invalidate_cache(self.path)
        return resp["ETag"]


def _s3_code(err: BaseException) -> str | None:
    """The S3 error code behind an s3fs exception (s3fs keeps botocore's error as the cause)."""
    response = getattr(err.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code")


def _raise_conflict(err: OSError) -> None:
    if isinstance(err, FileNotFoundError) or _s3_code(err) in (
        "PreconditionFailed",
        "ConditionalRequestConflict",
        "NoSuchKey",
    ):
        raise _Conflict from err


_FS_LOCK = threading.Lock()


class _FsStore:
    """Other stores: no conditional writes here, so write, read back and compare.

    The lock covers this process only: exact for memory://, best effort across machines.
    """

    def __init__(self, fs, path: str):
        self.fs = fs
        self.path = path

    def read(self) -> tuple[bytes, bytes] | None:
        self.fs.invalidate_cache(self.path)
        try:
            body = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return body, body

    def create(self, data: bytes) -> bytes:
        with _FS_LOCK:
            try:
                self.fs.pipe_file(self.path, data, mode="create")
            except TypeError:  # a backend without modes: check, then write
                if self.read() is not None:
                    raise FileExistsError(self.path) from None
                self.fs.pipe_file(self.path, data)
            try:
                return self._read_back(data)
            except _Conflict:  # another process wrote between our check and our write
                raise FileExistsError(self.path) from None

    def replace(self, data: bytes, version) -> bytes:
        with _FS_LOCK:
            current = self.read()
            if current is None or current[1] != version:
                raise _Conflict
            self.fs.pipe_file(self.path, data)
            return self._read_back(data)

    def delete(self, version) -> None:
        with _FS_LOCK:
            current = self.read()
            if current is None or current[1] != version:
                raise _Conflict
            self.fs.rm_file(self.path)

    def _read_back(self, data: bytes) -> bytes:
        current = self.read()
        if current is None or current[1] != data:
            raise _Conflict
        return data
