"""Fingerprints of input shards: what changes when a shard is rewritten under the same name.

Each encode unit records its input shard's fingerprint, so a re-run can tell that a shard changed
under the same URL and re-encode it instead of keeping stale latents. Equal dicts mean unchanged.
What each store offers, and so what goes into the dict (always with ``"size"``):

* local disk: ``"mtime_ns"`` and ``"ino"`` (a rewrite in place moves the mtime, a replace by
  rename brings a new inode). Granularity is the file system's clock tick (a few ms on ext4).
* S3: ``"etag"`` (quotes stripped); it changes whenever the content does.
* GCS: ``"generation"`` (new on every write), ``"etag"`` and ``"md5"``.
* memory://: ``"sha256"`` of the content. Its ``created`` is set when a file object is opened,
  at microsecond resolution, and an append keeps it, so it can miss a rewrite.
* any other store: its etag if it has one, else its modification time (``"mtime"``), else
  ``"sha256"`` of the content.

A corpus can hold a million shards, so `input_fingerprints` makes one listing per directory
(the backend paginates it) instead of one request per shard.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import posixpath

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

# Keys a listing may carry for an object's modification time, in order of preference.
_TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")
_HASH_BLOCK = 8 << 20
_SHORT = 10  # characters of a hash shown by describe_change


def input_fingerprints(urls: list[str]) -> dict[str, dict]:
    """Fingerprint of every shard URL, in input order, from one listing per directory.

    Raises FileNotFoundError naming the first URL its directory listing does not hold.
    """
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for url in urls:
        fs, path = url_to_fs(url)
        parent = os.path.dirname(path) if _is_local(fs) else posixpath.dirname(path)
        groups.setdefault((fs, parent), []).append((url, path))
    found: dict[str, dict] = {}
    for (fs, parent), members in groups.items():
        if _is_local(fs):
            found.update(_local_group(parent, members))
        else:
            found.update(_listed_group(fs, parent, members))
    return {url: found[url] for url in urls}


def fingerprint_of(url: str) -> dict:
    """Fingerprint of one shard, the same dict `input_fingerprints` gives for it."""
    fs, path = url_to_fs(url)
    if _is_local(fs):
        return _local_fingerprint(os.stat(path))
    fs.invalidate_cache(path)  # a cached listing would hide a rewrite
    entry = fs.info(path)
    if entry.get("type") == "directory":
        raise IsADirectoryError(f"input shard {url} is a directory")
    return _from_entry(fs, path, entry)


def describe_change(old: dict, new: dict) -> str:
    """Short text of what differs: ``"size 1200 -> 1300, etag a1b2c3d4e5.. -> 9f8e7d6c5b.."``."""
    keys = list(old) + [k for k in new if k not in old]
    parts = []
    for key in keys:
        before, after = old.get(key), new.get(key)
        if before != after:
            parts.append(f"{key} {_show(key, before)} -> {_show(key, after)}")
    return ", ".join(parts) if parts else "unchanged"


def _is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def _local_group(parent: str, members: list[tuple[str, str]]) -> dict[str, dict]:
    """One scandir of `parent`; stat only the entries asked for (cheap on NFS: READDIRPLUS)."""
    wanted: dict[str, list[str]] = {}
    for url, path in members:
        wanted.setdefault(os.path.basename(path), []).append(url)
    out: dict[str, dict] = {}
    try:
        with os.scandir(parent or ".") as entries:
            for entry in entries:
                if entry.name in wanted and entry.is_file():
                    fingerprint = _local_fingerprint(entry.stat())
                    out.update({url: fingerprint for url in wanted[entry.name]})
    except FileNotFoundError:
        pass
    _raise_missing(members, out)
    return out


def _local_fingerprint(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _listed_group(fs, parent: str, members: list[tuple[str, str]]) -> dict[str, dict]:
    """One (paginated) listing of `parent` for all its shards; no request per shard."""
    fs.invalidate_cache(parent)  # the listing may be cached from before a rewrite
    try:
        entries = fs.ls(parent, detail=True)
    except FileNotFoundError:
        entries = []
    by_name = {
        posixpath.basename(e["name"].rstrip("/")): e
        for e in entries
        if e.get("type") != "directory"
    }
    fs.invalidate_cache(parent)  # do not keep a million-entry listing alive in the dircache
    out = {}
    for url, path in members:
        entry = by_name.get(posixpath.basename(path))
        if entry is not None:
            out[url] = _from_entry(fs, path, entry)
    _raise_missing(members, out)
    return out


def _raise_missing(members: list[tuple[str, str]], found: dict) -> None:
    missing = [url for url, _ in members if url not in found]
    if missing:
        more = f" (and {len(missing) - 1} more in the same directory)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"input shard not found: {missing[0]}{more}")


def _from_entry(fs, path: str, entry: dict) -> dict:
    """The fingerprint from a listing or info entry; the same fields whichever gave it."""
    size = entry.get("size")
    if size is None:  # some stores (HTTP) list names without sizes
        size = fs.info(path)["size"]
    fingerprint = {"size": int(size)}
    if isinstance(fs, MemoryFileSystem):
        return {**fingerprint, "sha256": _sha256(fs, path)}
    etag = entry.get("ETag", entry.get("etag"))
    if etag:
        fingerprint["etag"] = str(etag).strip('"')
    if entry.get("generation") is not None:
        fingerprint["generation"] = str(entry["generation"])
    md5 = entry.get("md5Hash", entry.get("md5"))
    if md5:
        fingerprint["md5"] = str(md5)
    if len(fingerprint) > 1:
        return fingerprint
    for key in _TIME_KEYS:
        if entry.get(key) is not None:
            return {**fingerprint, "mtime": _jsonable_time(entry[key])}
    return {**fingerprint, "sha256": _sha256(fs, path)}


def _jsonable_time(value) -> float | str:
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return value if isinstance(value, int | float) else str(value)


def _sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _show(key: str, value) -> str:
    if value is None:
        return "none"
    if key == "mtime_ns" and isinstance(value, int):
        moment = dt.datetime.fromtimestamp(value / 1e9, dt.timezone.utc)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    text = str(value)
    return text[:_SHORT] + ".." if len(text) > _SHORT + 2 else text
