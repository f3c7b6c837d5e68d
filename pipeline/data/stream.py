"""The training data stream: endless batches per rank that can be resumed exactly.

Each DataLoader worker of each rank reads as one *slot* of `pipeline.data.split`. A slot's
stream is a pure function of (shards, seed, slot): epoch after epoch, the epoch's seeded shard
order, the slot's shards (or every n-th sample of all of them), a bounded shuffle buffer seeded
by (seed, epoch, slot), decoded, batched by the worker. Every batch carries its slot's
*position* after it -- the epoch, where the reader is (shard, member), the shuffle buffer's
contents as (shard, member) references and the buffer RNG's state -- so a resumed stream
restarts exactly there by re-reading only the few shards the buffer refers to, never the epoch.

The trainer keeps the newest position of every slot of its rank (`DataCursor`) and saves it
with each checkpoint. On resume with the same world size and worker count, the loader's worker
``w`` plays slot ``(w + batches consumed) % workers`` of its rank: a DataLoader takes batches
round-robin from its workers starting at worker 0, and an endless stream never lets a worker
drop out, so the resumed loader yields exactly the batches the uninterrupted one would have.
With another world size or worker count there is no exact continuation; the stream starts
afresh at a new epoch (logged).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.reader import DataConfig, ExampleDecoder
from pipeline.data.split import Slot, shard_order, shards_of, whole_shards
from pipeline.data.tario import TarSample, TruncatedShardError, iter_tar_samples
from pipeline.data.urls import expand_shard_urls

log = logging.getLogger(__name__)

POSITION_VERSION = 1


@dataclass
class SlotPosition:
    """Where one slot's stream stands, between two samples (JSON-able via ``to_dict``)."""

    epoch: int = 0
    shard: int = 0  # index in the slot's shard list of this epoch
    member: int = 0  # samples already read from that shard
    running: int = 0  # samples read this epoch over all shards (the shared-shards filter)
    buffer: list[list[int]] = field(default_factory=list)  # [shard, member] of buffered samples
    draining: bool = False  # the epoch's shards are read; the buffer is being emptied
    rng: dict | None = None  # the shuffle RNG's bit_generator.state (None: fresh for the epoch)

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "shard": self.shard,
            "member": self.member,
            "running": self.running,
            "buffer": [list(ref) for ref in self.buffer],
            "draining": self.draining,
            "rng": self.rng,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SlotPosition:
        return cls(
            epoch=int(d["epoch"]),
            shard=int(d["shard"]),
            member=int(d["member"]),
            running=int(d["running"]),
            buffer=[[int(a), int(b)] for a, b in d["buffer"]],
            draining=bool(d["draining"]),
            rng=d["rng"],
        )


class SlotStream:
    """One slot's endless stream of raw samples (shuffled, not decoded), resumable.

    After each yielded sample, :meth:`position` describes the stream exactly: restarting a
    ``SlotStream`` from it yields the same samples the original goes on to yield.
    """

    def __init__(
        self,
        urls: list[str],
        seed: int,
        slot: Slot,
        buffer_size: int,
        start: SlotPosition | None = None,
    ):
        self.urls, self.seed, self.slot, self.buffer_size = urls, seed, slot, max(buffer_size, 1)
        self.pos = start or SlotPosition()
        self.truncated_shards = 0
        self._buffer: list[tuple[list[int], TarSample]] = []

    def position(self) -> SlotPosition:
        return SlotPosition(
            epoch=self.pos.epoch,
            shard=self.pos.shard,
            member=self.pos.member,
            running=self.pos.running,
            buffer=[list(ref) for ref, _ in self._buffer],
            draining=self.pos.draining,
            rng=self._rng.bit_generator.state,
        )

    def __iter__(self) -> Iterator[TarSample]:
        while True:
            read = 0
            for sample in self._epoch():
                read += 1
                yield sample
            if read == 0 and self.pos.running == 0:  # an endless loop over nothing otherwise
                raise RuntimeError(
                    f"data slot {self.slot.index}/{self.slot.count} read no samples in epoch "
                    f"{self.pos.epoch} of {len(self.urls)} shard(s); add data or use fewer "
                    "ranks/workers"
                )
            self.pos = SlotPosition(epoch=self.pos.epoch + 1)

    # -------------------------------------------------------------------------------- an epoch

    def _sources(self) -> tuple[list[str], bool]:
        """This epoch's shard list for the slot, and whether the slot keeps every sample."""
        order = shard_order(len(self.urls), self.seed, self.pos.epoch)
        if whole_shards(len(order), self.slot):
            return [self.urls[i] for i in shards_of(order, self.slot)], True
        return [self.urls[i] for i in order], False

    def _epoch(self) -> Iterator[TarSample]:
        sources, keeps_all = self._sources()
        self._rng = np.random.default_rng([self.seed, self.pos.epoch, self.slot.index])
        if self.pos.rng is not None:
            self._rng.bit_generator.state = self.pos.rng
        self._buffer = self._reread(sources, self.pos.buffer)
        if not self.pos.draining:
            for ref, sample in self._read(sources, keeps_all):
                if len(self._buffer) < self.buffer_size:
                    self._buffer.append((ref, sample))
                    continue
                # Same draws and order as pipeline.data.reader.shuffled; the incoming sample
                # takes the place before the yield, so position() is exact while suspended.
                pick = int(self._rng.integers(self.buffer_size))
                out = self._buffer[pick][1]
                self._buffer[pick] = (ref, sample)
                yield out
            self.pos.draining = True
            order = self._rng.permutation(len(self._buffer))
            self._buffer = [self._buffer[i] for i in order]
        while self._buffer:
            yield self._buffer.pop(0)[1]

    def _read(self, sources: list[str], keeps_all: bool) -> Iterator[tuple[list[int], TarSample]]:
        """(reference, sample) from the reader's position to the end of the epoch's shards."""
        while self.pos.shard < len(sources):
            skip = self.pos.member
            for member, sample in enumerate(self._samples(sources[self.pos.shard])):
                if member < skip:
                    continue
                self.pos.member = member + 1
                self.pos.running += 1
                if keeps_all or (self.pos.running - 1) % self.slot.count == self.slot.index:
                    yield [self.pos.shard, member], sample
            self.pos.shard, self.pos.member = self.pos.shard + 1, 0

    def _reread(self, sources: list[str], refs: list[list[int]]) -> list:
        """The buffered samples of a saved position, read again from their shards."""
        wanted: dict[int, set[int]] = defaultdict(set)
        for shard, member in refs:
            wanted[shard].add(member)
        found: dict[tuple[int, int], TarSample] = {}
        for shard, members in wanted.items():
            for member, sample in enumerate(self._samples(sources[shard])):
                if member in members:
                    found[(shard, member)] = sample
        missing = [ref for ref in refs if tuple(ref) not in found]
        if missing:
            raise RuntimeError(
                f"cannot resume the data stream: {len(missing)} buffered sample(s) are gone "
                f"from their shards (e.g. shard {sources[missing[0][0]]} member "
                f"{missing[0][1]}); were the shards rewritten since the checkpoint?"
            )
        return [(list(ref), found[tuple(ref)]) for ref in refs]

    def _samples(self, url: str) -> Iterator[TarSample]:
        try:
            yield from iter_tar_samples(url)
        except TruncatedShardError as err:
            self.truncated_shards += 1
            log.warning("%s; continuing with the next shard", err)


# ------------------------------------------------------------------------------- the dataset


class TrainStream(IterableDataset):
    """Endless training batches of one rank; give the DataLoader ``batch_size=None``.

    Each item is ``{"images": float32 [B, C, R, R], "labels": int64 [B] (with label_field),
    "slot": int, "position": dict}``. ``decode(sample) -> tensor | (tensor, label) | None``
    turns a raw sample into a training example (None: unusable, skipped by the decoder).
    ``resume`` is a `DataCursor.state()` saved with a checkpoint (all ranks merged).
    """

    def __init__(
        self,
        urls: list[str],
        decode,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 256,
        seed: int = 0,
        resume: dict | None = None,
        fresh_epoch: int = 0,
    ):
        super().__init__()
        if not urls:
            raise ValueError("TrainStream needs at least one shard URL")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.urls, self.decode, self.batch_size = list(urls), decode, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.resume, self.fresh_epoch = resume, fresh_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start, logical = self._start(worker, workers)
        slot = Slot(self.rank * workers + logical, self.world_size * workers)
        stream = SlotStream(self.urls, self.seed, slot, self.shuffle_buffer, start)
        yield from self._batches(stream, slot)

    def _start(self, worker: int, workers: int) -> tuple[SlotPosition | None, int]:
        """(where this worker's slot resumes, which of the rank's slots it plays)."""
        saved = self.resume
        if not saved:
            return SlotPosition(epoch=self.fresh_epoch), worker
        if (saved.get("world_size"), saved.get("workers")) != (self.world_size, workers):
            if worker == 0 and self.rank == 0:
                log.warning(
                    "data stream saved with world size %s x %s workers, resumed with %d x %d: "
                    "no exact continuation; starting epoch %d afresh",
                    saved.get("world_size"),
                    saved.get("workers"),
                    self.world_size,
                    workers,
                    self.fresh_epoch,
                )
            return SlotPosition(epoch=self.fresh_epoch), worker
        logical = (worker + int(saved["consumed"])) % workers
        position = saved["slots"].get(str(self.rank * workers + logical))
        return (SlotPosition.from_dict(position) if position else None), logical

    def _batches(self, stream: SlotStream, slot: Slot) -> Iterator[dict[str, Any]]:
        images: list[torch.Tensor] = []
        labels: list[int] = []
        epoch, produced = stream.pos.epoch, 0
        for sample in stream:
            if stream.pos.epoch != epoch:  # an epoch ended
                _check_produced(produced, slot, len(self.urls))
                epoch, produced = stream.pos.epoch, 0
            example = self.decode(sample)
            if example is None:
                continue
            produced += 1
            image, label = example if isinstance(example, tuple) else (example, None)
            images.append(image)
            if label is not None:
                labels.append(label)
            if len(images) == self.batch_size:
                batch = {
                    "images": torch.stack(images),
                    "slot": slot.index,
                    "position": stream.position().to_dict(),
                }
                if labels:
                    batch["labels"] = torch.tensor(labels, dtype=torch.int64)
                images, labels = [], []
                yield batch


def _check_produced(produced: int, slot: Slot, shards: int) -> None:
    if produced == 0:
        raise RuntimeError(
            f"data slot {slot.index}/{slot.count} got no usable images in an epoch of "
            f"{shards} shard(s); add data or use fewer ranks/workers"
        )


class DataCursor:
    """What a rank's trainer has consumed of its TrainStream: saved with every checkpoint."""

    def __init__(self, world_size: int, workers: int, consumed: int = 0):
        self.world_size, self.workers = world_size, max(workers, 1)
        self.consumed = consumed
        self.slots: dict[str, dict] = {}

    @classmethod
    def resumed(cls, saved: dict | None, world_size: int, workers: int) -> DataCursor:
        cursor = cls(world_size, workers)
        if saved and (saved.get("world_size"), saved.get("workers")) == (
            world_size,
            cursor.workers,
        ):
            cursor.consumed = int(saved["consumed"])
            cursor.slots = dict(saved["slots"])
        return cursor

    def took(self, batch: dict[str, Any]) -> None:
        self.consumed += 1
        self.slots[str(batch["slot"])] = batch["position"]

    def state(self) -> dict:
        return {
            "version": POSITION_VERSION,
            "world_size": self.world_size,
            "workers": self.workers,
            "consumed": self.consumed,
            "slots": dict(self.slots),
        }


def merge_cursor_states(states: list[dict]) -> dict:
    """One saved state from every rank's `DataCursor.state()` (they consumed the same count)."""
    merged = dict(states[0])
    merged["slots"] = {k: v for s in states for k, v in s["slots"].items()}
    return merged


def make_train_loader(
    cfg: DataConfig,
    rank: int = 0,
    world_size: int = 1,
    resume: dict | None = None,
    fresh_epoch: int = 0,
) -> DataLoader:
    """The rank's endless training batches over ``cfg.shards``, resumed from ``resume`` (a
    merged `DataCursor` state) when given; ``fresh_epoch`` starts a stream that cannot resume."""
    decoder = ExampleDecoder(cfg.resolution, cfg.channels, cfg.value_range, cfg.label_field)
    dataset = TrainStream(
        expand_shard_urls(cfg.shards),
        decoder,
        cfg.batch_size,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        resume=resume,
        fresh_epoch=fresh_epoch,
    )
    # Batching is the stream's (a batch is one worker's, with its position): batch_size=None.
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers)
