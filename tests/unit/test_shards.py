"""build_shards: folder source (nested, odd names, corrupt files) and the bundled sample corpus."""

import io
import json
import re

import fsspec
import pytest
from PIL import Image

from pipeline.data.shards import ShardsConfig, build_shards, split_photos
from pipeline.data.tario import iter_tar_samples
from pipeline.data.urls import expand_shard_urls


def _image_bytes(fmt: str, color=(10, 200, 30), size=(12, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def _read_dir(url: str) -> list:
    return [s for shard in expand_shard_urls(url) for s in iter_tar_samples(shard)]


@pytest.fixture
def image_tree(tmp_path):
    src = tmp_path / "src"
    files = {
        "a.jpg": _image_bytes("JPEG"),
        "nested/deeper/b.PNG": _image_bytes("PNG", size=(5, 9)),
        "nested/my photo (1).JPEG": _image_bytes("JPEG"),
        "nested/ünïcode.webp": _image_bytes("WEBP"),
        "dup.jpg": _image_bytes("JPEG"),
        "dup.png": _image_bytes("PNG"),
        "x.y.z.png": _image_bytes("PNG"),
        "broken.jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg",
        "notes.txt": b"ignored",
    }
    for rel, data in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return src, files


def test_folder_to_shards(tmp_path, image_tree):
    src, files = image_tree
    out = tmp_path / "out"
    cfg = ShardsConfig(source=str(src), output=str(out), samples_per_shard=3)
    summary = build_shards(cfg)
    assert summary["samples"] == 7 and summary["shards"] == 3
    assert [s["source"] for s in summary["skipped"]] == ["broken.jpg"]

    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 7 and index["skipped"] == summary["skipped"]

    samples = _read_dir(str(out))
    keys = [s.key for s in samples]
    assert len(set(keys)) == 7 and all(re.match(r"^[A-Za-z0-9_-]+$", k) for k in keys)
    by_source = {json.loads(s.files["json"])["source"]: s for s in samples}
    assert sorted(by_source) == sorted(r for r in files if r not in ("broken.jpg", "notes.txt"))
    for rel, sample in by_source.items():
        ext = rel.rsplit(".", 1)[1].lower().replace("jpeg", "jpg")
        assert sample.files[ext] == files[rel]  # original bytes, unchanged
    assert (
        json.loads(by_source["nested/deeper/b.PNG"].files["json"])["width"] == 5
        and by_source["nested/deeper/b.PNG"].key == "nested_deeper_b"
    )


def test_folder_on_memory_fs():
    fs = fsspec.filesystem("memory")
    fs.pipe(
        {
            "/shards-src/one.png": _image_bytes("PNG"),
            "/shards-src/sub/two.jpg": _image_bytes("JPEG"),
        }
    )
    summary = build_shards(ShardsConfig(source="memory://shards-src", output="memory://shards-out"))
    assert summary["samples"] == 2 and not summary["skipped"]
    assert [s.key for s in _read_dir("memory://shards-out")] == ["one", "sub_two"]
    fs.rm("/shards-src", recursive=True)
    fs.rm("/shards-out", recursive=True)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        build_shards(ShardsConfig(source=str(tmp_path / "missing"), output=str(tmp_path / "o")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no jpg"):
        build_shards(ShardsConfig(source=str(tmp_path / "empty"), output=str(tmp_path / "o")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="could be decoded"):
        build_shards(ShardsConfig(source=str(tmp_path / "bad"), output=str(tmp_path / "o")))


def test_split_photos_deterministic_and_disjoint():
    names = [f"p{i}" for i in range(14)]
    train, val = split_photos(names, 0.25, seed=0)
    assert len(val) == 4 and not set(train) & set(val) and sorted(train + val) == sorted(names)
    assert split_photos(names, 0.25, seed=0) == (train, val)
    assert split_photos(names, 0.01, seed=0)[1]  # at least one val photo when asked for any
    with pytest.raises(ValueError):
        split_photos(names, 1.0, seed=0)


def test_sample_corpus_split_by_photo(tmp_path):
    cfg = ShardsConfig(
        source="sample", output=str(tmp_path), tile_size=128, tile_stride=128, samples_per_shard=40
    )
    summary = build_shards(cfg)
    assert summary["train"] == f"{tmp_path}/train" and summary["val"] == f"{tmp_path}/val"
    photos = {}
    for split in ("train", "val"):
        samples = _read_dir(summary[split])
        assert len(samples) == summary[f"{split}_samples"] > 0
        metas = [json.loads(s.files["json"]) for s in samples]
        photos[split] = {m["photo"] for m in metas}
        assert photos[split] == set(summary[f"{split}_photos"])
        tile = Image.open(io.BytesIO(samples[0].files["jpg"]))
        assert tile.size == (128, 128) and {"x", "y"} <= set(metas[0])
    assert not photos["train"] & photos["val"]
    assert {"astronaut", "china", "flower"} <= photos["train"] | photos["val"]
    assert len(photos["train"] | photos["val"]) >= 12
