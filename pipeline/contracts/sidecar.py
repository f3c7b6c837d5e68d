"""The ``encoder.json`` sidecar: everything a consumer needs to feed and interpret the ONNX encoder.

A typed contract: :class:`Sidecar` (frozen) is what export builds and writes and what encode,
verify and users read; :meth:`Sidecar.from_dict` validates every field on load and names the
field and the file when one is missing or of the wrong type.

``model`` (:class:`ModelRef`, schema version 2) names the model artifact the encoder was exported
from: its path, its content hash (``pipeline.artifacts.card.artifact_sha256``) and the training
step. Version 1 sidecars (and the manifests that embed them) still load: their ``checkpoint``
block (path, step, sha256 of a training checkpoint's ``state.pt``) becomes a ModelRef with the
path and step and no hash, since that hash pinned a file model artifacts no longer have.

The sidecar lives beside the ONNX file with the same stem and pins the ONNX bytes by sha256, so a
swapped or partially copied model is detected before any latents are produced with it.

VQ encoders (``model_kind: "vq"``) add the codebook: ``codebook.npy`` beside the ONNX file
(float32 [num_codes, code_dim], exactly what the quantizer looks codes up in), pinned by
``codebook_sha256``, plus ``num_codes``, ``code_dim``, ``distance``, ``index_shape`` and the
``index_dtype`` the encode job stores indices as (:class:`VQSpec`; flat keys in the JSON).
``latent_shape`` and the scaling/shift factors then describe the *quantized* latents (the
codebook lookup), which is what diffusion consumes.

Spatial size: ``input.spatial`` is ``"dynamic"`` when the graph takes any height/width that are
positive multiples of ``input.size_multiple`` (the downsample factor); ``input.shape`` and the
``outputs`` shapes then hold None for batch and spatial axes. ``input.resolution`` stays the
native (trained) size and ``latent_shape``/``index_shape`` the latents at that size; use
:meth:`Sidecar.latent_shape_for` for other sizes. Sidecars without ``input.spatial`` (older
exports) and ``"fixed"`` ones accept only ``resolution`` x ``resolution`` images.

``quality`` (optional) holds the model's held-out figures from training
(``pipeline.evaluate.quality``: ``psnr_db``, ``ssim``, ``images`` and, for VQ, codebook usage);
``latentpipe verify`` compares a corpus's decoded PSNR with it.

``weights`` says which weights the encoder holds (:data:`WEIGHT_KINDS`): ``"raw"`` (the trained
weights as the optimiser left them), ``"ema"`` (their exponential moving average, kept by
training with ``train.ema_decay``) or ``"published"`` (an import: weights as someone else
published them). Sidecars written before the field existed still load: theirs is ``"published"``
when the model has no training step (an import), else ``"raw"`` (all that export wrote then).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.contracts.fields import Fields

SIDECAR_FORMAT = "latentpipe.encoder"
SIDECAR_VERSION = 2
READABLE_VERSIONS = (1, 2)
RESIZE_MODE = "shorter_side_bicubic_center_crop"
SPATIAL_MODES = ("dynamic", "fixed")
MODEL_KINDS = ("kl", "vq")
DISTANCES = ("l2", "cosine")
INDEX_DTYPES = ("uint16", "int32")
# Which weights a model artifact or an encoder holds; see the module docstring.
WEIGHT_KINDS = ("raw", "ema", "published")
VQ_KEYS = ("num_codes", "code_dim", "distance", "index_dtype", "codebook_file", "codebook_sha256")


class SidecarError(ValueError):
    """The sidecar is missing, malformed or does not match its ONNX file."""


@dataclass(frozen=True)
class InputSpec:
    """What the graph's input tensor is and how images become it."""

    name: str
    shape: list
    dtype: str
    layout: str
    color: str
    resolution: int
    spatial: str
    size_multiple: int
    resize: str
    normalization: dict  # {"scale": float, "offset": float, "range": [lo, hi]}: x/scale + offset

    @classmethod
    def from_dict(cls, f: Fields, factor: int) -> InputSpec:
        norm = f.sub("normalization")
        normalization = {
            "scale": norm.float("scale"),
            "offset": norm.float("offset"),
            "range": _range(norm),
        }
        return cls(
            name=f.str("name"),
            shape=f.list("shape"),
            dtype=f.str("dtype"),
            layout=f.str("layout"),
            color=f.str("color"),
            resolution=f.int("resolution", minimum=1),
            # Older exports predate dynamic spatial axes: they are fixed-size.
            spatial=f.str("spatial", choices=SPATIAL_MODES) if f.has("spatial") else "fixed",
            size_multiple=f.int("size_multiple", minimum=1) if f.has("size_multiple") else factor,
            resize=f.str("resize"),
            normalization=normalization,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "layout": self.layout,
            "color": self.color,
            "resolution": self.resolution,
            "spatial": self.spatial,
            "size_multiple": self.size_multiple,
            "resize": self.resize,
            "normalization": dict(self.normalization),
        }


@dataclass(frozen=True)
class VQSpec:
    """The codebook of a VQ encoder and how its code indices are stored."""

    num_codes: int
    code_dim: int
    distance: str
    index_dtype: str
    codebook_file: str
    codebook_sha256: str
    index_shape: list[int]

    @classmethod
    def from_dict(cls, f: Fields) -> VQSpec:
        spec = cls(
            num_codes=f.int("num_codes", minimum=1),
            code_dim=f.int("code_dim", minimum=1),
            distance=f.str("distance", choices=DISTANCES),
            index_dtype=f.str("index_dtype", choices=INDEX_DTYPES),
            codebook_file=f.str("codebook_file"),
            codebook_sha256=f.str("codebook_sha256"),
            index_shape=f.ints("index_shape", length=2),
        )
        if posixpath.basename(spec.codebook_file) != spec.codebook_file or not spec.codebook_file:
            raise f.fail("codebook_file", "a plain file name beside the .onnx")
        if spec.index_dtype != index_dtype(spec.num_codes):
            raise f.fail(
                "index_dtype", f"{index_dtype(spec.num_codes)!r} for {spec.num_codes} codes"
            )
        return spec

    def fields(self) -> dict[str, Any]:
        """The flat JSON keys (``index_shape`` is written with the outputs, before these)."""
        return {key: getattr(self, key) for key in VQ_KEYS}


@dataclass(frozen=True)
class ModelRef:
    """The model artifact an encoder came from: path, content hash and training step."""

    path: str | None = None
    sha256: str | None = None  # pipeline.artifacts.card.artifact_sha256 of the directory
    step: int | None = None  # training step of the weights (None: an import)

    @classmethod
    def from_dict(cls, f: Fields) -> ModelRef:
        return cls(
            path=f.str("path", optional=True),
            sha256=f.str("sha256", optional=True),
            step=f.int("step", optional=True, minimum=0),
        )

    @classmethod
    def from_v1_checkpoint(cls, f: Fields) -> ModelRef:
        """A version 1 ``checkpoint`` block; its sha256 was of ``state.pt``, not an artifact."""
        return cls(path=f.str("path", optional=True), step=f.int("step", optional=True))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "step": self.step}


@dataclass(frozen=True)
class Sidecar:
    """One exported encoder (schema version 2); see the module docstring."""

    model_kind: str
    onnx_file: str
    onnx_sha256: str
    opset: int
    input: InputSpec
    outputs: dict  # {name: [None, *dims]}: None = a dynamic axis
    downsample_factor: int
    latent_channels: int
    latent_shape: list[int]
    scaling_factor: float
    shift_factor: float
    # "data" (measured at export) or "checkpoint" (the published factors the model carries; the
    # name predates model artifacts and stays: manifests record it)
    scaling_source: str
    latent_stats: dict  # {"mean", "std", "samples", "source"}
    parity: dict
    model: ModelRef  # the model artifact the weights came from
    quality: dict | None
    created: str
    latentpipe_version: str
    vq: VQSpec | None = None
    output_dtypes: dict | None = None
    weights: str = "raw"  # one of WEIGHT_KINDS

    @property
    def is_vq(self) -> bool:
        return self.vq is not None

    @property
    def dynamic_spatial(self) -> bool:
        """True if the encoder takes any multiple-of-the-factor height/width (False for older
        sidecars, which predate ``input.spatial``, and for ``"fixed"`` ones)."""
        return self.input.spatial == "dynamic"

    def latent_shape_for(self, height: int, width: int) -> list[int]:
        """Per-image latent shape ``[C, height/f, width/f]`` for ``height`` x ``width`` inputs.

        KL: the shape of ``mean``/``logvar``. VQ: the shape of ``quantized`` (what
        ``latent_shape`` describes); the ``indices`` are ``[height/f, width/f]``, i.e. this shape
        without C. Raises ValueError unless both sides are positive multiples of the downsample
        factor ``f``, or, for an encoder without dynamic spatial axes, unless they equal its
        resolution.
        """
        factor = self.downsample_factor
        if not (height > 0 and width > 0 and height % factor == 0 and width % factor == 0):
            raise ValueError(
                f"image size {height}x{width} must be positive multiples of the encoder's "
                f"downsample factor {factor}"
            )
        resolution = self.input.resolution
        if not self.dynamic_spatial and (height, width) != (resolution, resolution):
            raise ValueError(
                f"this encoder has a fixed input size {resolution}x{resolution} (re-export it "
                f"for dynamic spatial size); got {height}x{width}"
            )
        return [self.latent_shape[0], height // factor, width // factor]

    def codebook_url(self, onnx_path: str) -> str:
        """Path/URL of the VQ codebook (it sits beside the ONNX file)."""
        if self.vq is None:
            raise ValueError("a KL encoder has no codebook")
        return posixpath.join(posixpath.dirname(onnx_path), self.vq.codebook_file)

    def quality_psnr_db(self) -> float | None:
        """The held-out reconstruction PSNR (dB) training measured, if the sidecar records it."""
        value = (self.quality or {}).get("psnr_db")
        return (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, key for key as export has always written it."""
        data: dict[str, Any] = {
            "format": SIDECAR_FORMAT,
            "format_version": SIDECAR_VERSION,
            "model_kind": self.model_kind,
            "onnx_file": self.onnx_file,
            "onnx_sha256": self.onnx_sha256,
            "opset": self.opset,
            "input": self.input.to_dict(),
            "outputs": _copy(self.outputs),
        }
        if self.output_dtypes is not None:
            data["output_dtypes"] = dict(self.output_dtypes)
        if self.vq is not None:
            data["index_shape"] = list(self.vq.index_shape)
            data.update(self.vq.fields())
        data.update(
            {
                "downsample_factor": self.downsample_factor,
                "latent_channels": self.latent_channels,
                "latent_shape": list(self.latent_shape),
                "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor,
                "scaling_source": self.scaling_source,
                "latent_stats": _copy(self.latent_stats),
                "parity": _copy(self.parity),
                "model": self.model.to_dict(),
                "weights": self.weights,
                "created": self.created,
                "latentpipe_version": self.latentpipe_version,
            }
        )
        if self.quality is not None:
            data["quality"] = _copy(self.quality)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Sidecar:
        """Validate a parsed sidecar; raises SidecarError naming the field and ``where``."""
        f = Fields(data, where, SidecarError)
        if data.get("format") != SIDECAR_FORMAT:
            raise SidecarError(
                f"{where}: 'format' is {data.get('format')!r}, expected {SIDECAR_FORMAT!r}"
            )
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise SidecarError(
                f"{where}: unsupported 'format_version' {version!r} "
                f"(this latentpipe reads versions {list(READABLE_VERSIONS)})"
            )
        kind = f.str("model_kind", choices=MODEL_KINDS)
        factor = f.int("downsample_factor", minimum=1)
        model = (
            ModelRef.from_dict(f.sub("model"))
            if version >= 2
            else ModelRef.from_v1_checkpoint(f.sub("checkpoint"))
        )
        sidecar = cls(
            model_kind=kind,
            onnx_file=f.str("onnx_file"),
            onnx_sha256=f.str("onnx_sha256"),
            opset=f.int("opset", minimum=1),
            input=InputSpec.from_dict(f.sub("input"), factor),
            outputs=f.dict("outputs"),
            downsample_factor=factor,
            latent_channels=f.int("latent_channels", minimum=1),
            latent_shape=f.ints("latent_shape", length=3),
            scaling_factor=f.float("scaling_factor"),
            shift_factor=f.float("shift_factor"),
            # Sidecars from before imports existed: the factors were always measured.
            scaling_source=f.str("scaling_source") if f.has("scaling_source") else "data",
            latent_stats=f.dict("latent_stats"),
            parity=f.dict("parity"),
            model=model,
            quality=f.dict("quality", optional=True),
            created=f.str("created"),
            latentpipe_version=f.str("latentpipe_version"),
            vq=VQSpec.from_dict(f) if kind == "vq" else None,
            output_dtypes=f.dict("output_dtypes") if kind == "vq" else None,
            weights=(
                f.str("weights", choices=WEIGHT_KINDS)
                if f.has("weights")
                else default_weight_kind(model.step is not None)
            ),
        )
        return sidecar


# ----------------------------------------------------------------------------- files


def sidecar_path(onnx_path: str) -> str:
    """``.../encoder.onnx`` -> ``.../encoder.json`` (works for local paths and URLs)."""
    root, ext = posixpath.splitext(onnx_path)
    return (root if ext.lower() == ".onnx" else onnx_path) + ".json"


def file_sha256(url: str) -> str:
    """Hex sha256 of a local file or fsspec URL, streamed."""
    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_sidecar(path: str, sidecar: Sidecar) -> str:
    """Write ``sidecar`` as JSON to ``path`` (a ``.json`` path, or the ``.onnx`` it describes).

    Returns the path written. Accepts local paths and fsspec URLs.
    """
    target = sidecar_path(path) if path.lower().endswith(".onnx") else path
    with fsspec.open(target, "w") as fh:
        json.dump(sidecar.to_dict(), fh, indent=2, sort_keys=False)
        fh.write("\n")
    return target


def load_sidecar(onnx_path: str, verify_hash: bool = True) -> Sidecar:
    """Read and validate the sidecar beside ``onnx_path``; checks the ONNX (and, for VQ, the
    codebook) sha256 unless ``verify_hash`` is False."""
    path = sidecar_path(onnx_path)
    sidecar = Sidecar.from_dict(_read_json(path), path)
    if verify_hash:
        _verify(onnx_path, sidecar.onnx_sha256, path, "ONNX")
        if sidecar.vq is not None:
            _verify(sidecar.codebook_url(onnx_path), sidecar.vq.codebook_sha256, path, "codebook")
    return sidecar


def _read_json(path: str) -> dict[str, Any]:
    try:
        with fsspec.open(path, "r") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise SidecarError(
            f"encoder sidecar not found: {path} (export writes it beside the .onnx)"
        ) from None
    except json.JSONDecodeError as exc:
        raise SidecarError(f"encoder sidecar {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SidecarError(f"encoder sidecar {path} must hold a JSON object")
    return data


def _verify(url: str, expected: str, sidecar: str, what: str) -> None:
    try:
        actual = file_sha256(url)
    except FileNotFoundError:
        raise SidecarError(f"{what} file not found: {url} (sidecar {sidecar})") from None
    if actual != expected:
        raise SidecarError(
            f"sha256 of {url} is {actual} but sidecar {sidecar} records "
            f"{expected}: the {what} file was changed or replaced"
        )


# ----------------------------------------------------------------------------- building


def latentpipe_version() -> str:
    try:
        return importlib.metadata.version("latentpipe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def default_weight_kind(trained: bool) -> str:
    """What an artifact or sidecar from before the ``weights`` field holds: a trained model's
    raw weights (nothing else was written then), or an import's published ones."""
    return "raw" if trained else "published"


def index_dtype(num_codes: int) -> str:
    """Smallest stored dtype for code indices: uint16 holds 0..65535, i.e. up to 65536 codes."""
    return "uint16" if num_codes <= 65536 else "int32"


def vq_fields(
    codebook_file: str, codebook_sha256: str, num_codes: int, code_dim: int, distance: str
) -> dict[str, Any]:
    """The VQ part of a sidecar (pass to ``build_sidecar(vq=...)``)."""
    return {
        "num_codes": int(num_codes),
        "code_dim": int(code_dim),
        "distance": distance,
        "index_dtype": index_dtype(num_codes),
        "codebook_file": codebook_file,
        "codebook_sha256": codebook_sha256,
    }


def build_sidecar(
    *,
    onnx_file: str,
    onnx_sha256: str,
    opset: int,
    model_kind: str,
    resolution: int,
    downsample_factor: int,
    latent_channels: int,
    latent_stats: dict[str, Any],
    parity: dict[str, Any],
    model: ModelRef | dict[str, Any],
    declared_scale: dict[str, float] | None = None,
    vq: dict[str, Any] | None = None,
    spatial: str = "dynamic",
    quality: dict[str, Any] | None = None,
    weights: str = "raw",
) -> Sidecar:
    """Assemble a sidecar; ``latent_stats`` has mean, std, samples, source.

    ``vq`` (from :func:`vq_fields`) marks a VQ encoder: its outputs are indices + quantized.
    ``declared_scale`` ({"scaling_factor", "shift_factor"}) overrides the measured factors: a
    pretrained model's diffusion counterpart was trained with the published ones.
    ``spatial`` says whether the graph's height/width axes are "dynamic" or "fixed".
    ``model``: the model artifact the encoder came from (a :class:`ModelRef` or its dict).
    ``quality``: the model's held-out figures (its card's ``quality``), when training measured them.
    ``weights``: which weights the model holds (:data:`WEIGHT_KINDS`; its card's ``weights.kind``).
    The result is validated exactly as a loaded sidecar is, so export cannot write one that
    readers refuse.
    """
    if spatial not in SPATIAL_MODES:
        raise ValueError(f"spatial must be one of {list(SPATIAL_MODES)}, got {spatial!r}")
    dynamic = spatial == "dynamic"
    shape = [latent_channels, resolution // downsample_factor, resolution // downsample_factor]
    std = float(latent_stats["std"])
    measured = {
        "scaling_factor": 1.0 / std if std > 0 else 1.0,
        "shift_factor": float(latent_stats["mean"]),
    }
    scale = declared_scale or measured
    data = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "model_kind": model_kind,
        "onnx_file": onnx_file,
        "onnx_sha256": onnx_sha256,
        "opset": opset,
        "input": _input_spec(resolution, downsample_factor, dynamic),
        **_outputs(shape, vq, dynamic),
        "downsample_factor": downsample_factor,
        "latent_channels": latent_channels,
        "latent_shape": shape,
        "scaling_factor": float(scale["scaling_factor"]),
        "shift_factor": float(scale["shift_factor"]),
        "scaling_source": "checkpoint" if declared_scale else "data",
        "latent_stats": dict(latent_stats),
        "parity": dict(parity),
        "model": model.to_dict() if isinstance(model, ModelRef) else dict(model),
        "weights": weights,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "latentpipe_version": latentpipe_version(),
    }
    if quality:
        data["quality"] = dict(quality)
    return Sidecar.from_dict(data, f"sidecar of {onnx_file}")


def with_quality(sidecar: Sidecar, quality: dict[str, Any] | None) -> Sidecar:
    """``sidecar`` with the held-out figures ``quality`` recorded (None: none)."""
    return dataclasses.replace(sidecar, quality=dict(quality) if quality else None)


def _outputs(shape: list[int], vq: dict[str, Any] | None, dynamic: bool) -> dict[str, Any]:
    """Graph outputs as ``{name: [None, *dims]}`` (None = dynamic axis: batch, and with dynamic
    spatial size also the latent height/width)."""
    spatial = [None, None] if dynamic else list(shape[1:])
    if vq is None:
        latent = [None, shape[0], *spatial]
        return {"outputs": {"mean": latent, "logvar": list(latent)}}
    return {
        "outputs": {"indices": [None, *spatial], "quantized": [None, shape[0], *spatial]},
        "output_dtypes": {"indices": "int64", "quantized": "float32"},
        "index_shape": list(shape[1:]),
        **vq,
    }


def _input_spec(resolution: int, factor: int, dynamic: bool) -> dict[str, Any]:
    side = None if dynamic else resolution
    return {
        "name": "image",
        "shape": [None, 3, side, side],
        "dtype": "float32",
        "layout": "NCHW",
        "color": "RGB",
        "resolution": resolution,
        "spatial": "dynamic" if dynamic else "fixed",
        "size_multiple": factor,
        "resize": RESIZE_MODE,
        "normalization": {"scale": 127.5, "offset": -1.0, "range": [-1.0, 1.0]},
    }


def _range(norm: Fields) -> list[float]:
    value = norm.list("range")
    if len(value) != 2 or not all(isinstance(x, int | float) for x in value):
        raise norm.fail("range", "[low, high]")
    return [float(x) for x in value]


def _copy(value: Any) -> Any:
    """A deep copy of JSON-like data, so a caller mutating a dict cannot change the sidecar."""
    return json.loads(json.dumps(value))
