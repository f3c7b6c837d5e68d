"""The resumable training stream (pipeline.data.stream): a stream restarted from a saved
position yields exactly what the uninterrupted one goes on to yield, across shard and epoch
boundaries, shuffle buffers, bad samples, truncated shards and DataLoader workers."""

from __future__ import annotations

import io
import itertools
import json
import logging

import pytest
import torch
from PIL import Image

from pipeline.data.reader import DataConfig, ShardImageDataset
from pipeline.data.split import Slot
from pipeline.data.stream import (
    DataCursor,
    SlotPosition,
    SlotStream,
    make_train_loader,
    merge_cursor_states,
)
from pipeline.data.tario import TarShardWriter, write_index
from tests.tarfiles import truncate_inside

RES = 8


def _grey_png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (10, 12), value).save(buffer, "PNG")
    return buffer.getvalue()


def _ids(images: torch.Tensor) -> list[int]:
    """Sample ids are the grey level of a uniform image."""
    return torch.round((images.reshape(images.shape[0], -1)[:, 0] + 1) * 127.5).int().tolist()


def _corpus(out, n_samples: int, per_shard: int, bad: frozenset = frozenset()) -> list[str]:
    with TarShardWriter(str(out), max_samples=per_shard) as writer:
        for i in range(n_samples):
            writer.write(f"s{i:03d}", {"png": b"garbage" if i in bad else _grey_png(i)})
    write_index(str(out), writer.shards)
    return [f"{out}/{s.name}" for s in writer.shards]


def _keys(stream, n: int) -> list[str]:
    return [s.key for s in itertools.islice(stream, n)]


def _json(position: SlotPosition) -> SlotPosition:
    """Through JSON and back, as a checkpoint stores it."""
    return SlotPosition.from_dict(json.loads(json.dumps(position.to_dict())))


@pytest.mark.parametrize(
    ("shards", "slot", "buffer"),
    [(5, Slot(0, 1), 4), (5, Slot(1, 2), 3), (2, Slot(2, 3), 5), (3, Slot(0, 1), 1)],
    ids=["one-slot", "whole-shards", "shared-shards", "no-shuffle"],
)
def test_slot_stream_resumes_exactly_anywhere(tmp_path, shards, slot, buffer):
    urls = _corpus(tmp_path, shards * 7, 7)
    reference = _keys(SlotStream(urls, 3, slot, buffer), 120)  # several epochs
    for stop in (0, 1, 5, 9, 17, 33, 50):
        stream = SlotStream(urls, 3, slot, buffer)
        head = _keys(iter(stream), stop)
        if stop == 0:
            continue
        resumed = SlotStream(urls, 3, slot, buffer, start=_json(stream.position()))
        assert head + _keys(resumed, 120 - stop) == reference, f"stopped after {stop}"


def test_first_epoch_matches_the_evaluation_reader(tmp_path):
    """The same split and shuffle as ShardImageDataset: one reading rule."""
    urls = _corpus(tmp_path, 30, 7)
    dataset = ShardImageDataset(urls, RES, shuffle_buffer=4, seed=3)
    expected = _ids(torch.stack(list(dataset)))
    stream = SlotStream(urls, 3, Slot(0, 1), 4)
    assert [int(k[1:]) for k in _keys(stream, 30)] == expected


def _loader(spec: str, workers: int, resume=None, world_size: int = 1, rank: int = 0):
    cfg = DataConfig(
        shards=spec, resolution=RES, batch_size=3, num_workers=workers, shuffle_buffer=4, seed=1
    )
    return make_train_loader(cfg, rank, world_size, resume=resume)


def _take(loader_iter, cursor: DataCursor, n: int) -> list[list[int]]:
    out = []
    for _ in range(n):
        batch = next(loader_iter)
        cursor.took(batch)
        out.append(_ids(batch["images"]))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly_with_workers_bad_samples_and_a_truncated_shard(tmp_path, workers):
    urls = _corpus(tmp_path, 40, 5, bad=frozenset({3, 17}))
    truncate_inside(urls[4], "s022.png")  # shard 4 ends early: s022.. are lost
    spec = str(tmp_path)
    reference = _take(iter(_loader(spec, workers)), DataCursor(1, workers), 30)
    for stop in (1, 4, 11):
        cursor = DataCursor(1, workers)
        first = _take(iter(_loader(spec, workers)), cursor, stop)
        saved = json.loads(json.dumps(cursor.state()))
        again = DataCursor.resumed(saved, 1, workers)
        rest = _take(iter(_loader(spec, workers, resume=saved)), again, 30 - stop)
        assert first + rest == reference, f"stopped after {stop} batches"
        assert again.consumed == 30
    seen = {i for batch in reference for i in batch}
    assert not seen & {3, 17, 22}  # the bad ones and the truncated member never appear


def test_two_ranks_resume_from_one_merged_state(tmp_path):
    spec = str(tmp_path)
    _corpus(tmp_path, 48, 4)
    runs = {}
    for rank in (0, 1):
        runs[rank] = _take(iter(_loader(spec, 2, world_size=2, rank=rank)), DataCursor(2, 2), 12)
    cursors = {rank: DataCursor(2, 2) for rank in (0, 1)}
    for rank in (0, 1):
        _take(iter(_loader(spec, 2, world_size=2, rank=rank)), cursors[rank], 5)
    merged = merge_cursor_states([cursors[0].state(), cursors[1].state()])
    for rank in (0, 1):
        loader = _loader(spec, 2, resume=merged, world_size=2, rank=rank)
        rest = _take(iter(loader), DataCursor.resumed(merged, 2, 2), 7)
        assert runs[rank][5:] == rest


def test_other_worker_count_starts_afresh_and_says_so(tmp_path, caplog):
    spec = str(tmp_path)
    _corpus(tmp_path, 20, 5)
    cursor = DataCursor(1, 0)
    _take(iter(_loader(spec, 0)), cursor, 3)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        batches = _take(iter(_loader(spec, 0, resume={**cursor.state(), "workers": 2})), cursor, 1)
    assert batches and "no exact continuation" in caplog.text
    assert DataCursor.resumed({**cursor.state(), "workers": 2}, 1, 0).consumed == 0
