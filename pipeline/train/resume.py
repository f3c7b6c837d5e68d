"""What exact resume needs beyond weights and optimisers: the data position and the RNGs.

A run interrupted at a checkpoint and resumed logs the very losses of an uninterrupted one
(tests/integration/test_exact_resume.py). Three things make that so:

* **Data**: every rank reads `pipeline.data.stream` batches and keeps a `DataCursor` of what it
  consumed; at each checkpoint step all ranks' cursors are gathered (`all_gather`: a collective
  every rank reaches) and merged into the checkpoint's training state as "data"; a resumed
  loader starts exactly after the last batch trained on.
* **RNGs**: torch (CPU and CUDA), numpy's global and Python's `random` are reseeded from
  (train.seed, rank, step) before every optimiser step, so no RNG state carries from one step
  to the next and none needs saving: step s draws the same numbers (posterior samples, dropout,
  k-means initialisation, dead-code re-seeding) however the run got to s. The data stream's
  shuffle RNGs are part of its position.
* The rest is in training_state.pt: optimisers, step, GradScaler, VQ training buffers,
  discriminator; the lr schedule is a function of the step (pipeline/train/schedule.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.data.reader import DataConfig
from pipeline.data.stream import DataCursor, make_train_loader, merge_cursor_states

Batch = tuple[torch.Tensor, torch.Tensor | None]


def reseed(seed: int, rank: int, step: int) -> None:
    """Seed torch, numpy and random for optimiser step `step` of `rank` (distinct streams per
    rank and step: SeedSequence mixes the three numbers, no arithmetic collisions)."""
    words = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint64)
    torch.manual_seed(int(words[0]))  # also every CUDA device
    np.random.seed(int(words[1] % 2**32))
    random.seed(int(words[1]))


class ResumableBatches:
    """The rank's endless training batches on `device`, and the cursor of what it took.

    `saved` is the "data" entry of a checkpoint's training state (None: a fresh stream, or a
    checkpoint written before the stream existed); `fresh_epoch` numbers the epoch a stream
    that cannot continue exactly starts (another world size or DataLoader worker count).
    """

    def __init__(
        self,
        cfg: DataConfig,
        rank: int,
        world_size: int,
        device: torch.device,
        saved: dict | None = None,
        fresh_epoch: int = 0,
        layout: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    ):
        self.device, self.layout = device, layout
        self.cursor = DataCursor.resumed(saved, world_size, cfg.num_workers)
        loader = make_train_loader(cfg, rank, world_size, resume=saved, fresh_epoch=fresh_epoch)
        self.batches = iter(loader)

    def next(self) -> Batch:
        batch = next(self.batches)
        self.cursor.took(batch)
        images = self.layout(batch["images"].to(self.device, non_blocking=True))
        labels = batch.get("labels")
        return images, None if labels is None else labels.to(self.device, non_blocking=True)

    def take(self, count: int) -> list[Batch]:
        return [self.next() for _ in range(count)]

    def gathered_state(self, all_gather: Callable[[Any], list]) -> dict:
        """Every rank's cursor merged: call on all ranks at once (a collective under DDP)."""
        return merge_cursor_states(all_gather(self.cursor.state()))
