"""TensorBoard event files in the run directory, beside metrics.jsonl (rank 0 only).

    tensorboard --logdir runs/ --host 127.0.0.1

Every metrics.jsonl record becomes scalars at its step (``train/loss``, ``train/images_per_s``,
…; the end-of-training evaluation ``eval/psnr_db``, ``eval/ema/psnr_db``, …), and every
``train.image_every`` steps a reconstruction grid of a fixed batch (``reconstructions``: the
originals in the first row, the raw weights' reconstructions below, the EMA weights' in a third
row when ``train.ema_decay`` > 0). The writer is torch's ``SummaryWriter`` (the ``tensorboard``
package). On object stores (``s3://``, ``gs://``, ``memory://``) the event files are written to
a local temporary directory and copied into the run directory at every checkpoint and when
training ends (with the same retries as checkpoint uploads): an event file is append-only, so
each copy replaces the last one whole.

A resumed run opens its writer with ``purge_step`` = the step it resumed from + 1, so steps the
interrupted attempt logged after its last checkpoint are hidden instead of drawn twice.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.data.reader import DataConfig
from pipeline.evaluate.quality import held_out_batches
from pipeline.models.adversarial import unwrap
from pipeline.models.family import family_of
from pipeline.train.config import TrainConfig, TrainRunConfig, run_dir
from pipeline.train.retry import with_retries

log = logging.getLogger("latentpipe.train")

GRID_IMAGES = 8  # images in the reconstruction grid


class Board:
    """A run's TensorBoard writer; see the module docstring."""

    def __init__(
        self,
        run_directory: str,
        purge_step: int | None = None,
        attempts: int = 1,
        backoff_s: float = 0.0,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

        self.fs, self.root = fsspec.core.url_to_fs(run_directory)
        self.remote = not isinstance(self.fs, LocalFileSystem)
        if self.remote:
            self.logdir = tempfile.mkdtemp(prefix="latentpipe-tensorboard-")
        else:
            self.logdir = self.root
            os.makedirs(self.logdir, exist_ok=True)
        self.retry = {"attempts": attempts, "backoff_s": backoff_s}
        self.writer = SummaryWriter(log_dir=self.logdir, purge_step=purge_step)

    def scalars(self, record: dict, prefix: str = "train") -> None:
        """Every number of a metrics record (nested dicts too) at the record's step."""
        step = int(record["step"])
        for tag, value in _numbers(record, prefix):
            if tag != f"{prefix}/step":
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """A [C, H, W] image in [0, 1] (C = 1 or 3)."""
        self.writer.add_image(tag, image.detach().float().cpu().clamp(0, 1), step)

    def sync(self) -> None:
        """Flush; on an object store also copy the event files into the run directory."""
        self.writer.flush()
        if self.remote:
            what = f"TensorBoard upload to {self.root}"
            with_retries(self._upload, what, **self.retry)

    def close(self) -> None:
        self.writer.close()
        self.sync()
        if self.remote:
            shutil.rmtree(self.logdir, ignore_errors=True)

    def _upload(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        for name in sorted(os.listdir(self.logdir)):
            self.fs.put_file(os.path.join(self.logdir, name), f"{self.root.rstrip('/')}/{name}")


def _numbers(record: dict, prefix: str) -> Iterator[tuple[str, float]]:
    for key, value in record.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, dict):
            yield from _numbers(value, tag)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield tag, float(value)


def grid_batch(
    data: DataConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The fixed images of the reconstruction grid: the first of the validation shards (of the
    training shards without them), read apart from the training stream, which it leaves as is.
    None when they hold no usable image."""
    spec = dataclasses.replace(data, val_shards=data.val_shards or data.shards)
    batches = held_out_batches(spec, GRID_IMAGES, batch_size=GRID_IMAGES)
    if not batches:
        log.warning("no images for the TensorBoard reconstruction grid in %s", spec.val_shards)
        return None
    images, labels = batches[0]
    return images.to(device), None if labels is None else labels.to(device)


@torch.no_grad()
def reconstruction_grid(
    models: list[torch.nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor | None,
    value_range: str,
) -> torch.Tensor:
    """[C, rows x H, N x W] in [0, 1]: the images, then each model's reconstructions, by row.

    The models run in eval mode (no sampling, no codebook updates, no collectives) and are put
    back in the mode they were in, so the grid changes nothing the training step reads.
    """
    rows = [_unit(images, value_range)]
    for model in models:
        mode = model.training
        model.eval()
        recon = family_of(model).reconstruct(model, images, labels)[0]
        model.train(mode)
        # The textbook VAEs reconstruct in [0, 1] already (their data is value_range unit).
        rows.append(_unit(recon, value_range).clamp(0, 1))
    return torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)


def _unit(images: torch.Tensor, value_range: str) -> torch.Tensor:
    return images if value_range == "unit" else (images + 1) / 2


def check_board(t: TrainConfig) -> None:
    if t.image_every < 0:
        raise ValueError(f"train.image_every={t.image_every}: expected >= 0 (0 = no grid)")


class RunBoard:
    """What the training loop writes to TensorBoard: rank 0's Board and the fixed grid batch.

    On other ranks, or with ``train.tensorboard=false``, every method does nothing, so the loop
    calls them unconditionally.
    """

    def __init__(self, cfg: TrainRunConfig, board: Board | None, grid) -> None:
        self.cfg = cfg
        self.board = board
        self.grid = grid

    @classmethod
    def for_worker(
        cls, cfg: TrainRunConfig, rank: int, start_step: int, device: torch.device
    ) -> RunBoard:
        t = cfg.train
        if rank != 0 or not t.tensorboard:
            return cls(cfg, None, None)
        board = Board(
            run_dir(t),
            purge_step=start_step + 1 if start_step else None,
            attempts=t.upload_attempts,
            backoff_s=t.upload_backoff_s,
        )
        grid = grid_batch(cfg.data, device) if t.image_every > 0 else None
        return cls(cfg, board, grid)

    def record(self, record: dict) -> None:
        if self.board is not None:
            self.board.scalars(record)

    def after_step(self, step: int, models: list[torch.nn.Module]) -> None:
        """The reconstruction grid at every ``train.image_every``-th step."""
        every = self.cfg.train.image_every
        if self.board is None or self.grid is None or step % every:
            return
        images, labels = self.grid
        grid = reconstruction_grid(
            [unwrap(m) for m in models], images, labels, str(self.cfg.data.value_range)
        )
        self.board.image("reconstructions", grid, step)

    def sync(self) -> None:
        if self.board is not None:
            self.board.sync()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def write_eval(t: TrainConfig, record: dict) -> None:
    """The end-of-training evaluation record ({"step", "eval": {...}}) as ``eval/...`` scalars."""
    if not t.tensorboard:
        return
    board = Board(run_dir(t), attempts=t.upload_attempts, backoff_s=t.upload_backoff_s)
    board.scalars(record["eval"] | {"step": record["step"]}, prefix="eval")
    board.close()
