"""``read_latents``: a latent corpus as a Ray Dataset, one row per sample.

The manifest and shards.jsonl are validated on the driver; shards are read (whole, size/sha256/count checked) in
Ray tasks, one task per shard. Ray is imported only when ``read_latents`` runs, so importing
``pipeline.latents`` stays cheap.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.contracts.manifest import (
    CorpusError,
    Manifest,
    ShardEntry,
    load_manifest,
    manifest_shards,
)
from pipeline.latents.format import (
    VQ_OUTPUTS,
    decode_sample,
    load_manifest_codebook,
    read_shard,
    select_shards,
)

if TYPE_CHECKING:
    import ray.data

_ITEM = "shard_entry"  # column of the driver-side dataset: one JSON shard entry per row


def read_latents(
    directory: str,
    *,
    expected_encoder_sha256: str | None = None,
    bucket: tuple[int, int] | None = None,
    shards: list[str] | None = None,
    vq_output: str = "latents",
) -> ray.data.Dataset:
    """One row per sample of the corpus at ``directory`` (local path or fsspec URL).

    Columns: ``key``, ``latent`` (float32 [C, h, w], already ``(z - shift) * scale``; VQ with
    ``vq_output="indices"``: ``indices`` int64 [h, w], unscaled), ``caption``,
    ``original_size``, ``crop_top_left``, ``target_size`` (int64 [2]), plus ``std`` (scaled)
    when the corpus stores it.

    ``bucket`` = (height, width) in pixels keeps only the shards of that aspect-ratio bucket
    (a centre-crop corpus has the one bucket (resolution, resolution)). A bucketed corpus holds
    several latent shapes: ``iter_batches``/``iter_torch_batches`` can only stack one shape,
    so read such a corpus with ``bucket=`` (one dataset per bucket). ``shards`` selects
    committed shards by name.
    """
    import ray.data  # here, not at the top: importing pipeline.latents must not load Ray

    if vq_output not in VQ_OUTPUTS:
        raise ValueError(f"vq_output must be one of {list(VQ_OUTPUTS)}, got {vq_output!r}")
    manifest = load_manifest(directory, expected_encoder_sha256)
    entries = select_shards(manifest_shards(directory, manifest), directory, shards)
    if bucket is not None:
        entries = _in_bucket(manifest, entries, bucket, directory)
    codebook = None
    if manifest.is_vq and vq_output == "latents":
        codebook = load_manifest_codebook(directory, manifest)
    items = [{_ITEM: json.dumps(entry.to_dict())} for entry in entries]
    # One block per shard, so shards are read by parallel tasks rather than one after another.
    shard_rows = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return shard_rows.flat_map(
        _shard_rows,
        fn_args=(directory, manifest, codebook, vq_output),
    )


def entry_bucket(manifest: Manifest, entry: ShardEntry) -> tuple[int, int] | None:
    """The (height, width) pixel bucket of a shard; centre-crop shards have the square one."""
    if entry.bucket is not None:
        return entry.bucket[0], entry.bucket[1]
    resolution = manifest.preprocess.get("resolution")
    return (int(resolution), int(resolution)) if resolution else None


def _in_bucket(
    manifest: Manifest, entries: list[ShardEntry], bucket: tuple[int, int], where: str
) -> list[ShardEntry]:
    wanted = (int(bucket[0]), int(bucket[1]))
    kept = [entry for entry in entries if entry_bucket(manifest, entry) == wanted]
    if not kept:
        have = sorted({entry_bucket(manifest, e) for e in entries} - {None})
        raise CorpusError(f"{where} has no shard in bucket {list(wanted)}; its buckets: {have}")
    return kept


def _shard_rows(
    row: dict[str, Any],
    directory: str,
    manifest: Manifest,
    codebook: np.ndarray | None,
    vq_output: str,
) -> list[dict[str, Any]]:
    """Ray task: one shard entry -> its decoded samples (after the whole shard checks out)."""
    entry = ShardEntry.from_dict(json.loads(row[_ITEM]), f"{directory}: shard row")
    return [
        decode_sample(key, files, manifest, entry, codebook, vq_output)
        for key, files in read_shard(directory, entry)
    ]
