"""The one split of shards over readers (pipeline.data.split): disjoint, complete, seeded."""

from __future__ import annotations

import pytest

from pipeline.data.split import Slot, every_nth, first_kept, shard_order, shards_of, whole_shards


def _read(shard_sizes: list[int], slot: Slot, epoch: int) -> list[tuple[int, int]]:
    """(shard, sample) pairs slot reads, by the rule both readers follow."""
    order = shard_order(len(shard_sizes), seed=3, epoch=epoch)
    if whole_shards(len(order), slot):
        return [(p, i) for p in shards_of(order, slot) for i in range(shard_sizes[p])]
    return list(every_nth(((p, i) for p in order for i in range(shard_sizes[p])), slot))


@pytest.mark.parametrize("shards", [1, 3, 8])
@pytest.mark.parametrize("slots", [1, 2, 5])
def test_every_sample_read_by_exactly_one_slot(shards, slots):
    sizes = [4 + (i % 3) for i in range(shards)]
    everything = sorted((p, i) for p in range(shards) for i in range(sizes[p]))
    for epoch in (0, 1):
        seen = [pair for s in range(slots) for pair in _read(sizes, Slot(s, slots), epoch)]
        assert sorted(seen) == everything  # complete, and no pair twice


def test_first_kept_matches_the_running_index():
    """LatentDataset slices each shard at first_kept(); the same samples as every_nth()."""
    sizes = [5, 2, 7, 1]
    for slots in (2, 3, 6):
        for index in range(slots):
            slot = Slot(index, slots)
            stream = [(p, i) for p in range(len(sizes)) for i in range(sizes[p])]
            expected = list(every_nth(stream, slot))
            sliced, first = [], 0
            for p, size in enumerate(sizes):
                sliced += [(p, i) for i in range(size)][first_kept(first, slot) :: slots]
                first += size
            assert sliced == expected


def test_shard_order_is_seeded_by_seed_and_epoch_only():
    assert shard_order(10, 1, 0) == shard_order(10, 1, 0)
    assert shard_order(10, 1, 0) != shard_order(10, 1, 1)
    assert sorted(shard_order(10, 1, 0)) == list(range(10))
    assert shard_order(4, 1, 0, shuffle=False) == [0, 1, 2, 3]
