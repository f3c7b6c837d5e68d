"""Encode an image shard corpus into latent shards: exactly once, resumable, atomic, distributed.

Pipeline (Ray Data): pending input shards ("units") -> map_batches(UnitEncoder actors, one unit
per call) -> per-unit result rows to the driver. Each actor owns its unit end to end (reads,
decodes, encodes, writes the shards and the commit record; pipeline.encode.unit), so latent
bytes never pass through the driver, whose work is per unit, not per image. Units finish in any
order; everything a unit writes depends on its input alone, so the output is byte-identical
whatever the order, batch size, actor or node count.

After the passes (a unit whose task died with a node runs again in the next pass), cross-shard
duplicate keys are resolved (pipeline.encode.dedup) and the corpus is finalised from the commit
records (pipeline.encode.finalize): ``manifest.json``, written last, marks it finished.

A re-run of the same command resumes: committed units whose input is unchanged (fingerprint)
and whose shards are present are skipped; a changed input shard is encoded again, also in a
finished corpus. A lease (pipeline.encode.lease) keeps a second job off the same output.
"""

from __future__ import annotations

import logging
import time

from pipeline.contracts.manifest import Manifest
from pipeline.data.fingerprint import input_fingerprints
from pipeline.encode.cluster import capacity_line
from pipeline.encode.config import EncodeConfig, StorageConfig
from pipeline.encode.dedup import resolve_duplicates
from pipeline.encode.finalize import FinalizeInputs, finalize
from pipeline.encode.identity import EncodeConflictError, claim_output
from pipeline.encode.lease import Lease, LeaseOwner
from pipeline.encode.passes import (
    EncodeCapacityError,
    EncodeIncompleteError,
    EncodeOverflowError,
    EncodeStalledError,
    run_passes,
)
from pipeline.encode.plan import Job, expected_total, prepare, rewrite_spec
from pipeline.encode.progress import Progress
from pipeline.encode.state import (
    clear_attempts,
    discard,
    finished_manifest,
    scan_committed,
    units_with_samples,
)
from pipeline.raysetup import init_ray

__all__ = [
    "EncodeConfig",
    "EncodeCapacityError",
    "EncodeConflictError",
    "EncodeIncompleteError",
    "EncodeOverflowError",
    "EncodeStalledError",
    "StorageConfig",
    "encode_corpus",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- entry point


def encode_corpus(cfg: EncodeConfig) -> Manifest:
    """Encode ``cfg.input`` into latent shards under ``cfg.output``; returns the manifest.

    Re-running after an interruption does only the missing units; re-running a finished job
    does nothing unless an input shard changed. A different encoder/preprocessing/storage/input
    list for the same output is refused (EncodeConflictError), and so is a second job while one
    holds the output's lease (LeaseHeldError).
    """
    job = prepare(cfg)
    with Lease.acquire(job.cfg.output, LeaseOwner.current(job.run), job.cfg.lease_ttl_s) as lease:
        resumed = claim_output(job.cfg.output, job.cfg.prefix, job.identity)
        fingerprints = input_fingerprints(job.urls)
        finished = finished_manifest(job, fingerprints) if resumed else None
        if finished is not None:
            log.info(
                "%s is already complete (%d latents); nothing to do",
                job.cfg.output,
                finished.samples,
            )
            return finished
        return _encode_and_finalize(job, fingerprints, lease)


def _encode_and_finalize(job: Job, fingerprints: dict[str, dict], lease: Lease) -> Manifest:
    cfg = job.cfg
    done = scan_committed(job, fingerprints)
    if done.changed:  # a key that moved may free one that dedup took from a later unit
        for unit in sorted(done.deduplicated):
            discard(cfg.output, unit)
        done.units -= done.deduplicated
    pending = [u for u in range(len(job.urls)) if u not in done.units]
    clear_attempts(cfg.output)  # every run gives every unit its full number of tries
    progress = Progress(expected_total(job.urls), len(job.urls), cfg.progress_every_s)
    progress.resumed(done.images, len(done.units), done.rejects)
    init_ray()
    if pending:
        if done.units:
            log.info(
                "resuming: %d of %d input shards already committed", len(done.units), len(job.urls)
            )
        log.info(
            "encoding %d input shard(s) from %s with %s",
            len(pending),
            cfg.input,
            f"up to {cfg.num_actors} actor(s)" if cfg.num_actors else "as many actors as fit",
        )
        run_passes(job, pending, progress, lease)
        clear_attempts(cfg.output)
        progress.log(capacity_line())
    total_keys = progress.done  # an upper bound on the keys stored: sizes the dedup partitions
    resolve_duplicates(units_with_samples(job), total_keys, rewrite_spec(job))
    lease.check()
    manifest = finalize(
        FinalizeInputs(
            cfg=cfg,
            sidecar=job.sidecar,
            preprocess=job.preprocess,
            identity=job.identity,
            units=len(job.urls),
            codebook=job.codebook,
            run=job.run,
            run_s=time.time() - job.start,
        )
    )
    log.info(
        "wrote %d latents in %d shard(s) to %s (%d rejected, %.1f img/s)",
        manifest.samples,
        manifest.shard_count,
        cfg.output,
        manifest.rejects,
        manifest.images_per_s or 0.0,
    )
    return manifest
