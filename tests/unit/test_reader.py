"""ShardImageDataset / make_loader: rank x worker split, shuffling, bad data handling."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.reader import (
    DataConfig,
    ShardImageDataset,
    iter_val_images,
    make_loader,
    shuffled,
)
from pipeline.data.tario import TarShardWriter, write_index

RES = 8


def _grey_png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (10, 12), value).save(buffer, "PNG")
    return buffer.getvalue()


def _ids(batch: torch.Tensor) -> list[int]:
    """Sample ids are encoded as the grey level of a uniform image."""
    return torch.round((batch.reshape(batch.shape[0], -1)[:, 0] + 1) * 127.5).int().tolist()


def _make_shards(out, n_samples: int, per_shard: int, bad: set[int] = frozenset()) -> str:
    with TarShardWriter(str(out), max_samples=per_shard) as writer:
        for i in range(n_samples):
            image = b"garbage" if i in bad else _grey_png(i)
            writer.write(f"s{i:03d}", {"png": image, "json": b"{}"})
    write_index(str(out), writer.shards)
    return str(out)


def _collect(cfg: DataConfig, world_size: int) -> list[list[int]]:
    per_rank = []
    for rank in range(world_size):
        loader = make_loader(cfg, rank=rank, world_size=world_size, repeat=False)
        per_rank.append([i for batch in loader for i in _ids(batch)])
    return per_rank


@pytest.mark.parametrize(("n_samples", "per_shard"), [(40, 5), (21, 20)])
def test_two_ranks_two_workers_cover_everything_once(tmp_path, n_samples, per_shard):
    """8 shards >= 4 slots: shard-level split; 2 shards < 4 slots: sample-level split."""
    spec = _make_shards(tmp_path, n_samples, per_shard)
    cfg = DataConfig(shards=spec, resolution=RES, batch_size=1, num_workers=2, shuffle_buffer=4)
    per_rank = _collect(cfg, world_size=2)
    seen = per_rank[0] + per_rank[1]
    assert sorted(seen) == list(range(n_samples))  # full coverage, no duplicates
    assert per_rank[0] and per_rank[1]


def test_tensor_format_and_shuffle_determinism(tmp_path):
    urls = [f"{_make_shards(tmp_path, 30, 10)}/shard-{i:06d}.tar" for i in range(3)]
    first = list(ShardImageDataset(urls, RES, shuffle_buffer=8, seed=1))
    assert first[0].shape == (3, RES, RES) and first[0].dtype == torch.float32
    assert -1.0 <= float(torch.stack(first).min()) and float(torch.stack(first).max()) <= 1.0
    order = _ids(torch.stack(first))
    again = _ids(torch.stack(list(ShardImageDataset(urls, RES, shuffle_buffer=8, seed=1))))
    other = _ids(torch.stack(list(ShardImageDataset(urls, RES, shuffle_buffer=8, seed=2))))
    assert order == again and order != other and sorted(order) == list(range(30))
    assert order != list(range(30))


def test_repeat_reshuffles_each_epoch(tmp_path):
    urls = [f"{_make_shards(tmp_path, 12, 4)}/shard-{i:06d}.tar" for i in range(3)]
    stream = iter(ShardImageDataset(urls, RES, shuffle_buffer=6, repeat=True))
    epochs = [_ids(torch.stack([next(stream) for _ in range(12)])) for _ in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3


def test_corrupt_image_and_truncated_shard_skipped_and_counted(tmp_path):
    _make_shards(tmp_path, 10, 5, bad={3})
    good_shard = tmp_path / "shard-000000.tar"
    cut_shard = tmp_path / "shard-000001.tar"
    with tarfile.open(cut_shard) as tar:
        cut_at = tar.getmember("s007.png").offset_data + 10
    cut_shard.write_bytes(cut_shard.read_bytes()[:cut_at])  # samples 5, 6 survive; 7 is cut
    dataset = ShardImageDataset([str(good_shard), str(cut_shard)], RES, shuffle_buffer=0)
    ids = _ids(torch.stack(list(dataset)))
    assert ids == [0, 1, 2, 4, 5, 6]
    assert dataset.skipped == 1 and dataset.truncated_shards == 1


def test_repeat_with_nothing_usable_raises(tmp_path):
    _make_shards(tmp_path, 2, 2, bad={0, 1})
    dataset = ShardImageDataset([str(tmp_path / "shard-000000.tar")], RES, repeat=True)
    with pytest.raises(RuntimeError, match="no usable images"):
        next(iter(dataset))


def test_iter_val_images(tmp_path):
    spec = _make_shards(tmp_path, 9, 4, bad={1})
    got = list(iter_val_images(spec, RES, limit=5))
    assert [k for k, _ in got] == ["s000", "s002", "s003", "s004", "s005"]
    key, image = got[1]
    assert image.shape == (RES, RES, 3) and image.dtype == np.uint8 and int(image[0, 0, 0]) == 2
    assert len(list(iter_val_images(spec, RES))) == 8


def test_shuffled_buffer():
    rng = np.random.default_rng(0)
    out = list(shuffled(iter(range(100)), 10, rng))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert list(shuffled(iter(range(5)), 0, rng)) == list(range(5))


def test_iter_val_samples_label_modes(tmp_path):
    """The one validation reader: no labels, a required field, or "auto" (cls where present)."""
    from pipeline.data.reader import AUTO_LABEL, iter_val_samples

    with TarShardWriter(str(tmp_path), max_samples=10) as writer:
        for i in range(6):
            files = {"png": _grey_png(i)}
            if i % 2 == 0:
                files["cls"] = str(i).encode()
            writer.write(f"s{i:03d}", files)
    write_index(str(tmp_path), writer.shards)
    spec = str(tmp_path)
    plain = list(iter_val_samples(spec, RES))
    assert [s.label for s in plain] == [None] * 6 and plain[0].pixels.shape == (RES, RES, 3)
    required = list(iter_val_samples(spec, RES, label_field="cls"))
    assert [(s.key, s.label) for s in required] == [("s000", 0), ("s002", 2), ("s004", 4)]
    auto = list(iter_val_samples(spec, RES, limit=3, channels=1, label_field=AUTO_LABEL))
    assert [s.label for s in auto] == [0, None, 2] and auto[0].pixels.shape == (RES, RES, 1)
