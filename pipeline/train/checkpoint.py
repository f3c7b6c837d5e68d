"""Checkpoint directories: everything needed to continue a run, loadable without pickle.

    <dir>/state.pt     {"model", "optimizer", "step"} saved with torch.save, loaded weights_only
    <dir>/config.yaml  the resolved training config (data, model, loss, train)

RNG streams are not stored: every rank reseeds from (seed, rank, step) when it starts, so a
resumed run is as deterministic as an uninterrupted one without carrying per-rank state.
"""

from __future__ import annotations

import os
import tempfile

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import load_yaml_as, save_resolved_config
from pipeline.models import build_model
from pipeline.train.config import TrainRunConfig

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


def write_checkpoint(directory: str, model, optimizer, step: int, cfg: TrainRunConfig) -> None:
    """Write a checkpoint into a local directory (Ray Train uploads it to storage)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    torch.save(state, os.path.join(directory, STATE_FILE))
    save_resolved_config(cfg, directory, CONFIG_FILE)


def read_state(directory: str) -> dict:
    """Load a checkpoint's state dict (local path or fsspec URL), refusing pickled objects."""
    with _local_copy(directory, STATE_FILE) as path:
        return torch.load(path, map_location="cpu", weights_only=True)


def read_config(directory: str) -> TrainRunConfig:
    with _local_copy(directory, CONFIG_FILE) as path:
        return load_yaml_as(TrainRunConfig, path)


def load_model(directory: str) -> tuple[torch.nn.Module, TrainRunConfig]:
    """The trained model of a checkpoint, in eval mode, with the config it was trained with."""
    cfg = read_config(directory)
    model = build_model(cfg.model)
    model.load_state_dict(read_state(directory)["model"])
    return model.eval(), cfg


class _local_copy:
    """Context manager yielding a local path for `directory/name`, downloading if remote."""

    def __init__(self, directory: str, name: str):
        self.fs, root = fsspec.core.url_to_fs(directory)
        self.remote = f"{root.rstrip('/')}/{name}"
        self.tmp = None

    def __enter__(self) -> str:
        if not self.fs.exists(self.remote):
            raise FileNotFoundError(f"checkpoint file missing: {self.remote}")
        if isinstance(self.fs, LocalFileSystem):
            return self.remote
        self.tmp = tempfile.TemporaryDirectory()
        local = os.path.join(self.tmp.name, os.path.basename(self.remote))
        self.fs.get(self.remote, local)
        return local

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()
