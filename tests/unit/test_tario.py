"""Tar shard I/O: round trips (local, memory://, s3 via moto), truncation, atomic commit."""

import gzip
import io
import json
import pickle
import tarfile

import fsspec
import pytest

from pipeline.data.tario import (
    ShardInfo,
    TarShardWriter,
    TruncatedShardError,
    iter_tar_samples,
    split_member_name,
    write_index,
)
from pipeline.data.urls import expand_shard_urls

SAMPLES = [(f"k{i}", {"jpg": bytes([i]) * (700 + i), "json": b'{"i": %d}' % i}) for i in range(4)]
BIG = ("big", {"bin": bytes(range(256)) * 1000, "txt": b"after a 256 KB member"})


def _write_raw_tar(path, members):
    """A tar written by plain tarfile; returns {member name: (header offset, data offset)}."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def _members():
    return [(f"{k}.{ext}", data) for k, files in SAMPLES for ext, data in files.items()]


def _read_all(url):
    return [(s.key, s.files) for s in iter_tar_samples(url)]


def _read_until_error(url):
    got = []
    with pytest.raises(TruncatedShardError) as info:
        for sample in iter_tar_samples(url):
            got.append(sample.key)
    return got, info.value


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("abc.seg.png", ("abc", "seg.png")),
        ("dir/x.y.JPG", ("dir/x", "y.jpg")),
        ("./a.txt", ("a", "txt")),
        ("noext", (None, None)),
        ("dir/.hidden.jpg", (None, None)),
    ],
)
def test_split_member_name(name, expected):
    assert split_member_name(name) == expected


def test_round_trip_local_rolls_by_samples(tmp_path):
    with TarShardWriter(str(tmp_path), prefix="t", max_samples=3) as writer:
        for key, files in SAMPLES:
            writer.write(key, files)
    shards = writer.shards
    assert [s.name for s in shards] == ["t-000000.tar", "t-000001.tar"]
    assert [s.samples for s in shards] == [3, 1]
    assert all(s.bytes == (tmp_path / s.name).stat().st_size for s in shards)
    got = [item for s in shards for item in _read_all(str(tmp_path / s.name))]
    assert got == SAMPLES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no tmp left


def test_round_trip_memory_rolls_by_bytes():
    out = "memory://tario-bytes"
    with TarShardWriter(out, max_bytes=5200) as writer:
        for key, files in SAMPLES:
            writer.write(key, files)
    assert [s.samples for s in writer.shards] == [2, 2]  # each sample takes 2560 tar bytes
    index_url = write_index(out, writer.shards, {"note": "x"})
    with fsspec.open(index_url, "rt") as f:
        index = json.load(f)
    assert index["samples"] == 4 and index["note"] == "x"
    assert [s["name"] for s in index["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    urls = expand_shard_urls(out)
    assert [item for url in urls for item in _read_all(url)] == SAMPLES
    fsspec.filesystem("memory").rm("/tario-bytes", recursive=True)


def test_oversized_sample_gets_its_own_shard(tmp_path):
    with TarShardWriter(str(tmp_path), max_bytes=100) as writer:
        writer.write(*BIG)
        writer.write("b", {"bin": b"y"})
    assert [s.samples for s in writer.shards] == [1, 1]
    assert _read_all(str(tmp_path / "shard-000000.tar")) == [BIG]


def test_commit_is_atomic_and_abort_cleans_up(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with TarShardWriter(str(tmp_path), max_samples=2) as writer:
            for key, files in SAMPLES[:3]:
                writer.write(key, files)
                # the shard being written is only visible under its hidden temporary name
                assert not (tmp_path / "shard-000001.tar").exists()
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]


def test_writer_rejects_bad_input(tmp_path):
    writer = TarShardWriter(str(tmp_path))
    with pytest.raises(ValueError, match="unsafe sample key"):
        writer.write("../x", {"jpg": b"1"})
    with pytest.raises(ValueError, match="unsafe sample key"):
        writer.write("a.b", {"jpg": b"1"})
    with pytest.raises(ValueError, match="extension"):
        writer.write("a", {".jpg": b"1"})
    with pytest.raises(TypeError, match="bytes"):
        writer.write("a", {"txt": "text"})
    assert writer.close() == []
    with pytest.raises(ValueError, match="overwrite"):
        write_index(str(tmp_path), [ShardInfo("a.tar", 1, 1)], {"samples": 3})


def test_groups_consecutive_members_and_ignores_odd_names(tmp_path):
    path = tmp_path / "raw.tar"
    _write_raw_tar(
        path,
        [
            ("./a.jpg", b"1"),
            ("a.seg.png", b"2"),
            ("README", b"x"),
            ("b.jpg", b"3"),
            ("a.txt", b"4"),
        ],
    )
    assert _read_all(str(path)) == [
        ("a", {"jpg": b"1", "seg.png": b"2"}),
        ("b", {"jpg": b"3"}),
        ("a", {"txt": b"4"}),
    ]


def test_truncated_in_member_data(tmp_path):
    path = tmp_path / "cut.tar"
    offsets = _write_raw_tar(path, _members())
    data = path.read_bytes()
    (tmp_path / "cut1.tar").write_bytes(data[: offsets["k2.jpg"][1] + 100])
    got, err = _read_until_error(str(tmp_path / "cut1.tar"))
    assert got == ["k0", "k1"]
    assert (err.last_good_key, err.partial_key) == ("k1", "k2")
    assert "cut1.tar" in str(err) and err.url.endswith("cut1.tar")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.partial_key, str(copy)) == ("k2", str(err))


@pytest.mark.parametrize("cut_member", ["k2.json", "k3.jpg"])
def test_truncated_at_member_boundary(tmp_path, cut_member):
    """No zero end block: the pending sample k2 may be incomplete, so it is not yielded."""
    path = tmp_path / "cut.tar"
    offsets = _write_raw_tar(path, _members())
    cut = tmp_path / "cut2.tar"
    cut.write_bytes(path.read_bytes()[: offsets[cut_member][0]])
    got, err = _read_until_error(str(cut))
    assert got == ["k0", "k1"]
    assert (err.last_good_key, err.partial_key) == ("k1", "k2")
    assert "end-of-archive" in err.reason


def test_garbage_header_and_empty_file(tmp_path):
    path = tmp_path / "bad.tar"
    offsets = _write_raw_tar(path, _members())
    data = bytearray(path.read_bytes())
    start = offsets["k1.jpg"][0]
    data[start : start + 512] = b"\x07" * 512
    path.write_bytes(bytes(data))
    got, err = _read_until_error(str(path))
    assert got == [] and err.last_good_key is None and err.partial_key == "k0"
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert _read_all(str(empty)) == []  # 0 bytes: an empty shard, not a damaged one
    with pytest.raises(FileNotFoundError):
        _read_all(str(tmp_path / "missing.tar"))


def test_gzip_round_trip_and_truncation(tmp_path):
    path = tmp_path / "plain.tar"
    _write_raw_tar(path, _members())
    packed = gzip.compress(path.read_bytes())
    (tmp_path / "a.tar.gz").write_bytes(packed)
    assert _read_all(str(tmp_path / "a.tar.gz")) == SAMPLES
    (tmp_path / "b.tar.gz").write_bytes(packed[: len(packed) - 40])
    got, err = _read_until_error(str(tmp_path / "b.tar.gz"))
    assert got[:2] == ["k0", "k1"] and "EOFError" in err.reason


def test_s3_round_trip(s3_server):
    _, bucket = s3_server
    out = f"s3://{bucket}/tario"
    with TarShardWriter(out, max_samples=3) as writer:
        for key, files in SAMPLES:
            writer.write(key, files)
    write_index(out, writer.shards)
    urls = expand_shard_urls(out)
    assert urls == [f"{out}/shard-000000.tar", f"{out}/shard-000001.tar"]
    assert [item for url in urls for item in _read_all(url)] == SAMPLES
    listing = fsspec.filesystem("s3").ls(f"{bucket}/tario", detail=False)
    assert not [p for p in listing if p.rsplit("/", 1)[1].startswith(".")]
