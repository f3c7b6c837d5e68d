"""Turn a user's shard specification into an explicit, ordered list of shard URLs.

Accepted forms (any fsspec URL or local path):
  * brace pattern       ``s3://bucket/train-{000000..000009}.tar``
  * comma-separated     ``a.tar,b.tar`` (each item may itself be a pattern or a directory)
  * glob                ``/data/train-*.tar``
  * directory           uses its ``index.json`` (shards in index order), else its sorted ``*.tar``
Every shard is checked to exist (one listing per directory, not one request per shard), so a
typo fails fast with a message naming what is missing.
"""

from __future__ import annotations

import json
import os
import posixpath

import braceexpand
import fsspec
from fsspec.core import url_to_fs

INDEX_FILE = "index.json"
_GLOB_CHARS = "*?["
_MAX_NAMES_IN_ERROR = 5


def expand_shard_urls(spec: str) -> list[str]:
    """Expand `spec` into shard URLs, in order; raise FileNotFoundError if any is missing."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("shard spec is empty: give a directory, a brace pattern or a list of .tar")
    urls: list[str] = []
    for part in _split_top_level(spec):
        urls.extend(_expand_part(part))
    if not urls:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return urls


def _split_top_level(spec: str) -> list[str]:
    """Split on commas that are not inside ``{...}`` (braces use commas for alternatives)."""
    parts, depth, current = [], 0, []
    for char in spec:
        if char == "{":
            depth += 1
        elif char == "}":
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand_part(part: str) -> list[str]:
    candidates = list(braceexpand.braceexpand(part))
    if len(candidates) == 1:
        single = candidates[0]
        if any(c in single for c in _GLOB_CHARS):
            return _expand_glob(single)
        fs, path = url_to_fs(single)
        if fs.isdir(path):
            return _expand_directory(single)
    _check_exist(candidates)
    return candidates


def _expand_glob(pattern: str) -> list[str]:
    fs, path = url_to_fs(pattern)
    matches = sorted(m for m in fs.glob(path) if fs.isfile(m))
    if not matches:
        raise FileNotFoundError(f"no shards match the pattern {pattern!r}")
    # Rebuild URLs from the user's own prefix so protocol and style (relative path, s3://)
    # survive: swap the pattern's static directory for the matching part of each path.
    url_static, path_static = _static_dir(pattern), _static_dir(path)
    return [url_static + m[len(path_static) :] for m in matches]


def _static_dir(pattern: str) -> str:
    """Prefix of `pattern` up to the last '/' before its first glob character."""
    first_glob = min(i for i in (pattern.find(c) for c in _GLOB_CHARS) if i >= 0)
    return pattern[: pattern.rfind("/", 0, first_glob) + 1]


def _url_dir(url: str) -> str:
    """The part of `url` up to and including its last '/', or '' for a bare file name."""
    cut = url.rfind("/")
    return url[: cut + 1] if cut >= 0 else ""


def _expand_directory(dir_url: str) -> list[str]:
    fs, path = url_to_fs(dir_url)
    base = dir_url.rstrip("/") + "/"
    fs.invalidate_cache(path)
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    if INDEX_FILE in names:
        shard_names = read_index_shard_names(dir_url)
        urls = [base + name for name in shard_names]
        _check_exist(urls)
        return urls
    tars = sorted(n for n in names if n.endswith(".tar") and not n.startswith("."))
    if not tars:
        raise FileNotFoundError(f"directory {dir_url!r} has no {INDEX_FILE} and no *.tar shards")
    return [base + name for name in tars]


def read_index_shard_names(dir_url: str) -> list[str]:
    """Shard file names listed in ``{dir_url}/index.json``, validated to stay inside the dir."""
    index_url = dir_url.rstrip("/") + "/" + INDEX_FILE
    with fsspec.open(index_url, "rt", encoding="utf-8") as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{index_url} is not valid JSON: {err}") from err
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list):
        raise ValueError(f"{index_url} has no 'shards' list")
    names = []
    for entry in shards:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _is_safe_relative(name):
            raise ValueError(f"{index_url} lists an invalid shard name: {entry!r}")
        names.append(name)
    return names


def _is_safe_relative(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts and "" not in parts


def _check_exist(urls: list[str]) -> None:
    """Raise FileNotFoundError naming the URLs that do not exist (one listing per directory)."""
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        by_dir.setdefault(_url_dir(url), []).append(url)
    missing = []
    for dir_url, members in by_dir.items():
        present = _list_names(dir_url or ".")
        missing.extend(u for u in members if u[len(dir_url) :] not in present)
    if missing:
        shown = ", ".join(missing[:_MAX_NAMES_IN_ERROR])
        more = f" (and {len(missing) - _MAX_NAMES_IN_ERROR} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} shard(s) not found: {shown}{more}")


def _list_names(dir_url: str) -> set[str]:
    fs, path = url_to_fs(dir_url)
    fs.invalidate_cache(path)  # listings may be cached from before the shards were written
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return set()
    return {posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] != "directory"}


def absolute_spec(spec: str) -> str:
    """Make the local relative paths in a spec absolute; URLs with a scheme pass through.

    Ray workers do not share the driver's working directory, so every path that crosses to a
    worker must be absolute. Comma lists and brace patterns keep their shape.
    """
    if not spec:
        return spec
    parts = []
    for part in _split_top_level(spec):
        local = "://" not in part
        parts.append(os.path.abspath(os.path.expanduser(part)) if local else part)
    return ",".join(parts)
