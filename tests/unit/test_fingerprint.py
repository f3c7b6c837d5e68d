"""Input shard fingerprints: a rewrite under the same name is seen, an unchanged shard is equal."""

import json
import os
import time
import uuid

import fsspec
import pytest
from fsspec.core import url_to_fs

from pipeline.data.fingerprint import describe_change, fingerprint_of, input_fingerprints


def _write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _rewrite_in_place(path, data: bytes) -> None:
    """Rewrite after the file system's clock has ticked (mtime granularity is a few ms)."""
    before = os.stat(path).st_mtime_ns
    for _ in range(100):
        time.sleep(0.01)
        _write(path, data)
        if os.stat(path).st_mtime_ns != before:
            return
    raise AssertionError("mtime never moved")


def test_local_unchanged_is_equal_and_single_matches_listing(tmp_path):
    urls = [str(tmp_path / f"s-{i}.tar") for i in range(3)]
    for i, url in enumerate(urls):
        _write(url, bytes([i]) * 100)
    first = input_fingerprints(urls)
    assert list(first) == urls
    assert first == input_fingerprints(urls)
    assert json.loads(json.dumps(first)) == first
    assert all(fingerprint_of(url) == first[url] for url in urls)
    assert set(first[urls[0]]) == {"size", "mtime_ns", "ino"} and first[urls[0]]["size"] == 100


def test_local_rewrite_with_same_size_changes(tmp_path):
    url = str(tmp_path / "s.tar")
    _write(url, b"a" * 64)
    before = input_fingerprints([url])[url]
    _rewrite_in_place(url, b"b" * 64)
    after = input_fingerprints([url])[url]
    assert before != after and before["size"] == after["size"]
    assert "mtime_ns" in describe_change(before, after)

    # A replace by rename (how most tools rewrite) brings a new inode even within one clock tick.
    tmp = tmp_path / "s.tar.tmp"
    _write(tmp, b"c" * 64)
    os.replace(tmp, url)
    assert input_fingerprints([url])[url] != after


def test_local_touched_mtime_changes(tmp_path):
    url = str(tmp_path / "s.tar")
    _write(url, b"a" * 10)
    before = fingerprint_of(url)
    st = os.stat(url)
    os.utime(url, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert fingerprint_of(url) != before


def test_order_kept_across_directories_and_relative_paths(tmp_path, monkeypatch):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for i in range(2):
            _write(tmp_path / sub / f"{i}.tar", b"x" * (i + 1))
    monkeypatch.chdir(tmp_path)
    urls = ["b/1.tar", "a/0.tar", "b/0.tar", str(tmp_path / "a" / "1.tar")]
    result = input_fingerprints(urls)
    assert list(result) == urls
    assert [fp["size"] for fp in result.values()] == [2, 1, 1, 2]


def test_missing_shard_is_named(tmp_path):
    _write(tmp_path / "a.tar", b"x")
    missing = str(tmp_path / "gone.tar")
    with pytest.raises(FileNotFoundError, match="gone.tar"):
        input_fingerprints([str(tmp_path / "a.tar"), missing])
    with pytest.raises(FileNotFoundError, match="nodir"):
        input_fingerprints([str(tmp_path / "nodir" / "a.tar")])
    with pytest.raises(FileNotFoundError):
        fingerprint_of(missing)


def test_memory_rewrite_same_size_changes_and_listing_used(monkeypatch):
    root = f"memory://fp-{uuid.uuid4().hex}"
    urls = [f"{root}/d{i % 2}/s-{i:03d}.tar" for i in range(50)]
    for url in urls:
        with fsspec.open(url, "wb") as f:
            f.write(b"a" * 32)
    fs, _ = url_to_fs(root)
    calls = {"ls": 0, "info": 0}
    real_ls, real_info = fs.ls, fs.info

    def ls(*args, **kwargs):
        calls["ls"] += 1
        return real_ls(*args, **kwargs)

    def info(*args, **kwargs):
        calls["info"] += 1
        return real_info(*args, **kwargs)

    monkeypatch.setattr(fs, "ls", ls)
    monkeypatch.setattr(fs, "info", info)
    before = input_fingerprints(urls)
    assert calls == {"ls": 2, "info": 0}  # two directories, no per-shard request
    monkeypatch.undo()

    assert set(before[urls[0]]) == {"size", "sha256"}
    assert fingerprint_of(urls[7]) == before[urls[7]]
    fs.pipe_file(urls[7], b"b" * 32)  # same name, same size, within the same microsecond or not
    after = input_fingerprints(urls)
    assert after[urls[7]] != before[urls[7]]
    assert all(after[u] == before[u] for u in urls if u != urls[7])


def test_describe_change_text():
    old = {"size": 1200, "etag": "a1b2c3d4e5f6a7b8c9d0"}
    new = {"size": 1300, "etag": "b2c3d4e5f6a7b8c9d0e1"}
    assert describe_change(old, new) == "size 1200 -> 1300, etag a1b2c3d4e5.. -> b2c3d4e5f6.."
    assert describe_change(old, dict(old)) == "unchanged"
    assert describe_change({"size": 1}, {"size": 1, "sha256": "ab"}) == "sha256 none -> ab"
    text = describe_change({"mtime_ns": 0}, {"mtime_ns": 1_500_000_000})
    assert text == "mtime_ns 1970-01-01T00:00:00.000000Z -> 1970-01-01T00:00:01.500000Z"


def test_s3_rewrite_changes_etag_and_listing_used(s3_server, monkeypatch):
    _, bucket = s3_server
    root = f"s3://{bucket}/fp-{uuid.uuid4().hex}"
    fs, _ = url_to_fs(root)
    urls = [f"{root}/d{i % 2}/s-{i:03d}.tar" for i in range(50)]
    fs.pipe({url: b"a" * 32 for url in urls})

    calls: dict[str, int] = {}
    real_call = fs._call_s3

    async def counting(method, *args, **kwargs):
        calls[method] = calls.get(method, 0) + 1
        return await real_call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", counting)
    before = input_fingerprints(urls)
    assert calls == {"list_objects_v2": 2}  # one listing per directory, no HEAD per shard
    monkeypatch.undo()

    assert set(before[urls[0]]) == {"size", "etag"} and '"' not in before[urls[0]]["etag"]
    assert fingerprint_of(urls[3]) == before[urls[3]]  # HEAD agrees with the listing
    assert input_fingerprints(urls) == before
    fs.pipe_file(urls[3], b"b" * 32)
    after = input_fingerprints(urls)
    assert after[urls[3]]["etag"] != before[urls[3]]["etag"]
    assert fingerprint_of(urls[3]) == after[urls[3]]
    assert all(after[u] == before[u] for u in urls if u != urls[3])
    with pytest.raises(FileNotFoundError, match="s-999.tar"):
        input_fingerprints([f"{root}/d0/s-999.tar"])
