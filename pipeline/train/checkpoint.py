"""Checkpoint directories: everything needed to continue a run, loadable without pickle.

    <dir>/state.pt     {"model", "optimizer", "step"} (+ "disc", "disc_optimizer" with the
                       adversarial loss) saved with torch.save, loaded weights_only
    <dir>/config.yaml  the resolved training config (data, model, loss, train)

RNG streams are not stored: every rank reseeds from (seed, rank, step) when it starts, so a
resumed run is as deterministic as an uninterrupted one without carrying per-rank state.
"""

from __future__ import annotations

import logging
import os
import tempfile

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import load_yaml_as, save_resolved_config
from pipeline.models import build_model
from pipeline.train.config import TrainRunConfig

log = logging.getLogger("latentpipe.train")

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


def write_checkpoint(
    directory: str, model, optimizer, step: int, cfg: TrainRunConfig, extra: dict | None = None
) -> None:
    """Write a checkpoint into a local directory (Ray Train uploads it to storage).

    `extra` holds further stateful parts by name (e.g. "disc", "disc_optimizer"): anything
    with a `state_dict()`.
    """
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    state.update({name: part.state_dict() for name, part in (extra or {}).items()})
    torch.save(state, os.path.join(directory, STATE_FILE))
    save_resolved_config(cfg, directory, CONFIG_FILE)


def read_state(directory: str) -> dict:
    """Load a checkpoint's state dict (local path or fsspec URL), refusing pickled objects."""
    with _local_copy(directory, STATE_FILE) as path:
        return torch.load(path, map_location="cpu", weights_only=True)


def read_config(directory: str) -> TrainRunConfig:
    with _local_copy(directory, CONFIG_FILE) as path:
        return load_yaml_as(TrainRunConfig, path)


def latest_checkpoint(run_directory: str) -> str | None:
    """The newest `checkpoint_*` of a run whose state.pt loads (a URL or path), else None.

    Names sort oldest to newest (Ray: checkpoint_<timestamp>; one process: checkpoint_<step>).
    A copy cut short by a crash does not load and is skipped, so a run killed at any moment
    resumes from its newest complete checkpoint. The check loads the state once more than
    strictly needed; resuming is rare enough for that to be the right trade.
    """
    fs, root = fsspec.core.url_to_fs(run_directory)
    if not fs.exists(root):
        return None
    names = sorted(
        (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)), reverse=True
    )
    for name in (n for n in names if n.startswith("checkpoint_")):
        candidate = f"{run_directory.rstrip('/')}/{name}"
        try:
            read_state(candidate)
            return candidate
        except Exception as err:  # noqa: BLE001 - truncated zip, missing file: any is "incomplete"
            log.warning("skipping incomplete checkpoint %s: %s", candidate, err)
    return None


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
