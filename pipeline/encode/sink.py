"""Driver-side sink of the encode pipeline: latent shards, rejects.jsonl, statistics, progress.

Every row that reaches the driver ends up exactly once either in a latent shard or as a line of
``rejects.jsonl`` ({"key", "shard", "reason"}); a key already written is rejected as a duplicate
because WebDataset consumers address samples by key.

For VQ encoders the rows carry code indices; they are stored as they come (``indices.npy``) while
the statistics are taken on their codebook lookup, the latents diffusion will actually see.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import fsspec
import numpy as np

from pipeline.encode.latents import (
    LATENT_FIELD,
    REJECTS_FILE,
    encode_npy,
    join_url,
    lookup_codebook,
)
from pipeline.encode.stages import unpack_extras
from pipeline.encode.stats import ChannelStats, CodeUsage

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 256 * 1024 * 1024
PROGRESS_EVERY_S = 10.0


class LatentSink:
    """Consumes encoder-stage batches; call :meth:`close` once at the end.

    ``latent_shape``/``dtype`` describe what is stored under ``field``; with a ``codebook``
    (VQ) the stored values are code indices and statistics use their lookup.
    """

    def __init__(
        self,
        output: str,
        prefix: str,
        samples_per_shard: int,
        dtype: str,
        latent_shape: list[int],
        expected_total: int | None = None,
        *,
        field: str = LATENT_FIELD,
        codebook: np.ndarray | None = None,
    ) -> None:
        from pipeline.data.tario import TarShardWriter

        self.output = output
        self.field = field
        self.dtype = np.dtype(dtype)
        self.latent_shape = tuple(latent_shape)
        self.codebook = codebook
        self.codes = CodeUsage(len(codebook)) if codebook is not None else None
        self.stats = ChannelStats(latent_shape[0] if codebook is None else codebook.shape[1])
        self.writer = TarShardWriter(
            output, prefix=prefix, max_samples=samples_per_shard, max_bytes=MAX_SHARD_BYTES
        )
        fs, path = fsspec.core.url_to_fs(join_url(output, REJECTS_FILE))
        self._fs, self._rejects_path = fs, path
        # Written under a temporary name and moved into place on close, like the shards.
        self._rejects_tmp = join_url(path.rsplit("/", 1)[0], "." + REJECTS_FILE + ".tmp")
        self._rejects = fs.open(self._rejects_tmp, "wt", encoding="utf-8")
        self.seen: set[str] = set()
        self.written = 0
        self.rejected = 0
        self.field_clashes = 0
        self.expected_total = expected_total
        self.start = time.monotonic()
        self._last_log = self.start

    def reject(self, key: str, shard: str, reason: str) -> None:
        record = {"key": key or None, "shard": shard, "reason": reason}
        self._rejects.write(json.dumps(record) + "\n")
        self.rejected += 1
        log.warning("rejected %r from %s: %s", key, shard, reason)

    def add_batch(self, batch: dict[str, np.ndarray]) -> None:
        """Write one batch from the encoder stage (rows with a reject reason go to rejects)."""
        latents = batch["latent"]
        keep = np.zeros(len(latents), dtype=bool)
        for i, key in enumerate(batch["key"]):
            key, shard, reason = str(key), str(batch["shard"][i]), str(batch["reject"][i])
            if not reason and key in self.seen:
                reason = "duplicate key (already written from an earlier sample)"
            if reason:
                self.reject(key, shard, reason)
                continue
            self._write(key, latents[i], str(batch["extras"][i]))
            keep[i] = True
        self._update_stats(latents[keep])
        self._maybe_log()

    def _update_stats(self, stored: np.ndarray) -> None:
        if self.codebook is None:
            self.stats.update(stored)
            return
        self.codes.update(stored)
        self.stats.update(lookup_codebook(stored, self.codebook))

    def _write(self, key: str, latent: np.ndarray, extras_json: str) -> None:
        if tuple(latent.shape) != self.latent_shape:
            raise ValueError(
                f"latent for {key!r} has shape {latent.shape}, expected {self.latent_shape}"
            )
        files = unpack_extras(extras_json)
        if self.field in files:
            # The encoder output wins; counted and reported in the manifest, never silent.
            self.field_clashes += 1
            log.warning(
                "sample %r already had a %s field; replaced by the new latent", key, self.field
            )
        files[self.field] = encode_npy(latent.astype(self.dtype))
        self.writer.write(key, files)
        self.seen.add(key)
        self.written += 1

    @property
    def done(self) -> int:
        return self.written + self.rejected

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_log < PROGRESS_EVERY_S:
            return
        self._last_log = now
        total = "?" if self.expected_total is None else str(self.expected_total)
        log.info(
            "encoded %d/%s samples (%.1f img/s, ETA %s), %d rejected so far",
            self.done,
            total,
            self.rate(),
            self._eta(),
            self.rejected,
        )

    def _eta(self) -> str:
        rate = self.rate()
        if self.expected_total is None or rate <= 0:
            return "?"
        seconds = max(self.expected_total - self.done, 0) / rate
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

    def close(self) -> list[Any]:
        """Finish the last shard and commit rejects.jsonl; returns the ShardInfo list."""
        shards = self.writer.close()
        self._rejects.close()
        self._fs.mv(self._rejects_tmp, self._rejects_path)
        self._maybe_log(force=True)
        return shards

    def abort(self) -> None:
        """On failure: drop the shard in progress and the uncommitted rejects file."""
        self.writer.abort()
        self._rejects.close()
        if self._fs.exists(self._rejects_tmp):
            self._fs.rm(self._rejects_tmp)
