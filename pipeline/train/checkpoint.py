"""Checkpoint directories: the model artifact plus everything needed to continue a run.

    <dir>/model/              the model artifact (pipeline.artifacts): inference weights as
                              safetensors + latentpipe.json (run, step, data) + for KL (and l2
                              VQ) models diffusers' config.json; what export, evaluation, the
                              report, verify and the demo read
    <dir>/training_state.pt   {"optimizer", "step", "model_buffers", "data", "scaler"} (+
                              "disc", "disc_optimizer" with the adversarial loss), torch.save'd
                              and loaded weights_only; "model_buffers" are the buffers only
                              training reads (a VQ codebook's EMA statistics and re-seeding
                              pool), "data" every rank's data-stream position (merged
                              `DataCursor` states), "scaler" the fp16 GradScaler ({} otherwise)
    <dir>/config.yaml         the resolved training config (data, model, loss, train)
    <dir>/model_ema/          with train.ema_decay > 0: the EMA of the weights, a model artifact
                              of its own (weights.kind "ema" in its latentpipe.json; a diffusers
                              directory like model/); the training state's "ema" holds
                              {"updates", "decay", "model_buffers"} beside it

Training state is read only here, by the trainer: everything else loads ``<dir>/model``.
RNG streams are not stored: every rank reseeds torch, numpy and random from (seed, rank, step)
before every step (pipeline/train/resume.py), so no RNG state carries from one step to the next
and a resumed run draws what the uninterrupted one draws.
"""

from __future__ import annotations

import logging
import os
import tempfile

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.artifacts.card import (
    CHECKPOINT_EMA_DIR,
    CHECKPOINT_MODEL_DIR,
    ImageSpec,
    Provenance,
    join,
)
from pipeline.artifacts.store import (
    config_dict,
    inference_state,
    load_model_artifact,
    save_model_artifact,
)
from pipeline.config import load_yaml_as, save_resolved_config
from pipeline.models import training_buffers
from pipeline.train.config import TrainRunConfig, run_dir
from pipeline.train.ema import load_ema_entry, save_ema

log = logging.getLogger("latentpipe.train")

STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
MODEL_DIR = CHECKPOINT_MODEL_DIR


def write_checkpoint(
    directory: str,
    model,
    optimizer,
    step: int,
    cfg: TrainRunConfig,
    extra: dict | None = None,
    plain: dict | None = None,
    ema=None,
) -> None:
    """Write a checkpoint into a local directory (Ray Train uploads it to storage).

    `model` is the bare model (not a DDP wrapper). `extra` holds further stateful parts by
    name (e.g. "disc", "disc_optimizer"): anything with a `state_dict()`; `plain` entries that
    are saved as they are (e.g. "data", "scaler": tensors and JSON-like values). `ema` (a
    pipeline.train.ema.ModelEMA) adds model_ema/ and the state's "ema" entry.
    """
    save_model_artifact(
        os.path.join(directory, MODEL_DIR),
        model,
        cfg.model,
        image=ImageSpec(cfg.data.channels, str(cfg.data.value_range), cfg.data.resolution),
        provenance=Provenance(run=run_dir(cfg.train), step=step, data=config_dict(cfg.data)),
    )
    buffers = set(training_buffers(model))
    state = {
        "optimizer": optimizer.state_dict(),
        "step": step,
        "model_buffers": {k: v for k, v in model.state_dict().items() if k in buffers},
    }
    state.update({name: part.state_dict() for name, part in (extra or {}).items()})
    state.update(plain or {})
    if ema is not None:  # the EMA weights: a model artifact of their own, beside model/
        state["ema"] = save_ema(os.path.join(directory, CHECKPOINT_EMA_DIR), ema, cfg, step)
    torch.save(state, os.path.join(directory, STATE_FILE))
    save_resolved_config(cfg, directory, CONFIG_FILE)


def read_state(directory: str) -> dict:
    """A checkpoint's training state (local path or fsspec URL), refusing pickled objects,
    with "model" the model's whole state dict: the artifact's weights (hash-checked) plus the
    training-only buffers kept beside it."""
    with _local_copy(directory, STATE_FILE) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model, _, _ = load_model_artifact(join(directory, MODEL_DIR))
    state["model"] = {**inference_state(model), **state.pop("model_buffers")}
    if "ema" in state:
        state["ema"] = load_ema_entry(join(directory, CHECKPOINT_EMA_DIR), state["ema"])
    return state


def put_tree(fs, local_dir: str, target: str) -> None:
    """Copy a checkpoint built in ``local_dir`` (files and the model/ subdirectory) to
    ``target`` on ``fs``, file by file in name order; a retry overwrites a partial copy."""
    for parent, dirs, files in os.walk(local_dir):
        dirs.sort()
        rel = os.path.relpath(parent, local_dir)
        remote = target if rel == "." else f"{target}/{rel.replace(os.sep, '/')}"
        fs.makedirs(remote, exist_ok=True)
        for name in sorted(files):
            fs.put_file(os.path.join(parent, name), f"{remote}/{name}")


def local_file_sizes(local_dir: str) -> dict[str, int]:
    """{path relative to `local_dir` (posix): size in bytes} of every file below it."""
    sizes = {}
    for parent, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(parent, name)
            sizes[os.path.relpath(path, local_dir).replace(os.sep, "/")] = os.path.getsize(path)
    return sizes


def remote_file_sizes(fs, root: str) -> dict[str, int]:
    """The same map for a directory on an fsspec filesystem, listed afresh (no cached listing)."""
    fs.invalidate_cache(root)
    found = fs.find(root, detail=True) if fs.exists(root) else {}
    return {_relative(path, root): info["size"] for path, info in found.items()}


def pyarrow_file_sizes(fs, root: str) -> dict[str, int]:
    """The same map for a directory on a pyarrow filesystem (what Ray Train uploads through)."""
    from pyarrow.fs import FileSelector, FileType

    infos = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    return {_relative(i.path, root): i.size for i in infos if i.type == FileType.File}


def check_upload_complete(local: dict[str, int], remote: dict[str, int], target: str) -> None:
    """Raise OSError unless every local file is at `target` with its size.

    Why: an object store client can lose a write and still report success. Seen here with
    pyarrow 26 and an S3 server restarting mid-upload: pyarrow logged the failed part upload
    as "Error ignored when destroying file" and Ray reported the checkpoint created, which
    would leave a checkpoint naming a step it cannot restore. The upload is retried on this
    error like on any other.
    """
    bad = [
        f"{name} (missing)" if name not in remote else f"{name} ({remote[name]} of {size} bytes)"
        for name, size in sorted(local.items())
        if remote.get(name) != size
    ]
    if bad:
        raise OSError(
            f"checkpoint upload to {target} incomplete: {len(bad)} of {len(local)} files "
            f"missing or short: {', '.join(bad[:3])}"
        )


def _relative(path: str, root: str) -> str:
    return path.rstrip("/")[len(root.rstrip("/")) + 1 :]


def read_config(directory: str) -> TrainRunConfig:
    with _local_copy(directory, CONFIG_FILE) as path:
        return load_yaml_as(TrainRunConfig, path)


def latest_checkpoint(run_directory: str, newer_than: str = "") -> str | None:
    """The newest `checkpoint_*` of a run whose state loads (a URL or path), else None;
    with `newer_than` (a checkpoint name), only one whose name sorts after it.

    Names sort oldest to newest (Ray: checkpoint_<timestamp>; one process: checkpoint_<step>).
    A copy cut short by a crash does not load and is skipped, so a run killed at any moment
    resumes from its newest complete checkpoint. The check loads the state once more than
    strictly needed; resuming is rare enough for that to be the right trade.
    """
    fs, root = fsspec.core.url_to_fs(run_directory)
    if not fs.exists(root):
        return None
    # Directories only: Ray Train keeps checkpoint_manager_snapshot.json beside them.
    entries = fs.ls(root, detail=True)
    names = sorted(
        (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"),
        reverse=True,
    )
    for name in (n for n in names if n.startswith("checkpoint_") and n > newer_than):
        candidate = f"{run_directory.rstrip('/')}/{name}"
        try:
            read_state(candidate)
            return candidate
        except Exception as err:  # noqa: BLE001 - truncated zip, missing file: any is "incomplete"
            log.warning("skipping incomplete checkpoint %s: %s", candidate, err)
    return None


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
