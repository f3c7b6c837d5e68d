"""(c) Decoding: do the latents still stand for their images?

``samples`` seeded random latents are decoded with the autoencoder's model artifact (by default
the one the encoder was exported from, checked against its content hash) and compared with
their source images,
preprocessed exactly as the encode job did (PSNR). The mean must not fall more than
``psnr_margin_db`` below the held-out PSNR the encoder's sidecar records: latents that decode to
noise (a wrong encoder, a broken dtype conversion, shards rewritten with garbage and consistent
hashes) pass every checksum but not this.

torch is imported only when something is decoded (``pipeline.artifacts`` resolves its loader
lazily), so verify itself imports without it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline import artifacts
from pipeline.artifacts.card import ArtifactError, artifact_sha256, resolve_model_dir
from pipeline.contracts.manifest import CorpusError, Manifest, ShardEntry
from pipeline.contracts.sidecar import Sidecar
from pipeline.data.images import denormalize
from pipeline.data.tario import TruncatedShardError
from pipeline.encode.inputs import image_field, iter_input_samples
from pipeline.encode.preprocess import PreprocessConfig, prepare_image
from pipeline.latents.format import (
    decode_stored,
    load_manifest_codebook,
    lookup_codebook,
    read_shard,
    sample_sizes,
)
from pipeline.verify.findings import Findings

PSNR_CAP_DB = 100.0  # identical images: report a finite number (JSON has no infinity)


def decode_check(
    directory: str,
    decoder: str,
    manifest: Manifest,
    entries: list[ShardEntry],
    count: int,
    seed: int,
    findings: Findings,
) -> list[float]:
    """PSNR (dB) of ``count`` seeded random latents, decoded, vs their preprocessed source
    images; an empty list when nothing could be decoded (with the reason recorded)."""
    source = manifest.sidecar.model
    decoder = decoder or source.path or ""
    if not decoder:
        findings.warn("no decoder: the sidecar names no model artifact and verify.decoder is empty")
        return []
    if not _decoder_matches(decoder, source.sha256, findings):
        return []
    model = load_decoder(decoder)
    picks = pick_samples(entries, count, seed)
    latents = _picked_latents(directory, manifest, entries, picks)
    sources = _source_images(latents, entries, findings)
    codebook = load_manifest_codebook(directory, manifest) if manifest.is_vq else None
    preprocess = PreprocessConfig(**manifest.preprocess)
    scores = []
    for (key, _), (stored, files) in latents.items():
        if key not in sources:
            continue
        score = _compare(model, stored, files, sources[key], preprocess, codebook, findings, key)
        if score is not None:
            scores.append(score)
    return scores


def check_quality(
    scores: list[float], sidecar: Sidecar, margin_db: float, findings: Findings
) -> None:
    """The decoded PSNR is within ``margin_db`` of what the encoder's sidecar records."""
    if not scores:
        return
    decoded = float(np.mean(scores))
    recorded = sidecar.quality_psnr_db()
    if recorded is None:
        findings.warn(
            f"the encoder's sidecar records no held-out PSNR (quality.psnr_db): decoded PSNR "
            f"{decoded:.1f} dB cannot be compared with the autoencoder's own quality"
        )
    elif decoded < recorded - margin_db:
        findings.error(
            f"decoded PSNR {decoded:.1f} dB is {recorded - decoded:.1f} dB below the "
            f"{recorded:.1f} dB the encoder's sidecar records (margin {margin_db:.1f} dB): "
            "the latents do not decode to their images"
        )


def load_decoder(path: str) -> Any:
    """The autoencoder of a model artifact (or checkpoint) directory, in eval mode."""
    return artifacts.load_model_artifact(path)[0]


def _decoder_matches(decoder: str, expected: str | None, findings: Findings) -> bool:
    """The decoder is a model artifact, and the one the encoder was exported from (when the
    sidecar records its content hash)."""
    try:
        directory = resolve_model_dir(decoder)
        actual = artifact_sha256(directory) if expected else None
    except (FileNotFoundError, ArtifactError) as e:
        findings.error(f"decoder: {e}")
        return False
    if expected and actual != expected:
        findings.error(
            f"content hash of model artifact {directory} is {actual}, the encoder sidecar "
            f"records {expected}: this is not the model the encoder was exported from"
        )
        return False
    return True


def pick_samples(entries: list[ShardEntry], count: int, seed: int) -> list[tuple[int, int]]:
    """(shard position, sample position) of ``count`` distinct samples drawn with ``seed``."""
    sizes = np.array([entry.samples for entry in entries], dtype=np.int64)
    total = int(sizes.sum())
    chosen = np.random.default_rng(seed).choice(total, size=min(count, total), replace=False)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    shard = np.searchsorted(starts, chosen, side="right") - 1
    return sorted(zip(shard.tolist(), (chosen - starts[shard]).tolist(), strict=True))


def _picked_latents(
    directory: str, manifest: Manifest, entries: list[ShardEntry], picks: list[tuple[int, int]]
) -> dict[tuple[str, int], tuple[np.ndarray, dict[str, bytes]]]:
    """(key, shard position) -> (stored latent, files) for the picked samples."""
    out = {}
    wanted: dict[int, set[int]] = {}
    for position, sample in picks:
        wanted.setdefault(position, set()).add(sample)
    for position, samples in wanted.items():
        entry = entries[position]
        try:
            shard = read_shard(directory, entry)
            for i in sorted(samples):
                key, files = shard[i]
                stored = decode_stored(files, manifest.latent, f"{entry.name}: {key!r}")
                out[key, position] = (stored, files)
        except (CorpusError, IndexError):
            continue  # already an error of the integrity scan
    return out


def _source_images(
    latents: dict[tuple[str, int], Any], entries: list[ShardEntry], findings: Findings
) -> dict[str, bytes]:
    """key -> image bytes from the input shard each picked latent came from (the first
    image-bearing sample of that key, as the job takes)."""
    by_source: dict[str, set[str]] = {}
    for key, position in latents:
        by_source.setdefault(entries[position].source, set()).add(key)
    images: dict[str, bytes] = {}
    for url, keys in by_source.items():
        try:
            for key, files in iter_input_samples(url):
                ext = image_field(files)
                if key in keys and ext is not None and key not in images:
                    images[key] = files[ext]
        except (TruncatedShardError, OSError):
            pass  # complete samples were seen; the input scan reports the damage
        for key in sorted(keys - images.keys()):
            findings.error(f"source image of {key!r} not found in {url}")
    return images


def _compare(
    model,
    stored: np.ndarray,
    files: dict[str, bytes],
    image: bytes,
    preprocess: PreprocessConfig,
    codebook: np.ndarray | None,
    findings: Findings,
    key: str,
) -> float | None:
    """PSNR of one decoded latent against its source image, preprocessed like the job did."""
    try:
        prepared = prepare_image(image, preprocess)
    except ValueError as e:
        findings.error(f"source image of {key!r} no longer preprocesses: {e}")
        return None
    _check_sizes(key, files, prepared, findings)
    try:
        decoded = decode_pixels(model, stored, codebook)
    except (RuntimeError, ValueError) as e:
        findings.error(f"the decoder cannot decode {key!r}: {e}")
        return None
    if decoded.shape != prepared.pixels.shape:
        findings.error(
            f"{key!r} decodes to {list(decoded.shape)} but its source preprocesses to "
            f"{list(prepared.pixels.shape)}"
        )
        return None
    return psnr_db(decoded, prepared.pixels)


def _check_sizes(key: str, files: dict[str, bytes], prepared, findings: Findings) -> None:
    try:
        stored = {name: value.tolist() for name, value in sample_sizes(files, key).items()}
    except CorpusError:
        return  # already an error of the integrity scan
    fresh = {
        "original_size": list(prepared.original_size),
        "crop_top_left": list(prepared.crop_top_left),
        "target_size": list(prepared.target_size),
    }
    if stored != fresh:
        findings.error(f"{key!r}: sizes.json says {stored}, preprocessing the source gives {fresh}")


def decode_pixels(model, stored: np.ndarray, codebook: np.ndarray | None) -> np.ndarray:
    """Stored (unscaled) latent [C, h, w] or VQ indices [h, w] -> decoded uint8 [H, W, 3]."""
    import torch  # optional heavy dependency: only a decode needs it

    latent = lookup_codebook(stored, codebook) if codebook is not None else stored
    with torch.inference_mode():
        out = model.decode(torch.from_numpy(np.ascontiguousarray(latent, np.float32))[None])
    return denormalize(out[0].float().numpy())


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images in dB (peak 255), capped at PSNR_CAP_DB for identical ones."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))
