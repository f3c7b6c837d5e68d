"""Who reads what: the one split of a shard list over DDP ranks x DataLoader workers.

The training image reader (`pipeline.data.reader.ShardImageDataset`) and the latent reader
(`pipeline.latents.LatentDataset`) both split their shards here, so the rule is written once:

* every reader ("slot": one DataLoader worker of one rank, ``rank * workers + worker`` of
  ``world_size * workers``) computes the same seeded permutation of the shards for an epoch;
* with at least as many shards as slots, slot ``s`` of ``n`` reads the shards ``order[s::n]``;
* with fewer shards than slots, every slot reads every shard in that order and keeps the samples
  whose running index is ``s`` modulo ``n``.

No two slots ever see the same sample and together they see all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from torch.utils.data import get_worker_info

T = TypeVar("T")


@dataclass(frozen=True)
class Slot:
    """One reader among all readers of all ranks."""

    index: int
    count: int


def reader_slot(rank: int, world_size: int) -> Slot:
    """The calling process's slot: its DataLoader worker (if any) within ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return Slot(rank * workers + worker, world_size * workers)


def shard_order(count: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch's shard order: the same on every slot (seeded by seed and epoch only), so the
    slots' slices never overlap."""
    if not shuffle:
        return list(range(count))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(count)]


def whole_shards(shards: int, slot: Slot) -> bool:
    """Whether each slot reads whole shards (enough of them) or every slot reads every shard."""
    return shards >= slot.count


def shards_of(order: list[int], slot: Slot) -> list[int]:
    """The shards slot ``slot`` reads whole, in order."""
    return order[slot.index :: slot.count]


def every_nth(items: Iterable[T], slot: Slot) -> Iterator[T]:
    """The items whose running index is ``slot.index`` modulo ``slot.count`` (a stream that
    every slot reads whole)."""
    for i, item in enumerate(items):
        if i % slot.count == slot.index:
            yield item


def first_kept(first_index: int, slot: Slot) -> int:
    """Within a shard whose first sample has running index ``first_index``: the offset of the
    first sample :func:`every_nth` keeps for ``slot`` (then every ``slot.count``-th)."""
    return (slot.index - first_index) % slot.count
