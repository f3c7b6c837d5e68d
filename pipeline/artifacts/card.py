"""``latentpipe.json``: what a model artifact is, and the names of the files beside it.

A model artifact is a directory (local path or fsspec URL) holding the weights as safetensors and
JSON that fully describes the model. Its layout depends on the model:

  kind kl                       config.json (diffusers ``AutoencoderKL``) +
                                diffusion_pytorch_model.safetensors (diffusers' key names) +
                                latentpipe.json: ``AutoencoderKL.from_pretrained(dir)`` loads it
  kind vq, l2 distance          the same with a diffusers ``VQModel`` config.json
  kind vq (cosine), the         model.safetensors (latentpipe's key names) + latentpipe.json
  textbook VAEs

``latentpipe.json`` (this module's :class:`ModelCard`) is the description latentpipe reads: the
kind, the architecture (``model``: a ``ModelConfig`` as a dict), the image the model takes
(channels, value range, native resolution), the latent scale in effect (and where it came
from), the held-out quality, provenance (run, step, training data, or the import source) and the
weights' file name, sha256 and kind (``raw``, ``ema`` for the moving average training keeps in a
checkpoint's ``model_ema/``, ``published`` for an import). It sits *beside* diffusers' config.json rather than inside it so
config.json stays exactly what diffusers itself writes (``save_pretrained`` round-trips it, and no
diffusers version can start warning about keys it does not know). A directory diffusers saved,
with no latentpipe.json, is read as an ``AutoencoderKL`` described by its config.json alone
(:func:`pipeline.artifacts.store.load_model_artifact`).

The artifact's **content hash** (:func:`artifact_sha256`) is the sha256 of one line per file the
loader reads (latentpipe.json, config.json, the weights), each ``name sha256``, in name order:
other files in the directory (a README, a report) do not change it.

Torch-free (stdlib, fsspec and the contracts' field checks), so ``latentpipe verify`` can hash an
artifact without importing torch.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.contracts.fields import Fields
from pipeline.contracts.sidecar import (
    WEIGHT_KINDS,
    default_weight_kind,
    file_sha256,
    latentpipe_version,
)

CARD_FILE = "latentpipe.json"
CARD_FORMAT = "latentpipe.model"
CARD_VERSION = 1
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_BIN = (
    "diffusion_pytorch_model.bin"  # read (weights only) from diffusers dirs, never written
)
NATIVE_WEIGHTS = "model.safetensors"
# A training checkpoint holds its model artifact in this subdirectory (the trainer's own state
# sits beside it; see pipeline/train/checkpoint.py) and, with train.ema_decay > 0, a second
# artifact with the EMA of the weights in the other.
CHECKPOINT_MODEL_DIR = "model"
CHECKPOINT_EMA_DIR = "model_ema"
CHECKPOINT_WEIGHTS = {"raw": CHECKPOINT_MODEL_DIR, "ema": CHECKPOINT_EMA_DIR}

LAYOUT_AUTOENCODER_KL = "diffusers.AutoencoderKL"
LAYOUT_VQ_MODEL = "diffusers.VQModel"
LAYOUT_NATIVE = "latentpipe"
LAYOUTS = (LAYOUT_AUTOENCODER_KL, LAYOUT_VQ_MODEL, LAYOUT_NATIVE)
VALUE_RANGES = {"signed": [-1.0, 1.0], "unit": [0.0, 1.0]}
# published: the weights came with these factors (an import); measured: 1/std and mean of the
# latents over held-out images after training; unset: nobody measured them (identity scale).
SCALE_SOURCES = ("published", "measured", "unset")
_HASH_HEADER = "latentpipe model artifact v1\n"


class ArtifactError(ValueError):
    """A model artifact is missing, incomplete or does not describe itself correctly."""


@dataclass(frozen=True)
class ImageSpec:
    """The images the model takes: channels, value range and native (trained) resolution."""

    channels: int
    value_range: str  # "signed" = [-1, 1], "unit" = [0, 1]
    resolution: int

    @classmethod
    def from_dict(cls, f: Fields) -> ImageSpec:
        return cls(
            channels=f.int("channels", minimum=1),
            value_range=f.str("value_range", choices=tuple(VALUE_RANGES)),
            resolution=f.int("resolution", minimum=1),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "value_range": self.value_range,
            "range": list(VALUE_RANGES[self.value_range]),  # spelled out for other readers
            "resolution": self.resolution,
        }


@dataclass(frozen=True)
class LatentScale:
    """Diffusion consumes ``(latent - shift_factor) * scaling_factor``; ``source`` says why."""

    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    source: str = "unset"
    samples: int = 0  # images measured (source "measured")
    data: str = ""  # the shards they came from

    @classmethod
    def from_dict(cls, f: Fields) -> LatentScale:
        scale = cls(
            scaling_factor=f.float("scaling_factor"),
            shift_factor=f.float("shift_factor"),
            source=f.str("source", choices=SCALE_SOURCES),
            samples=f.int("samples", minimum=0),
            data=f.str("data"),
        )
        if scale.scaling_factor <= 0:
            raise f.fail("scaling_factor", "a positive number")
        return scale

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Provenance:
    """Where the weights came from: a training run (run dir, step, its data config) or an
    import (``source``: format, path, weights sha256)."""

    run: str | None = None
    step: int | None = None
    data: dict | None = None  # the run's DataConfig as a dict (shards, val_shards, ...)
    source: dict | None = None

    @classmethod
    def from_dict(cls, f: Fields) -> Provenance:
        return cls(
            run=f.str("run", optional=True),
            step=f.int("step", optional=True, minimum=0),
            data=f.dict("data", optional=True),
            source=f.dict("source", optional=True),
        )

    def to_dict(self) -> dict[str, Any]:
        return _copy(dataclasses.asdict(self))


@dataclass(frozen=True)
class ModelCard:
    """The content of ``latentpipe.json``; see the module docstring."""

    kind: str
    layout: str
    weights_file: str
    weights_sha256: str
    weights_bytes: int  # size of the weights file (a copy cut short is not complete)
    model: dict  # ModelConfig as a dict: the architecture, enough to rebuild the model
    image: ImageSpec
    latent_scale: LatentScale
    provenance: Provenance
    quality: dict | None = None  # held-out figures (pipeline.evaluate.quality), when measured
    created: str = ""
    latentpipe_version: str = ""
    weights_kind: str = "raw"  # which weights (contracts.sidecar.WEIGHT_KINDS): raw, ema, published

    @property
    def diffusers_layout(self) -> bool:
        return self.layout != LAYOUT_NATIVE

    def with_updates(self, **changes: Any) -> ModelCard:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": CARD_FORMAT,
            "format_version": CARD_VERSION,
            "kind": self.kind,
            "layout": self.layout,
            "weights": {
                "file": self.weights_file,
                "sha256": self.weights_sha256,
                "bytes": self.weights_bytes,
                "kind": self.weights_kind,
            },
            "model": _copy(self.model),
            "image": self.image.to_dict(),
            "latent_scale": self.latent_scale.to_dict(),
            "provenance": self.provenance.to_dict(),
            "created": self.created,
            "latentpipe_version": self.latentpipe_version,
        }
        if self.quality is not None:
            data["quality"] = _copy(self.quality)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ModelCard:
        f = Fields(data, where, ArtifactError)
        if data.get("format") != CARD_FORMAT:
            raise ArtifactError(
                f"{where}: 'format' is {data.get('format')!r}, expected {CARD_FORMAT!r}"
            )
        if data.get("format_version") != CARD_VERSION:
            raise ArtifactError(
                f"{where}: unsupported 'format_version' {data.get('format_version')!r} "
                f"(this latentpipe reads version {CARD_VERSION})"
            )
        weights = f.sub("weights")
        provenance = Provenance.from_dict(f.sub("provenance"))
        card = cls(
            kind=f.str("kind"),
            layout=f.str("layout", choices=LAYOUTS),
            weights_file=weights.str("file"),
            weights_sha256=weights.str("sha256"),
            weights_bytes=weights.int("bytes", minimum=0),
            model=f.dict("model"),
            image=ImageSpec.from_dict(f.sub("image")),
            latent_scale=LatentScale.from_dict(f.sub("latent_scale")),
            provenance=provenance,
            quality=f.dict("quality", optional=True),
            created=f.str("created"),
            latentpipe_version=f.str("latentpipe_version"),
            # Cards from before weights.kind: a run's raw weights, or an import's.
            weights_kind=(
                weights.str("kind", choices=WEIGHT_KINDS)
                if weights.has("kind")
                else default_weight_kind(provenance.source is None)
            ),
        )
        if card.model.get("kind") != card.kind:
            raise ArtifactError(
                f"{where}: field 'model.kind' is {card.model.get('kind')!r} but 'kind' is "
                f"{card.kind!r}"
            )
        if "/" in card.weights_file or not card.weights_file.endswith(".safetensors"):
            raise weights.fail("file", "a .safetensors file name beside latentpipe.json")
        return card


def new_card(**fields: Any) -> ModelCard:
    """A card stamped with the creation time and this latentpipe's version."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return ModelCard(created=now, latentpipe_version=latentpipe_version(), **fields)


# ----------------------------------------------------------------------------- files


def join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def is_model_dir(directory: str) -> bool:
    """True for a latentpipe artifact (latentpipe.json) or a diffusers dir (config.json)."""
    return exists(join(directory, CARD_FILE)) or exists(join(directory, DIFFUSERS_CONFIG))


def resolve_model_dir(path: str, weights: str = "raw") -> str:
    """The model artifact ``path`` names: ``path`` itself, a checkpoint's ``model/``, or for a
    run directory the ``model/`` of its newest complete ``checkpoint_*`` (what a job chain
    knows before training has named its checkpoints).

    ``weights="ema"`` prefers a checkpoint's ``model_ema/`` (the EMA of the weights) when it
    has a complete one; an artifact ``path`` names itself is used as it is, whatever it holds.
    """
    if is_model_dir(path):
        return path.rstrip("/")
    inner = join(path, CHECKPOINT_MODEL_DIR)
    if not is_model_dir(inner):
        inner = latest_checkpoint_model(path)
    if inner is not None:
        return _preferred_weights(inner, weights)
    raise FileNotFoundError(
        f"{path} is not a model artifact: it holds neither {CARD_FILE} nor {DIFFUSERS_CONFIG} "
        f"(nor does {inner}, as a training checkpoint would, nor a complete checkpoint_*/)"
    )


def checkpoint_weights(checkpoint: str, weights: str) -> str:
    """The artifact directory of ``weights`` ("raw" or "ema") inside a checkpoint directory."""
    if weights not in CHECKPOINT_WEIGHTS:
        raise ValueError(f"weights must be one of {list(CHECKPOINT_WEIGHTS)}, got {weights!r}")
    return join(checkpoint, CHECKPOINT_WEIGHTS[weights])


def _preferred_weights(model_dir: str, weights: str) -> str:
    """A checkpoint's ``model/`` or, for ``weights="ema"``, its complete ``model_ema/``."""
    checkpoint = checkpoint_of(model_dir)
    if weights != "raw" and checkpoint is not None:
        candidate = checkpoint_weights(checkpoint, weights)
        if is_complete(candidate):
            return candidate
    return model_dir


def latest_checkpoint_model(run_directory: str) -> str | None:
    """``model/`` of the newest ``checkpoint_*`` of a run whose artifact is complete, else None.

    Names sort oldest to newest (Ray: checkpoint_<timestamp>; one process: checkpoint_<step>).
    Complete: the card is there and the weights have the size it records, so a copy cut short
    (or still being uploaded) is passed over for the one before it.
    """
    fs, root = fsspec.core.url_to_fs(run_directory)
    if not fs.isdir(root):
        return None
    names = sorted(
        (
            e["name"].rstrip("/").rsplit("/", 1)[-1]
            for e in fs.ls(root, detail=True)
            if e["type"] == "directory"
        ),
        reverse=True,
    )
    for name in (n for n in names if n.startswith("checkpoint_")):
        candidate = join(join(run_directory, name), CHECKPOINT_MODEL_DIR)
        if is_complete(candidate):
            return candidate
    return None


def is_complete(directory: str) -> bool:
    """The artifact's card loads and its weights file has the recorded size."""
    try:
        card = read_card(directory)
        if card is None:
            return False
        fs, path = fsspec.core.url_to_fs(join(directory, card.weights_file))
        return fs.exists(path) and fs.size(path) == card.weights_bytes
    except (ArtifactError, OSError):
        return False


def checkpoint_of(model_dir: str) -> str | None:
    """The training checkpoint directory holding ``model_dir``, if it is one's ``model/``."""
    parent, _, name = model_dir.rstrip("/").rpartition("/")
    return parent if name == CHECKPOINT_MODEL_DIR and parent else None


def read_json(url: str) -> dict[str, Any]:
    try:
        with fsspec.open(url, "r") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"model artifact file not found: {url}") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{url} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{url} must hold a JSON object")
    return data


def write_json(url: str, data: dict[str, Any]) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(path, (json.dumps(data, indent=2) + "\n").encode())


def read_card(directory: str) -> ModelCard | None:
    """The artifact's latentpipe.json, validated; None for a diffusers dir without one."""
    url = join(directory, CARD_FILE)
    if not exists(url):
        return None
    return ModelCard.from_dict(read_json(url), url)


def write_card(directory: str, card: ModelCard) -> None:
    write_json(join(directory, CARD_FILE), card.to_dict())


def weights_file(directory: str, card: ModelCard | None) -> str:
    """Name of the weights file the loader reads (a diffusers dir may hold a .bin instead)."""
    if card is not None:
        return card.weights_file
    if not exists(join(directory, DIFFUSERS_WEIGHTS)) and exists(join(directory, DIFFUSERS_BIN)):
        return DIFFUSERS_BIN
    return DIFFUSERS_WEIGHTS


def artifact_files(directory: str) -> list[str]:
    """The files that make up the artifact (what its content hash covers), by name."""
    card = read_card(directory)
    names = {weights_file(directory, card)}
    if card is not None:
        names.add(CARD_FILE)
    if card is None or card.diffusers_layout:
        names.add(DIFFUSERS_CONFIG)
    return sorted(names)


def artifact_sha256(path: str) -> str:
    """Content hash of the model artifact at ``path`` (or in checkpoint ``path``/model)."""
    directory = resolve_model_dir(path)
    digest = hashlib.sha256(_HASH_HEADER.encode())
    for name in artifact_files(directory):
        url = join(directory, name)
        if not exists(url):
            raise ArtifactError(f"model artifact {directory} is incomplete: {name} is missing")
        digest.update(f"{name} {file_sha256(url)}\n".encode())
    return digest.hexdigest()


def _copy(value: Any) -> Any:
    """A deep copy of JSON-like data (so a caller mutating a dict cannot change a card)."""
    return json.loads(json.dumps(value))
