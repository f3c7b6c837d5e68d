"""Cross-shard duplicate keys without Ray (pipeline.encode.dedup): the partition logic on numpy
groups as Ray Data hands them over, and the rewrite of a real committed unit (encoded by
pipeline.encode.unit with a real ONNX session, written by the writer, on memory://)."""

from __future__ import annotations

import dataclasses
import io
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.encode.actor import BatchEncoder, RuntimeOptions
from pipeline.encode.dedup import (
    DUPLICATE_REASON,
    KEYS_PER_PARTITION,
    RewriteSpec,
    _key_rows,
    later_duplicates,
    partitions_for,
    rewrite_unit,
)
from pipeline.encode.preprocess import PreprocessConfig, resolve_preprocess
from pipeline.encode.store import StoragePlan
from pipeline.encode.unit import STATUS_OK, UnitSettings, UnitTask, encode_unit
from pipeline.encode.writer import ShardLayout
from pipeline.latents.format import (
    INDICES_FIELD,
    LATENT_FIELD,
    MEAN_KIND,
    VQ_KIND,
    commit_url,
    decode_latent,
    iter_tar_bytes,
    join_url,
    read_json,
    sha256_bytes,
)
from pipeline.latents.stats import ChannelStats
from tests.latent_corpus import write_tar
from tests.onnx_models import argmax_vq, scaled

FS = fsspec.filesystem("memory")


def _group(pairs: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    return {
        "key": np.array([k for k, _ in pairs], dtype=object),
        "unit": np.array([u for _, u in pairs], dtype=np.int64),
    }


def _pairs(out: dict[str, np.ndarray]) -> list[tuple[str, int]]:
    return list(zip(out["key"].tolist(), out["unit"].tolist(), strict=True))


def test_later_duplicates_keeps_the_first_unit_and_lists_every_later_one():
    pairs = [("a", 4), ("b", 1), ("a", 0), ("c", 2), ("a", 7), ("b", 3), ("d", 5)]
    expected = [("a", 4), ("a", 7), ("b", 3)]
    rng = np.random.default_rng(0)
    for _ in range(5):  # whatever order the partition's rows arrive in
        order = rng.permutation(len(pairs))
        out = later_duplicates(_group([pairs[i] for i in order]))
        assert out["unit"].dtype == np.int64
        assert _pairs(out) == expected


def test_later_duplicates_without_duplicates():
    out = later_duplicates(_group([("x", 0), ("y", 0), ("z", 1)]))
    assert _pairs(out) == []


def test_partitions_for():
    assert partitions_for(0) == 1
    assert partitions_for(KEYS_PER_PARTITION) == 1
    assert partitions_for(KEYS_PER_PARTITION + 1) == 2
    assert partitions_for(10 * KEYS_PER_PARTITION) == 10


# ----------------------------------------------------------------------------- committed units


def _png(color, size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _settings(output: str) -> UnitSettings:
    """Aspect-ratio buckets (8x32, 16x16, 32x8) so a unit has several shards."""
    preprocess = resolve_preprocess(
        PreprocessConfig(mode="buckets", resolution=16, bucket_step=8, bucket_max_aspect=4.0),
        16,
        2,
        True,
    )
    return UnitSettings(
        layout=ShardLayout(
            output=output,
            prefix="latents",
            buckets=True,
            channels=3,
            factor=2,
            latent_channels=3,
            vq=False,
        ),
        storage=StoragePlan(
            field=LATENT_FIELD, dtype="bfloat16", sample=False, store_std=False, sample_seed=0
        ),
        preprocess=preprocess,
        batch_size=2,
        overflow_stop_fraction=0.5,
        overflow_min_samples=16,
    )


def _samples() -> list[tuple[str, dict[str, bytes]]]:
    square = [
        (f"sq{i}", {"png": _png((10 * i, 100, 200), (16, 16)), "txt": f"c{i}".encode()})
        for i in range(4)
    ]
    wide = ("wide", {"png": _png((250, 20, 30), (40, 10))})  # the only 8x32 image
    return [square[0], wide, *square[1:], ("broken", {"png": b"junk"})]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> BatchEncoder:
    spec = scaled(tmp_path_factory.mktemp("pool") / "pool.onnx", 1.0)
    options = RuntimeOptions(
        device="cpu", threads=1, fp16=False, io_binding=False, need_std=False, decode_threads=2
    )
    return BatchEncoder(spec, options)


def _commit(
    root: str, name: str, samples, encoder: BatchEncoder, settings=_settings, codebook=None
) -> str:
    """Encode ``samples`` as input shard 2 into ``root/name``; returns the output."""
    url = write_tar(join_url(root, "in/shard-000002.tar"), samples)
    out = join_url(root, name)
    with ThreadPoolExecutor(2) as pool:
        task = UnitTask(2, url, "run1", time.time())
        result = encode_unit(task, settings(out), encoder, codebook, pool)
    assert result["status"] == STATUS_OK
    return out


def _spec(output: str) -> RewriteSpec:
    return RewriteSpec(
        layout=_settings(output).layout,
        latent_kind=MEAN_KIND,
        field=LATENT_FIELD,
        dtype="bfloat16",
        codebook=None,
    )


def _rewrite(out: str, keys: list[str], spec=None) -> dict[str, np.ndarray]:
    group = {
        "unit": np.array([2] * len(keys), dtype=np.int64),
        "key": np.array(keys, dtype=object),
    }
    return rewrite_unit(group, spec or _spec(out))


def _shard_keys(out: str, entry: dict) -> list[str]:
    data = FS.cat_file(join_url(out, entry["name"]))
    assert sha256_bytes(data) == entry["sha256"] and len(data) == entry["bytes"]
    return [key for key, _ in iter_tar_bytes(data, entry["name"])]


def test_key_rows_partition_every_committed_key(encoder):
    root = f"memory://dedup-{uuid.uuid4().hex[:8]}"
    out = _commit(root, "out", _samples(), encoder)
    rows = _key_rows({"unit": np.array([2])}, out, 3)
    keys = read_json(commit_url(out, 2))["keys"]
    assert rows["key"].tolist() == keys and rows["unit"].tolist() == [2] * len(keys)
    assert rows["part"].tolist() == [zlib.crc32(k.encode()) % 3 for k in keys]


def test_rewrite_unit_removes_keys_and_equals_a_unit_without_them(encoder):
    root = f"memory://dedup-{uuid.uuid4().hex[:8]}"
    samples = _samples()
    out = _commit(root, "out", samples, encoder)
    before = read_json(commit_url(out, 2))
    names = [s["name"] for s in before["shards"]]
    assert names == ["latents-000002-h8w32.tar", "latents-000002-h16w16.tar"]
    assert sorted(before["keys"]) == ["sq0", "sq1", "sq2", "sq3", "wide"]

    result = _rewrite(out, ["wide", "sq2"])
    assert result["unit"].tolist() == [2] and result["removed"].tolist() == [2]
    after = read_json(commit_url(out, 2))
    assert [s["name"] for s in after["shards"]] == ["latents-000002-h16w16.tar"]
    assert not FS.exists(join_url(out, "latents-000002-h8w32.tar"))  # emptied: deleted
    assert _shard_keys(out, after["shards"][0]) == ["sq0", "sq1", "sq3"]
    assert after["keys"] == ["sq0", "sq1", "sq3"] and after["samples"] == 3
    assert after["rejects"] == before["rejects"] + [  # appended, in input order
        {"key": "wide", "shard": before["input"], "reason": DUPLICATE_REASON},
        {"key": "sq2", "shard": before["input"], "reason": DUPLICATE_REASON},
    ]
    assert after["duplicate_rejects"] == 2 and after["dedup_removed"] == ["sq2", "wide"]
    assert after["rows"] == before["rows"] and after["fingerprint"] == before["fingerprint"]

    # Statistics and shard bytes as if those keys had never been in the input.
    fresh = read_json(
        commit_url(
            _commit(root, "fresh", [s for s in samples if s[0] not in ("wide", "sq2")], encoder), 2
        )
    )
    assert after["stats"] == fresh["stats"]
    assert [s["sha256"] for s in after["shards"]] == [s["sha256"] for s in fresh["shards"]]
    stats = ChannelStats(3)
    data = FS.cat_file(join_url(out, after["shards"][0]["name"]))
    stats.update(
        np.stack([decode_latent(f[LATENT_FIELD], "bfloat16") for _, f in iter_tar_bytes(data, "")])
    )
    assert after["stats"] == stats.state()

    # A second round (another later duplicate) accumulates.
    _rewrite(out, ["sq0"])
    again = read_json(commit_url(out, 2))
    assert again["duplicate_rejects"] == 3 and again["dedup_removed"] == ["sq0", "sq2", "wide"]
    assert again["keys"] == ["sq1", "sq3"]


def test_rewrite_unit_removing_every_sample(encoder):
    root = f"memory://dedup-{uuid.uuid4().hex[:8]}"
    out = _commit(root, "out", _samples(), encoder)
    before = read_json(commit_url(out, 2))
    _rewrite(out, list(before["keys"]))
    after = read_json(commit_url(out, 2))
    assert after["shards"] == [] and after["keys"] == [] and after["samples"] == 0
    assert after["stats"]["count"] == 0
    for entry in before["shards"]:
        assert not FS.exists(join_url(out, entry["name"]))
    assert len(after["rejects"]) == len(before["rejects"]) + 5


CODEBOOK = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]], np.float32)


def _vq_settings(output: str) -> UnitSettings:
    base = _settings(output)
    return dataclasses.replace(
        base,
        layout=dataclasses.replace(base.layout, buckets=False, channels=2, vq=True),
        storage=StoragePlan(
            field=INDICES_FIELD,
            dtype="float16",
            sample=False,
            store_std=False,
            sample_seed=0,
            vq=True,
        ),
        preprocess=resolve_preprocess(PreprocessConfig(), 16, 2, True),
    )


def test_rewrite_vq_unit_updates_code_counts(tmp_path):
    options = RuntimeOptions(
        device="cpu", threads=1, fp16=False, io_binding=False, need_std=False, decode_threads=2
    )
    encoder = BatchEncoder(argmax_vq(tmp_path / "vq.onnx"), options)
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (10, 240, 10)]
    samples = [(f"k{i}", {"png": _png(c, (16, 16))}) for i, c in enumerate(colours)]
    root = f"memory://dedup-{uuid.uuid4().hex[:8]}"
    out = _commit(root, "out", samples, encoder, _vq_settings, CODEBOOK)
    assert read_json(commit_url(out, 2))["code_counts"] == [64, 128, 64]
    spec = RewriteSpec(
        layout=_vq_settings(out).layout,
        latent_kind=VQ_KIND,
        field=INDICES_FIELD,
        dtype="uint16",
        codebook=CODEBOOK,
    )
    _rewrite(out, ["k1"], spec)
    after = read_json(commit_url(out, 2))
    fresh = read_json(
        commit_url(
            _commit(root, "fresh", samples[:1] + samples[2:], encoder, _vq_settings, CODEBOOK), 2
        )
    )
    assert after["code_counts"] == fresh["code_counts"] == [64, 64, 64]
    assert after["stats"] == fresh["stats"]
    assert [s["sha256"] for s in after["shards"]] == [s["sha256"] for s in fresh["shards"]]
