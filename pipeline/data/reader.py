"""Read image shards for training and evaluation.

`ShardImageDataset` splits the shard list across (rank, dataloader worker) slots with
`pipeline.data.split` (the rule `LatentDataset` uses too): no two slots ever see the same sample
and, together, they see all of them; the shard order is reshuffled identically on every slot
each epoch.

Samples are shuffled in a bounded buffer, then decoded and preprocessed to float32 [3, R, R]
tensors in [-1, 1]. Bad images and truncated shards are logged, counted and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from itertools import count

import numpy as np
import torch
from omegaconf import MISSING
from torch.utils.data import DataLoader, IterableDataset

from pipeline.data.images import (
    BadImageError,
    decode_image,
    find_image_field,
    normalize,
    resize_center_crop,
)
from pipeline.data.split import Slot, every_nth, reader_slot, shard_order, shards_of, whole_shards
from pipeline.data.tario import TarSample, TruncatedShardError, iter_tar_samples
from pipeline.data.urls import expand_shard_urls

log = logging.getLogger(__name__)


class ValueRange(StrEnum):
    signed = "signed"  # [-1, 1]: the autoencoders
    unit = "unit"  # [0, 1]: the Bernoulli textbook VAEs


@dataclass
class DataConfig:
    """Training data: shard specs (see `expand_shard_urls`) and loader settings."""

    shards: str = MISSING
    val_shards: str = ""
    resolution: int = 64
    batch_size: int = 16
    num_workers: int = 1
    shuffle_buffer: int = 256
    seed: int = 0
    channels: int = 3  # 3 = RGB, 1 = grayscale (MNIST-style data)
    value_range: ValueRange = ValueRange.signed
    label_field: str = ""  # e.g. "cls": yield (image, label) pairs for conditional models

    def __post_init__(self) -> None:
        self.value_range = ValueRange(self.value_range)  # a bad value fails here or at load


def shuffled(items: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream with a bounded buffer (buffer_size <= 1 keeps the order)."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        pick = int(rng.integers(buffer_size))
        yield buffer[pick]
        buffer[pick] = item
    rng.shuffle(buffer)
    yield from buffer


VALUE_RANGES = tuple(ValueRange)


def prepare_pixels(data: bytes, resolution: int, channels: int = 3) -> np.ndarray:
    """Image bytes -> uint8 [R, R, channels], centre-cropped (raises BadImageError)."""
    hwc = resize_center_crop(decode_image(data), resolution)
    if channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
        hwc = np.rint(hwc @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.uint8)
    return hwc


def to_tensor(hwc: np.ndarray, value_range: str = "signed") -> torch.Tensor:
    """uint8 HWC -> float32 tensor [C, R, R] in [-1, 1] ("signed") or [0, 1] ("unit")."""
    if value_range == "unit":
        return torch.from_numpy(hwc.transpose(2, 0, 1).astype(np.float32) / 255.0)
    return torch.from_numpy(normalize(hwc))


def preprocess(
    data: bytes, resolution: int, channels: int = 3, value_range: str = "signed"
) -> torch.Tensor:
    """Image bytes -> float32 tensor [C, R, R] in [-1, 1] or [0, 1] (raises BadImageError)."""
    return to_tensor(prepare_pixels(data, resolution, channels), value_range)


def parse_label(files: dict[str, bytes], field: str) -> int:
    """The integer class label stored in `field` (WebDataset's `.cls`: ASCII digits)."""
    if field not in files:
        raise BadImageError(f"no {field!r} label field (has {sorted(files)})")
    try:
        return int(files[field].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise BadImageError(f"label field {field!r} is not an integer") from None


class ShardImageDataset(IterableDataset):
    """Iterable over preprocessed images of WebDataset shards (see module docstring).

    `skipped` / `truncated_shards` count bad samples and damaged shards seen by this copy of the
    dataset (each dataloader worker process has its own copy; every event is also logged).
    """

    def __init__(
        self,
        urls: list[str],
        resolution: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 256,
        seed: int = 0,
        epoch: int = 0,
        repeat: bool = False,
        channels: int = 3,
        value_range: str = "signed",
        label_field: str = "",
    ):
        super().__init__()
        if not urls:
            raise ValueError("ShardImageDataset needs at least one shard URL")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.urls = list(urls)
        self.resolution = resolution
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = epoch
        self.repeat = repeat
        self.decoder = ExampleDecoder(resolution, channels, value_range, label_field)
        self.skipped = 0
        self.truncated_shards = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of the next pass (for repeat=False training loops)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        slot = reader_slot(self.rank, self.world_size)
        epochs = count(self.epoch) if self.repeat else [self.epoch]
        for epoch in epochs:
            produced = 0
            for tensor in self._iter_epoch(epoch, slot):
                produced += 1
                yield tensor
            if self.repeat and produced == 0:
                raise RuntimeError(
                    f"data slot {slot.index}/{slot.count} got no usable images from "
                    f"{len(self.urls)} shard(s); add data or use fewer ranks/workers"
                )

    def _iter_epoch(self, epoch: int, slot: Slot) -> Iterator[torch.Tensor]:
        order = shard_order(len(self.urls), self.seed, epoch)
        if whole_shards(len(order), slot):
            samples = self._iter_samples([self.urls[i] for i in shards_of(order, slot)])
        else:
            samples = every_nth(self._iter_samples([self.urls[i] for i in order]), slot)
        rng = np.random.default_rng([self.seed, epoch, slot.index])
        for sample in shuffled(samples, self.shuffle_buffer, rng):
            tensor = self._decode(sample)
            if tensor is not None:
                yield tensor

    def _iter_samples(self, urls: list[str]) -> Iterator[TarSample]:
        for url in urls:
            try:
                yield from iter_tar_samples(url)
            except TruncatedShardError as err:
                self.truncated_shards += 1
                log.warning("%s; continuing with the next shard", err)

    def _decode(self, sample: TarSample) -> torch.Tensor | tuple[torch.Tensor, int] | None:
        example = self.decoder(sample)
        self.skipped = self.decoder.skipped
        return example


class ExampleDecoder:
    """Raw sample -> training example: the image tensor, or (image, label) with a label field;
    None (logged, counted in ``skipped``) when the sample is unusable."""

    def __init__(
        self, resolution: int, channels: int = 3, value_range: str = "signed", label_field: str = ""
    ):
        if channels not in (1, 3) or value_range not in VALUE_RANGES:
            raise ValueError(
                f"data.channels must be 1 or 3 and data.value_range one of {VALUE_RANGES}; "
                f"got {channels}, {value_range!r}"
            )
        self.resolution, self.channels, self.value_range = resolution, channels, value_range
        self.label_field = label_field
        self.skipped = 0

    def __call__(self, sample: TarSample) -> torch.Tensor | tuple[torch.Tensor, int] | None:
        field = find_image_field(sample.files)
        if field is None:
            reason = f"no image field (has {sorted(sample.files)})"
        else:
            try:
                image = preprocess(
                    sample.files[field], self.resolution, self.channels, self.value_range
                )
                if not self.label_field:
                    return image
                return image, parse_label(sample.files, self.label_field)
            except BadImageError as err:
                reason = str(err)
        self.skipped += 1
        log.warning("skipping sample %r: %s", sample.key, reason)
        return None


def make_loader(
    cfg: DataConfig, rank: int = 0, world_size: int = 1, repeat: bool = True, epoch: int = 0
) -> DataLoader:
    """DataLoader over `cfg.shards` for one rank (drop_last, no persistent workers)."""
    dataset = ShardImageDataset(
        expand_shard_urls(cfg.shards),
        cfg.resolution,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        epoch=epoch,
        repeat=repeat,
        channels=cfg.channels,
        value_range=cfg.value_range,
        label_field=cfg.label_field,
    )
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=False,
        drop_last=True,
    )


AUTO_LABEL = "auto"  # iter_val_samples: the "cls" label when a sample has one, else none


@dataclass(frozen=True)
class ValSample:
    key: str
    pixels: np.ndarray  # uint8 [R, R, channels], centre-cropped
    label: int | None


def iter_val_samples(
    urls: list[str] | str,
    resolution: int,
    limit: int | None = None,
    channels: int = 3,
    label_field: str = "",
) -> Iterator[ValSample]:
    """The one validation reader: up to `limit` good samples in shard order, the same every
    time (evaluation, the report, export's latent statistics and the demo all read this way).

    `urls` may also be a spec string for `expand_shard_urls`. `label_field`: "" = no labels;
    a field name = every sample needs it (one without is skipped, like a bad image);
    ``AUTO_LABEL`` = the ``cls`` field where a sample has one. Bad images and truncated shards
    are logged and skipped.
    """
    if isinstance(urls, str):
        urls = expand_shard_urls(urls)
    produced = 0
    for url in urls:
        try:
            for sample in iter_tar_samples(url):
                if limit is not None and produced >= limit:
                    return
                val = _val_sample(sample, resolution, channels, label_field)
                if val is not None:
                    produced += 1
                    yield val
        except TruncatedShardError as err:
            log.warning("%s; continuing with the next shard", err)


def _val_sample(
    sample: TarSample, resolution: int, channels: int, label_field: str
) -> ValSample | None:
    field = find_image_field(sample.files)
    if field is None:
        log.warning("skipping sample %r: no image field", sample.key)
        return None
    try:
        pixels = prepare_pixels(sample.files[field], resolution, channels)
        if label_field == AUTO_LABEL:
            label_field = "cls" if "cls" in sample.files else ""
        label = parse_label(sample.files, label_field) if label_field else None
    except BadImageError as err:
        log.warning("skipping sample %r: %s", sample.key, err)
        return None
    return ValSample(sample.key, pixels, label)


def iter_val_images(
    urls: list[str] | str, resolution: int, limit: int | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """(key, uint8 HWC [R, R, 3]) of :func:`iter_val_samples`: export's statistics, the demo."""
    for val in iter_val_samples(urls, resolution, limit):
        yield val.key, val.pixels
