"""Hand-built latent corpora for tests: writes the on-disk format directly (no encode job, no Ray).

``write_corpus`` lays out shards, commit records, rejects.jsonl, codebook and manifest (v2)
exactly as ``pipeline.latents.format`` documents them; ``write_encoded_corpus`` also writes the
input image shards and encodes them with a real torch autoencoder, so a corpus can be checked
end to end (``latentpipe verify``) without the encode job. Works on local dirs and ``memory://``.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np

from pipeline.latents.format import (
    CODEBOOK_FILE,
    INDICES_FIELD,
    LATENT_FIELD,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    MEAN_KIND,
    REJECTS_FILE,
    SIZES_FIELD,
    STD_FIELD,
    VQ_KIND,
    commit_url,
    encode_latent,
    encode_npy,
    join_url,
    sha256_bytes,
    shard_name,
    storage_dtype,
    write_bytes_atomic,
    write_json_atomic,
)

ENCODER_SHA256 = "e" * 64
DOWNSAMPLE = 2  # the tiny test autoencoders are f2


@dataclass
class Sample:
    """One corpus sample: ``latent`` is the unscaled encoder output (float [C, h, w]) or, for a
    VQ corpus, integer indices [h, w]. ``caption`` becomes ``txt``, ``meta`` becomes ``json``."""

    key: str
    latent: np.ndarray
    caption: str | None = None
    meta: dict | None = None
    std: np.ndarray | None = None
    sizes: dict | None = None  # default: the whole image, uncropped, at DOWNSAMPLE x the latent


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """An uncompressed tar of (key, {ext: bytes}) in the given order (keys may repeat)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tar(url: str, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    write_bytes_atomic(url, tar_bytes(samples))
    return url


def random_samples(
    prefix: str, count: int, shape: tuple[int, ...] = (4, 4, 4), seed: int = 0
) -> list[Sample]:
    """``count`` samples with normal latents of ``shape`` and captions."""
    rng = np.random.default_rng(seed)
    return [
        Sample(f"{prefix}{i:03d}", rng.normal(size=shape).astype(np.float32), caption=f"c {i}")
        for i in range(count)
    ]


def default_sizes(latent_hw: tuple[int, int]) -> dict[str, list[int]]:
    target = [latent_hw[0] * DOWNSAMPLE, latent_hw[1] * DOWNSAMPLE]
    return {"original_size": target, "crop_top_left": [0, 0], "target_size": target}


def sample_files(sample: Sample, kind: str, dtype: str) -> dict[str, bytes]:
    """The shard members of one sample, as the encode job writes them."""
    files: dict[str, bytes] = {}
    if sample.caption is not None:
        files["txt"] = sample.caption.encode("utf-8")
    if sample.meta is not None:
        files["json"] = json.dumps(sample.meta).encode("utf-8")
    if kind == VQ_KIND:
        files[INDICES_FIELD] = encode_npy(np.asarray(sample.latent).astype(dtype))
    else:
        files[LATENT_FIELD] = encode_latent(sample.latent, dtype)
    if sample.std is not None:
        files[STD_FIELD] = encode_latent(sample.std, dtype)
    sizes = sample.sizes or default_sizes(tuple(sample.latent.shape[-2:]))
    files[SIZES_FIELD] = json.dumps(sizes).encode("utf-8")
    return files


def write_corpus(
    directory: str,
    units: list[list[Sample]],
    *,
    dtype: str = "float16",
    scaling_factor: float | None = 0.5,
    shift_factor: float = 0.25,
    codebook: np.ndarray | None = None,
    inputs: list[str] | None = None,
    rejects: list[dict] | None = None,
    encoder_sha256: str = ENCODER_SHA256,
    sidecar: dict | None = None,
    preprocess: dict | None = None,
    prefix: str = "latents",
    finished: bool = True,
) -> dict[str, Any]:
    """Write a corpus with one input shard per entry of ``units``; returns its manifest.

    Samples of a unit are split into one shard per latent shape; when the corpus holds several
    shapes, shards are named by bucket (``-h{H}w{W}``). ``codebook`` makes a VQ corpus (``dtype``
    is then the index dtype). ``finished=False`` stops before the manifest (commit records only).
    ``scaling_factor=None`` writes a manifest without one (an unusable corpus).
    """
    kind = VQ_KIND if codebook is not None else MEAN_KIND
    inputs = inputs or [
        f"{directory.rstrip('/')}-input/shard-{u:06d}.tar" for u in range(len(units))
    ]
    rejects = rejects or []
    shapes = {tuple(s.latent.shape) for unit in units for s in unit}
    bucketed = len(shapes) > 1
    shards = []
    for unit, samples in enumerate(units):
        unit_shards = _write_unit(
            directory, prefix, unit, inputs[unit], samples, kind, dtype, bucketed
        )
        unit_rejects = [r for r in rejects if r["shard"] == inputs[unit]]
        record = {
            "unit": unit,
            "input": inputs[unit],
            "shards": unit_shards,
            "rejects": unit_rejects,
        }
        record["keys"] = [s.key for s in samples]
        write_json_atomic(commit_url(directory, unit), record)
        shards += unit_shards
    _write_rejects(directory, rejects)
    latent = _latent_section(directory, kind, dtype, shapes, codebook, units)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "encoder": {"path": "encoder.onnx", "sha256": encoder_sha256, "sidecar": sidecar or {}},
        "preprocess": preprocess or {"mode": "center_crop", "resolution": _resolution(shapes)},
        "storage": {"dtype": dtype, "latent": "mean", "store_std": latent["std_field"] is not None},
        "latent": latent,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "scaling_source": "test",
        "shards": shards,
        "inputs": inputs,
        "samples": sum(entry["samples"] for entry in shards),
        "rejects": len(rejects),
        "rejects_file": REJECTS_FILE,
    }
    if scaling_factor is None:
        del manifest["scaling_factor"]
    if finished:
        write_json_atomic(join_url(directory, MANIFEST_FILE), manifest)
    return manifest


def _write_unit(directory, prefix, unit, source, samples, kind, dtype, bucketed) -> list[dict]:
    by_shape: dict[tuple[int, ...], list[Sample]] = {}
    for sample in samples:
        by_shape.setdefault(tuple(sample.latent.shape), []).append(sample)
    entries = []
    for shape, group in sorted(by_shape.items()):
        bucket = [shape[-2] * DOWNSAMPLE, shape[-1] * DOWNSAMPLE] if bucketed else None
        name = shard_name(prefix, unit, tuple(bucket) if bucket else None)
        data = tar_bytes([(s.key, sample_files(s, kind, dtype)) for s in group])
        write_bytes_atomic(join_url(directory, name), data)
        entries.append(
            {
                "name": name,
                "samples": len(group),
                "bytes": len(data),
                "sha256": sha256_bytes(data),
                "unit": unit,
                "source": source,
                "bucket": bucket,
                "latent_shape": list(shape),
            }
        )
    return entries


def _write_rejects(directory: str, rejects: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rejects)
    write_bytes_atomic(join_url(directory, REJECTS_FILE), text.encode("utf-8"))


def _latent_section(directory, kind, dtype, shapes, codebook, units) -> dict[str, Any]:
    has_std = any(s.std is not None for unit in units for s in unit)
    shape = list(next(iter(shapes))) if len(shapes) == 1 else None
    section = {
        "kind": kind,
        "field": INDICES_FIELD if kind == VQ_KIND else LATENT_FIELD,
        "dtype": dtype,
        "storage_dtype": dtype if kind == VQ_KIND else storage_dtype(dtype),
        "channels": codebook.shape[1] if kind == VQ_KIND else next(iter(shapes))[0],
        "shape": shape,
        "std_field": STD_FIELD if has_std else None,
        "sizes_field": SIZES_FIELD,
    }
    if kind == VQ_KIND:
        data = encode_npy(codebook.astype(np.float32))
        write_bytes_atomic(join_url(directory, CODEBOOK_FILE), data)
        section.update(
            num_codes=len(codebook),
            code_dim=codebook.shape[1],
            codebook_file=CODEBOOK_FILE,
            codebook_sha256=sha256_bytes(data),
        )
    return section


def _resolution(shapes: set[tuple[int, ...]]) -> int:
    return max(max(shape[-2:]) for shape in shapes) * DOWNSAMPLE if shapes else 0


def tamper(url: str, offset: int = 1024) -> None:
    """Flip one byte of the file at ``url`` (same size, different sha256)."""
    with fsspec.open(url, "rb") as f:
        data = bytearray(f.read())
    data[offset] ^= 0xFF
    with fsspec.open(url, "wb") as f:
        f.write(bytes(data))


# ----------------------------------------------------------------------------- end to end


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 [height, width, 3] image of smooth gradients (decodable, compressible)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    channels = [np.sin(x / 5 + p) + np.cos(y / 7 - p) for p in phases]
    return ((np.stack(channels, axis=-1) + 2) * 63.75).clip(0, 255).astype(np.uint8)


def write_checkpoint_dir(directory: str, model, model_cfg) -> str:
    """A latentpipe checkpoint (state.pt + config.yaml) of ``model``; returns ``directory``."""
    import os

    import torch

    from pipeline.data.reader import DataConfig
    from pipeline.train.checkpoint import write_checkpoint
    from pipeline.train.config import TrainRunConfig

    os.makedirs(directory, exist_ok=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = TrainRunConfig(data=DataConfig(shards="unused"), model=model_cfg)
    write_checkpoint(directory, model, optimizer, 0, cfg)
    return directory


def encode_images(
    input_dir: str, model, shards: list[list[tuple[str, bytes, str]]], resolution: int = 16
) -> tuple[list[str], list[list[Sample]], dict[str, Any]]:
    """Write input image shards of (key, image bytes, caption) into ``input_dir`` and encode
    them with ``model``'s torch encoder (posterior mean), preprocessed in centre-crop mode as
    the encode job does. Returns (input URLs, samples per unit, resolved preprocess dict)."""
    from pipeline.encode.preprocess import PreprocessConfig

    preprocess = PreprocessConfig(mode="center_crop", resolution=resolution)
    preprocess.bucket_area = resolution**2  # resolved, as the job records it
    inputs, units = [], []
    for index, shard in enumerate(shards):
        url = join_url(input_dir, f"images-{index:06d}.tar")
        inputs.append(write_tar(url, _image_samples(shard)))
        units.append(
            [_encoded(model, key, image, caption, preprocess) for key, image, caption in shard]
        )
    return inputs, units, asdict(preprocess)


def _encoded(model, key: str, image: bytes, caption: str, preprocess) -> Sample:
    import torch

    from pipeline.data.images import normalize
    from pipeline.encode.preprocess import prepare_image

    prepared = prepare_image(image, preprocess)
    with torch.inference_mode():
        latent = model.encode(torch.from_numpy(normalize(prepared.pixels))[None]).mean[0].numpy()
    sizes = {
        "original_size": list(prepared.original_size),
        "crop_top_left": list(prepared.crop_top_left),
        "target_size": list(prepared.target_size),
    }
    return Sample(key, latent, caption=caption, sizes=sizes)


def kl_sidecar(checkpoint: dict | None = None, resolution: int = 16) -> dict[str, Any]:
    """The encoder sidecar fields a corpus manifest carries, for a tiny f2 KL encoder."""
    return {
        "model_kind": "kl",
        "downsample_factor": DOWNSAMPLE,
        "input": {"normalization": {"scale": 127.5, "offset": -1.0}, "resolution": resolution},
        "checkpoint": checkpoint or {"path": "", "step": 0, "sha256": None},
    }


def write_encoded_corpus(
    directory: str,
    input_dir: str,
    model,
    shards: list[list[tuple[str, bytes, str]]],
    *,
    resolution: int = 16,
    checkpoint: dict | None = None,
    **corpus_options: Any,
) -> dict[str, Any]:
    """:func:`encode_images` + :func:`write_corpus` (float32 latents unless ``dtype=`` given)."""
    inputs, units, preprocess = encode_images(input_dir, model, shards, resolution)
    corpus_options.setdefault("dtype", "float32")
    return write_corpus(
        directory,
        units,
        inputs=inputs,
        sidecar=kl_sidecar(checkpoint, resolution),
        preprocess=preprocess,
        **corpus_options,
    )


def _image_samples(shard: list[tuple[str, bytes, str]]) -> list[tuple[str, dict[str, bytes]]]:
    return [(key, {"png": image, "txt": caption.encode()}) for key, image, caption in shard]
