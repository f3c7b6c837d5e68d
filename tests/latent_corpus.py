"""Hand-built latent corpora for tests: writes the on-disk format directly (no encode job, no Ray).

``write_corpus`` lays out shards, commit records, rejects.jsonl, shards.jsonl, inputs.jsonl,
codebook and manifest (v3) exactly as ``pipeline.contracts`` describes them, building the
manifest through its typed contract; ``write_encoded_corpus`` also writes the input image shards
and encodes them with a real torch autoencoder, so a corpus can be checked end to end
(``latentpipe verify``) without the encode job. Works on local dirs and ``memory://``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np

from pipeline.contracts.layout import (
    CODEBOOK_FILE,
    INDICES_FIELD,
    INPUTS_FILE,
    LATENT_FIELD,
    MANIFEST_FILE,
    MEAN_KIND,
    REJECTS_FILE,
    SHARDS_FILE,
    SIZES_FIELD,
    STD_FIELD,
    VQ_KIND,
    commit_url,
    join_url,
    storage_dtype,
)
from pipeline.contracts.manifest import (
    EncoderRef,
    InputLineage,
    LatentSpec,
    Manifest,
    ShardEntry,
    write_jsonl,
)
from pipeline.contracts.sidecar import Sidecar, build_sidecar
from pipeline.data.fingerprint import fingerprint_of
from pipeline.data.tario import build_tar
from pipeline.encode.writer import FinishedSample, ShardLayout, group_by_shape, write_shards
from pipeline.latents.format import (
    encode_latent,
    encode_npy,
    lookup_codebook,
    sha256_bytes,
    write_bytes_atomic,
    write_json_atomic,
)
from pipeline.latents.stats import ChannelStats

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
    """An uncompressed tar of (key, {ext: bytes}) in the given order (keys may repeat), built by
    the very function the encode job writes its shards with."""
    return build_tar(samples)


def raw_tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """An uncompressed tar of whatever members it is given, including what the writer refuses
    (bad extensions, unsafe keys): input shards for bad-input tests are built with it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tar(url: str, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """An input (image) shard as given: see :func:`raw_tar_bytes`."""
    write_bytes_atomic(url, raw_tar_bytes(samples))
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


@dataclass
class Corpus:
    """What :func:`write_corpus` wrote: the typed manifest and the records of its .jsonl files."""

    manifest: Manifest
    shards: list[ShardEntry]
    inputs: list[InputLineage]


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
    sidecar: Sidecar | None = None,
    preprocess: dict | None = None,
    prefix: str = "latents",
    finished: bool = True,
) -> Corpus:
    """Write a corpus with one input shard per entry of ``units``.

    Samples of a unit are split into one shard per latent shape; when the corpus holds several
    shapes, shards are named by bucket (``-h{H}w{W}``). ``codebook`` makes a VQ corpus (``dtype``
    is then the index dtype). ``finished=False`` stops before the manifest (commit records only).
    ``scaling_factor=None`` writes a manifest without one (an unusable corpus). Input shards
    that exist get their real fingerprint in inputs.jsonl, others an empty one.
    """
    kind = VQ_KIND if codebook is not None else MEAN_KIND
    inputs = inputs or [
        f"{directory.rstrip('/')}-input/shard-{u:06d}.tar" for u in range(len(units))
    ]
    rejects = rejects or []
    shapes = {tuple(s.latent.shape) for unit in units for s in unit}
    bucketed = len(shapes) > 1
    shards, lineage = [], []
    for unit, samples in enumerate(units):
        unit_shards = _write_unit(
            directory, prefix, unit, inputs[unit], samples, kind, dtype, bucketed
        )
        unit_rejects = [r for r in rejects if r["shard"] == inputs[unit]]
        record = {
            "unit": unit,
            "input": inputs[unit],
            "shards": [entry.to_dict() for entry in unit_shards],
            "rejects": unit_rejects,
            "keys": [s.key for s in samples],
        }
        write_json_atomic(commit_url(directory, unit), record)
        shards += unit_shards
        lineage.append(
            InputLineage(
                unit=unit,
                url=inputs[unit],
                fingerprint=_fingerprint(inputs[unit]),
                rows=len(samples) + len(unit_rejects),
                samples=len(samples),
                rejects=len(unit_rejects),
                shards=[entry.name for entry in unit_shards],
            )
        )
    _write_rejects(directory, rejects)
    latent = _latent_section(directory, kind, dtype, shapes, codebook, units)
    corpus = Corpus(
        manifest=_manifest(
            directory,
            shards,
            lineage,
            latent,
            _stats(units, latent, codebook),
            encoder=EncoderRef("encoder.onnx", encoder_sha256, sidecar or kl_sidecar()),
            preprocess=preprocess or {"mode": "center_crop", "resolution": _resolution(shapes)},
            scale=(scaling_factor if scaling_factor is not None else 1.0, shift_factor),
            rejects=len(rejects),
        ),
        shards=shards,
        inputs=lineage,
    )
    if finished:
        data = corpus.manifest.to_dict()
        if scaling_factor is None:
            del data["scaling_factor"]
        write_json_atomic(join_url(directory, MANIFEST_FILE), data)
    return corpus


def _manifest(directory, shards, lineage, latent, stats, *, encoder, preprocess, scale, rejects):
    """The manifest of a corpus, as the encode job's finalise writes it (timings aside)."""
    shards_file = write_jsonl(join_url(directory, SHARDS_FILE), shards)
    inputs_file = write_jsonl(join_url(directory, INPUTS_FILE), lineage)
    urls = "\n".join(record.url for record in lineage).encode("utf-8")
    samples = sum(entry.samples for entry in shards)
    return Manifest(
        encoder=encoder,
        job={"inputs_count": len(lineage), "inputs_sha256": hashlib.sha256(urls).hexdigest()},
        preprocess=preprocess,
        storage={
            "dtype": latent.dtype,
            "latent": "mean",
            "store_std": latent.std_field is not None,
        },
        latent=latent,
        scaling_factor=float(scale[0]),
        shift_factor=float(scale[1]),
        scaling_source="test",
        measured_mean=stats["mean"],
        measured_std=stats["std"],
        channel_mean=stats["channel_mean"],
        channel_std=stats["channel_std"],
        values_per_channel=stats["values_per_channel"],
        shards_sha256=shards_file.sha256,
        shard_count=shards_file.count,
        inputs_sha256=inputs_file.sha256,
        input_count=inputs_file.count,
        input_samples=sum(record.rows for record in lineage),
        empty_inputs=sum(record.rows == 0 for record in lineage),
        samples=samples,
        rejects=rejects,
        merged_keys=0,
        replaced_fields=0,
        nonfinite_rejects=0,
        overflow_rejects=0,
        duplicate_rejects=0,
        fp16_retries=0,
        wall_time_s=1.0,
        images_per_s=float(samples),
        runs=1,
    )


def _fingerprint(url: str) -> dict:
    try:
        return fingerprint_of(url)
    except FileNotFoundError:  # a corpus of made-up latents: its inputs do not exist
        return {}


def _stats(units, latent: LatentSpec, codebook) -> dict[str, Any]:
    """The channel statistics of the stored latents (VQ: of their codebook lookup)."""
    stats = ChannelStats(latent.channels)
    for unit in units:
        for sample in unit:
            values = np.asarray(sample.latent)
            if codebook is not None:
                if values.size and values.max() >= len(codebook):
                    continue  # a deliberately broken sample: the job would never store it
                values = lookup_codebook(values, codebook)
            if np.isfinite(values).all():  # likewise: statistics stay finite, as the job's do
                stats.update(values[None].astype(np.float32))
    return stats.summary()


def rewrite_shard(directory: str, corpus: Corpus, position: int, samples: list[Sample]) -> Corpus:
    """Replace shard ``position`` with ``samples`` and fix up every hash and count that pins it
    (shards.jsonl, the manifest), so only a check of the values themselves can tell."""
    entry = corpus.shards[position]
    manifest = corpus.manifest
    kind, dtype = manifest.latent.kind, manifest.latent.dtype
    data = tar_bytes([(s.key, sample_files(s, kind, dtype)) for s in samples])
    write_bytes_atomic(join_url(directory, entry.name), data)
    shards = list(corpus.shards)
    shards[position] = dataclasses.replace(
        entry, samples=len(samples), bytes=len(data), sha256=sha256_bytes(data)
    )
    pinned = write_jsonl(join_url(directory, SHARDS_FILE), shards)
    total = sum(e.samples for e in shards)
    manifest = dataclasses.replace(
        manifest, shards_sha256=pinned.sha256, shard_count=pinned.count, samples=total
    )
    write_json_atomic(join_url(directory, MANIFEST_FILE), manifest.to_dict())
    return Corpus(manifest, shards, corpus.inputs)


def _write_unit(directory, prefix, unit, source, samples, kind, dtype, bucketed) -> list:
    """A unit's shards, written by the encode job's own writer (one shard per latent shape)."""
    latent_channels = 0 if kind == VQ_KIND else int(samples[0].latent.shape[0]) if samples else 0
    layout = ShardLayout(
        output=directory,
        prefix=prefix,
        buckets=bucketed,
        channels=latent_channels,
        factor=DOWNSAMPLE,
        latent_channels=latent_channels,
        vq=kind == VQ_KIND,
    )
    finished = [
        FinishedSample(
            key=s.key,
            shape=(s.latent.shape[-2] * DOWNSAMPLE, s.latent.shape[-1] * DOWNSAMPLE),
            files=sample_files(s, kind, dtype),
            values=s.latent,
        )
        for s in samples
    ]
    entries = write_shards(layout, unit, source, group_by_shape(finished))
    return [ShardEntry(**entry) for entry in entries]


def _write_rejects(directory: str, rejects: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rejects)
    write_bytes_atomic(join_url(directory, REJECTS_FILE), text.encode("utf-8"))


def _latent_section(directory, kind, dtype, shapes, codebook, units) -> LatentSpec:
    has_std = any(s.std is not None for unit in units for s in unit)
    shape = list(next(iter(shapes))) if len(shapes) == 1 else None
    common = {
        "kind": kind,
        "field": INDICES_FIELD if kind == VQ_KIND else LATENT_FIELD,
        "dtype": dtype,
        "storage_dtype": dtype if kind == VQ_KIND else storage_dtype(dtype),
        "channels": codebook.shape[1] if kind == VQ_KIND else next(iter(shapes))[0],
        "shape": shape,
        "shapes": sorted(list(s) for s in shapes),
        "std_field": STD_FIELD if has_std else None,
        "sizes_field": SIZES_FIELD,
    }
    if kind != VQ_KIND:
        return LatentSpec(**common)
    data = encode_npy(codebook.astype(np.float32))
    write_bytes_atomic(join_url(directory, CODEBOOK_FILE), data)
    return LatentSpec(
        **common,
        num_codes=len(codebook),
        code_dim=codebook.shape[1],
        lookup_shape=[codebook.shape[1], *shape] if shape else None,
        codebook_file=CODEBOOK_FILE,
        codebook_sha256=sha256_bytes(data),
    )


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


def write_model_artifact(directory: str, model, model_cfg, resolution: int = 16) -> str:
    """A latentpipe model artifact of ``model`` (as training writes one); returns ``directory``."""
    from pipeline.artifacts import ImageSpec, Provenance, save_model_artifact

    image = ImageSpec(channels=3, value_range="signed", resolution=resolution)
    provenance = Provenance(run="unused", step=0, data={"shards": "unused"})
    save_model_artifact(directory, model, model_cfg, image=image, provenance=provenance)
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


def kl_sidecar(
    model: dict | None = None, resolution: int = 16, quality: dict | None = None
) -> Sidecar:
    """The sidecar of a tiny f2 KL encoder (4 latent channels), as export builds it."""
    return build_sidecar(
        onnx_file="encoder.onnx",
        onnx_sha256=ENCODER_SHA256,
        opset=17,
        model_kind="kl",
        resolution=resolution,
        downsample_factor=DOWNSAMPLE,
        latent_channels=4,
        latent_stats={"mean": 0.0, "std": 1.0, "samples": 0, "source": ""},
        parity={"max_abs_diff": 0.0},
        model=model or {"path": "", "sha256": None, "step": 0},
        quality=quality,
    )


def write_encoded_corpus(
    directory: str,
    input_dir: str,
    model,
    shards: list[list[tuple[str, bytes, str]]],
    *,
    resolution: int = 16,
    model_ref: dict | None = None,
    **corpus_options: Any,
) -> Corpus:
    """:func:`encode_images` + :func:`write_corpus` (float32 latents unless ``dtype=`` given)."""
    inputs, units, preprocess = encode_images(input_dir, model, shards, resolution)
    corpus_options.setdefault("dtype", "float32")
    return write_corpus(
        directory,
        units,
        inputs=inputs,
        sidecar=kl_sidecar(model_ref, resolution),
        preprocess=preprocess,
        **corpus_options,
    )


def _image_samples(shard: list[tuple[str, bytes, str]]) -> list[tuple[str, dict[str, bytes]]]:
    return [(key, {"png": image, "txt": caption.encode()}) for key, image, caption in shard]
