"""``LatentDataset``: a latent corpus as a torch IterableDataset for diffusion training.

Every sample comes out ready for a diffusion model: ``latent`` is ``(z - shift) * scale`` as
float32, with its caption and SDXL size conditioning. Reading is DDP- and DataLoader-worker
aware, deterministic per (seed, epoch), and trusts only committed shards whose size, sha256 and
sample count check out (a shard is read whole and checked before any of its samples is yielded).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from pipeline.contracts.manifest import Manifest, ShardEntry, load_manifest, manifest_shards
from pipeline.data.split import Slot, first_kept, reader_slot, shard_order, shards_of, whole_shards
from pipeline.latents.format import (
    VQ_OUTPUTS,
    decode_sample,
    load_manifest_codebook,
    read_shard,
    select_shards,
)

SPLITS = ("auto", "shards", "samples")
# Fields that are per-sample tensors (stacked into batches); the rest are lists of strings.
_TENSOR_FIELDS = ("latent", "indices", "std", "original_size", "crop_top_left", "target_size")


class LatentDataset(IterableDataset):
    """Samples (or ready batches) of a finished latent corpus.

    Each item is a dict: ``latent`` float32 [C, h, w] already shifted and scaled (VQ with
    ``vq_output="indices"``: ``indices`` int64 [h, w], unscaled), ``key``, ``caption`` (the
    ``txt`` field, else ``json["caption"]``, else ""), ``original_size``, ``crop_top_left``,
    ``target_size`` (int64 [2]) and ``std`` (scaled) when the corpus stores it. With
    ``batch_size`` items are batches (tensors gain a leading B, strings become lists); a batch
    only ever holds one latent shape, so it always stacks. Give the DataLoader
    ``batch_size=None`` then.

    Work is split over ``world_size * num_workers`` global workers: ``split="shards"`` gives
    shard i to global worker ``i % total``; ``"samples"`` makes every worker read every shard
    and keep every total-th sample; ``"auto"`` picks shards when there are enough of them. With
    ``split="shards"`` ranks may get different sample counts: DDP training loops should then
    stop at a fixed number of steps rather than at the end of the data.

    ``rank``/``world_size`` default to ``torch.distributed`` (resolved here, in the main
    process, so DataLoader workers started with spawn agree); pass them to override.
    ``set_epoch`` changes the shuffle; with ``persistent_workers=True`` the DataLoader's
    workers keep the epoch they were started with.
    """

    def __init__(
        self,
        directory: str,
        *,
        batch_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        expected_encoder_sha256: str | None = None,
        shards: list[str] | None = None,
        split: str = "auto",
        drop_last: bool = False,
        vq_output: str = "latents",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_options(batch_size, split, vq_output)
        manifest = load_manifest(directory, expected_encoder_sha256)
        self.directory = directory
        self.entries = select_shards(manifest_shards(directory, manifest), directory, shards)
        self.manifest = manifest  # the validated manifest (channel stats, encoder, ...)
        self.codebook = _codebook(directory, manifest, vq_output)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.split = split
        self.drop_last = drop_last
        self.vq_output = vq_output
        self.rank, self.world_size = _distributed(rank, world_size)
        self.epoch = 0
        if split == "shards":
            _check_enough_shards(len(self.entries), self.world_size, "ranks")

    @property
    def num_samples(self) -> int:
        """Samples in the selected shards (all ranks and workers together)."""
        return sum(entry.samples for entry in self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (shard order and samples within a shard, when shuffling)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        samples = self._iter_samples(reader_slot(self.rank, self.world_size))
        return self._batches(samples) if self.batch_size else samples

    # ------------------------------------------------------------------------- splitting

    def _by_shards(self, slot: Slot) -> bool:
        if self.split == "shards":
            _check_enough_shards(len(self.entries), slot.count, "global workers")
            return True
        return self.split == "auto" and whole_shards(len(self.entries), slot)

    def _iter_samples(self, slot: Slot) -> Iterator[dict[str, Any]]:
        # The split of pipeline.data.split, as the image reader's; every slot reads whole
        # shards (checked against the manifest) and, when shards are shared, keeps every
        # slot.count-th sample of the running index.
        order = shard_order(len(self.entries), self.seed, self.epoch, self.shuffle)
        by_shards = self._by_shards(slot)
        first_index = 0  # running index of the shard's first sample, in this epoch's order
        for position in shards_of(order, slot) if by_shards else order:
            entry = self.entries[position]
            samples = read_shard(self.directory, entry)
            if not by_shards:
                samples = samples[first_kept(first_index, slot) :: slot.count]
                first_index += entry.samples
            for key, files in self._shuffled(samples, position):
                yield self._to_torch(key, files, entry)

    def _shuffled(self, samples: list, position: int) -> list:
        if not self.shuffle:
            return samples
        rng = np.random.default_rng([self.seed, self.epoch, position])
        return [samples[i] for i in rng.permutation(len(samples))]

    # ------------------------------------------------------------------------- samples and batches

    def _to_torch(self, key: str, files: dict[str, bytes], entry: ShardEntry) -> dict:
        sample = decode_sample(key, files, self.manifest, entry, self.codebook, self.vq_output)
        return {
            name: torch.from_numpy(np.ascontiguousarray(value))
            if isinstance(value, np.ndarray)
            else value
            for name, value in sample.items()
        }

    def _batches(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # One buffer per latent shape: aspect-ratio buckets never share a batch.
        buffers: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        for sample in samples:
            values = sample["latent"] if "latent" in sample else sample["indices"]
            shape = tuple(values.shape)
            buffer = buffers.setdefault(shape, [])
            buffer.append(sample)
            if len(buffer) == self.batch_size:
                yield collate(buffer)
                buffers[shape] = []
        if not self.drop_last:
            yield from (collate(buffer) for buffer in buffers.values() if buffer)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-shaped samples into a batch: tensors get a leading dim, strings become lists."""
    return {
        name: torch.stack([s[name] for s in samples])
        if name in _TENSOR_FIELDS
        else [s[name] for s in samples]
        for name in samples[0]
    }


def _check_options(batch_size: int | None, split: str, vq_output: str) -> None:
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if vq_output not in VQ_OUTPUTS:
        raise ValueError(f"vq_output must be one of {list(VQ_OUTPUTS)}, got {vq_output!r}")


def _check_enough_shards(shards: int, workers: int, what: str) -> None:
    if shards < workers:
        raise ValueError(
            f'split="shards" needs at least one shard per reader, but {shards} shard(s) are '
            f'split over {workers} {what}; use split="samples" (or "auto")'
        )


def _codebook(directory: str, manifest: Manifest, vq_output: str) -> np.ndarray | None:
    if not manifest.is_vq or vq_output != "latents":
        return None
    return load_manifest_codebook(directory, manifest)


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): the overrides, else torch.distributed's, else (0, 1)."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialized else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialized else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
    return rank, world_size
