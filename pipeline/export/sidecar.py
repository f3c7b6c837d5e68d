"""The ``encoder.json`` sidecar: everything a consumer needs to feed and interpret the ONNX encoder.

The sidecar lives beside the ONNX file with the same stem and pins the ONNX bytes by sha256, so a
swapped or partially copied model is detected before any latents are produced with it.

VQ encoders (``model_kind: "vq"``) add the codebook: ``codebook.npy`` beside the ONNX file
(float32 [num_codes, code_dim], exactly what the quantizer looks codes up in), pinned by
``codebook_sha256``, plus ``num_codes``, ``code_dim``, ``distance``, ``index_shape`` and the
``index_dtype`` the encode job stores indices as. ``latent_shape`` and the scaling/shift factors
then describe the *quantized* latents (the codebook lookup), which is what diffusion consumes.

Spatial size: ``input.spatial`` is ``"dynamic"`` when the graph takes any height/width that are
positive multiples of ``input.size_multiple`` (the downsample factor); ``input.shape`` and the
``outputs`` shapes then hold None for batch and spatial axes. ``input.resolution`` stays the
native (trained) size and ``latent_shape``/``index_shape`` the latents at that size; use
:func:`latent_shape_for` for other sizes. Sidecars without ``input.spatial`` (older exports) and
``"fixed"`` ones accept only ``resolution`` x ``resolution`` images.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import posixpath
from typing import Any

import fsspec

SIDECAR_FORMAT = "latentpipe.encoder"
SIDECAR_VERSION = 1
RESIZE_MODE = "shorter_side_bicubic_center_crop"
SPATIAL_MODES = ("dynamic", "fixed")


class SidecarError(ValueError):
    """The sidecar is missing, malformed or does not match its ONNX file."""


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


def latentpipe_version() -> str:
    try:
        return importlib.metadata.version("latentpipe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def index_dtype(num_codes: int) -> str:
    """Smallest stored dtype for code indices: uint16 holds 0..65535, i.e. up to 65536 codes."""
    return "uint16" if num_codes <= 65536 else "int32"


def codebook_url(onnx_path: str, sidecar: dict[str, Any]) -> str:
    """Path/URL of the sidecar's ``codebook_file`` (it sits beside the ONNX file)."""
    return posixpath.join(posixpath.dirname(onnx_path), sidecar["codebook_file"])


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


def _latent_shape(latent_channels: int, resolution: int, factor: int) -> list[int]:
    return [latent_channels, resolution // factor, resolution // factor]


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


def dynamic_spatial(sidecar: dict[str, Any]) -> bool:
    """True if the encoder takes any multiple-of-the-factor height/width (False for older
    sidecars, which predate ``input.spatial``, and for ``"fixed"`` ones)."""
    return sidecar.get("input", {}).get("spatial") == "dynamic"


def latent_shape_for(sidecar: dict[str, Any], height: int, width: int) -> list[int]:
    """Per-image latent shape ``[C, height/f, width/f]`` for ``height`` x ``width`` inputs.

    KL: the shape of ``mean``/``logvar``. VQ: the shape of ``quantized`` (what ``latent_shape``
    describes); the ``indices`` are ``[height/f, width/f]``, i.e. this shape without C.
    Raises ValueError unless both sides are positive multiples of the downsample factor ``f``,
    or, for an encoder without dynamic spatial axes, unless they equal its resolution.
    """
    factor = int(sidecar["downsample_factor"])
    if not (height > 0 and width > 0 and height % factor == 0 and width % factor == 0):
        raise ValueError(
            f"image size {height}x{width} must be positive multiples of the encoder's "
            f"downsample factor {factor}"
        )
    resolution = int(sidecar["input"]["resolution"])
    if not dynamic_spatial(sidecar) and (height, width) != (resolution, resolution):
        raise ValueError(
            f"this encoder has a fixed input size {resolution}x{resolution} (re-export it for "
            f"dynamic spatial size); got {height}x{width}"
        )
    return [int(sidecar["latent_shape"][0]), height // factor, width // factor]


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
    checkpoint: dict[str, Any],
    declared_scale: dict[str, float] | None = None,
    vq: dict[str, Any] | None = None,
    spatial: str = "dynamic",
) -> dict[str, Any]:
    """Assemble the sidecar dict (schema version 1); ``latent_stats`` has mean, std, samples, source.

    ``vq`` (from :func:`vq_fields`) marks a VQ encoder: its outputs are indices + quantized.
    ``declared_scale`` ({"scaling_factor", "shift_factor"}) overrides the measured factors: a
    pretrained model's diffusion counterpart was trained with the published ones.
    ``spatial`` says whether the graph's height/width axes are "dynamic" or "fixed".
    """
    if spatial not in SPATIAL_MODES:
        raise ValueError(f"spatial must be one of {list(SPATIAL_MODES)}, got {spatial!r}")
    dynamic = spatial == "dynamic"
    shape = _latent_shape(latent_channels, resolution, downsample_factor)
    std = float(latent_stats["std"])
    measured = {
        "scaling_factor": 1.0 / std if std > 0 else 1.0,
        "shift_factor": float(latent_stats["mean"]),
    }
    scale = declared_scale or measured
    return {
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
        "checkpoint": dict(checkpoint),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "latentpipe_version": latentpipe_version(),
    }


def write_sidecar(path: str, sidecar: dict[str, Any]) -> str:
    """Write ``sidecar`` as JSON to ``path`` (a ``.json`` path, or the ``.onnx`` it describes).

    Returns the path written. Accepts local paths and fsspec URLs.
    """
    target = sidecar_path(path) if path.lower().endswith(".onnx") else path
    with fsspec.open(target, "w") as fh:
        json.dump(sidecar, fh, indent=2, sort_keys=False)
        fh.write("\n")
    return target


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


def load_sidecar(onnx_path: str, verify_hash: bool = True) -> dict[str, Any]:
    """Read and validate the sidecar beside ``onnx_path``; checks format and the ONNX sha256."""
    path = sidecar_path(onnx_path)
    data = _read_json(path)
    if data.get("format") != SIDECAR_FORMAT:
        raise SidecarError(
            f"{path}: 'format' is {data.get('format')!r}, expected {SIDECAR_FORMAT!r}"
        )
    if data.get("format_version") != SIDECAR_VERSION:
        raise SidecarError(
            f"{path}: unsupported 'format_version' {data.get('format_version')!r} "
            f"(this latentpipe reads version {SIDECAR_VERSION})"
        )
    for key in ("onnx_sha256", "input", "latent_shape", "scaling_factor", "shift_factor"):
        if key not in data:
            raise SidecarError(f"{path}: missing required key {key!r}")
    if not isinstance(data["input"], dict):
        raise SidecarError(f"{path}: 'input' must be a JSON object")
    if data["input"].get("spatial", "fixed") not in SPATIAL_MODES:
        raise SidecarError(f"{path}: 'input.spatial' must be one of {list(SPATIAL_MODES)}")
    if data.get("model_kind") == "vq":
        for key in ("num_codes", "code_dim", "index_dtype", "codebook_file", "codebook_sha256"):
            if key not in data:
                raise SidecarError(f"{path}: VQ sidecar is missing required key {key!r}")
        if posixpath.basename(data["codebook_file"]) != data["codebook_file"]:
            raise SidecarError(f"{path}: codebook_file must be a plain file name beside the .onnx")
    if verify_hash:
        _verify(onnx_path, data["onnx_sha256"], path, "ONNX")
        if data.get("model_kind") == "vq":
            _verify(codebook_url(onnx_path, data), data["codebook_sha256"], path, "codebook")
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
