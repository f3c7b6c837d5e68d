"""expand_shard_urls: brace patterns, lists, globs, directories with/without index.json."""

import json

import fsspec
import pytest

from pipeline.data.urls import expand_shard_urls


def _touch(fs, path):
    with fs.open(path, "wb") as f:
        f.write(b"x")


@pytest.fixture
def shard_dir(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:06d}.tar").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a shard")
    return tmp_path


def test_brace_pattern(shard_dir):
    urls = expand_shard_urls(f"{shard_dir}/s-{{000000..000002}}.tar")
    assert urls == [f"{shard_dir}/s-{i:06d}.tar" for i in range(3)]


def test_brace_pattern_missing_names_shards(shard_dir):
    with pytest.raises(FileNotFoundError, match="s-000003.tar"):
        expand_shard_urls(f"{shard_dir}/s-{{000000..000003}}.tar")


def test_comma_list_and_glob(shard_dir):
    spec = f"{shard_dir}/s-000002.tar, {shard_dir}/s-{{000000,000001}}.tar"
    assert expand_shard_urls(spec) == [f"{shard_dir}/s-{i:06d}.tar" for i in (2, 0, 1)]
    assert expand_shard_urls(f"{shard_dir}/s-*.tar") == [
        f"{shard_dir}/s-{i:06d}.tar" for i in range(3)
    ]


def test_glob_with_wildcard_directory(tmp_path):
    for part in ("p1", "p2"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "x-0.tar").write_bytes(b"x")
    assert expand_shard_urls(f"{tmp_path}/p*/x-*.tar") == [
        f"{tmp_path}/p1/x-0.tar",
        f"{tmp_path}/p2/x-0.tar",
    ]


def test_directory_without_index_lists_sorted_tars(shard_dir):
    assert expand_shard_urls(str(shard_dir)) == [f"{shard_dir}/s-{i:06d}.tar" for i in range(3)]
    assert expand_shard_urls(f"file://{shard_dir}/")[0] == f"file://{shard_dir}/s-000000.tar"


def test_directory_index_order_and_validation(shard_dir):
    index = {"shards": [{"name": "s-000001.tar"}, {"name": "s-000000.tar"}]}
    (shard_dir / "index.json").write_text(json.dumps(index))
    assert expand_shard_urls(str(shard_dir)) == [
        f"{shard_dir}/s-000001.tar",
        f"{shard_dir}/s-000000.tar",
    ]
    (shard_dir / "index.json").write_text(json.dumps({"shards": [{"name": "gone.tar"}]}))
    with pytest.raises(FileNotFoundError, match="gone.tar"):
        expand_shard_urls(str(shard_dir))
    (shard_dir / "index.json").write_text(json.dumps({"shards": [{"name": "../evil.tar"}]}))
    with pytest.raises(ValueError, match="invalid shard name"):
        expand_shard_urls(str(shard_dir))


def test_memory_filesystem():
    fs = fsspec.filesystem("memory")
    for i in range(2):
        _touch(fs, f"/urls-test/m-{i}.tar")
    assert expand_shard_urls("memory://urls-test") == [
        "memory://urls-test/m-0.tar",
        "memory://urls-test/m-1.tar",
    ]
    assert expand_shard_urls("memory://urls-test/m-{0..1}.tar")[1] == "memory://urls-test/m-1.tar"
    fs.rm("/urls-test", recursive=True)


def test_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_shard_urls(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no index.json"):
        expand_shard_urls(str(tmp_path))
    with pytest.raises(ValueError):
        expand_shard_urls("  ")
