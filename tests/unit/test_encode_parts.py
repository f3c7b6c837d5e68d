"""Encode building blocks without Ray: statistics, .npy coding, keys, config, manifest errors,
and an input tar through reading, resolving and decoding."""

from __future__ import annotations

import dataclasses
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pipeline.encode.config import EncodeConfig, StorageConfig, validate_config
from pipeline.encode.inputs import key_problem, split_dotted_keys
from pipeline.encode.job import expected_total
from pipeline.encode.passes import pool_bounds
from pipeline.encode.preprocess import PreprocessConfig, resolve_preprocess
from pipeline.encode.resolve import read_rows, resolve_rows
from pipeline.encode.unit import decoded_windows
from pipeline.latents.format import (
    decode_latent,
    decode_npy,
    encode_latent,
    encode_npy,
    from_bfloat16_bits,
    load_manifest,
    to_bfloat16_bits,
)
from pipeline.latents.stats import ChannelStats, CodeUsage
from tests.tarfiles import write_raw_tar


def test_channel_stats_match_numpy_over_uneven_batches():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(37, 4, 5, 5)) * np.array([1, 2, 3, 4])[None, :, None, None]
    stats = ChannelStats(4)
    for start, stop in [(0, 1), (1, 10), (10, 10), (10, 37)]:
        stats.update(data[start:stop].astype(np.float32))
    summary = stats.summary()
    np.testing.assert_allclose(summary["channel_mean"], data.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(summary["channel_std"], data.std(axis=(0, 2, 3)), rtol=1e-5)
    assert summary["mean"] == pytest.approx(data.mean(), rel=1e-5)
    assert summary["std"] == pytest.approx(data.std(), rel=1e-5)
    assert summary["values_per_channel"] == 37 * 25
    with pytest.raises(ValueError, match="expected latents"):
        stats.update(np.zeros((2, 3, 5, 5)))


def test_channel_stats_merge_equals_one_pass():
    """Per-unit statistics merged at the end give the corpus statistics (and survive JSON)."""
    rng = np.random.default_rng(1)
    data = rng.normal(-1.0, 3.0, size=(40, 3, 4, 4)).astype(np.float32)
    whole = ChannelStats(3)
    whole.update(data)
    merged = ChannelStats(3)
    for part in (data[:7], data[7:7], data[7:31], data[31:]):
        unit = ChannelStats(3)
        unit.update(part)
        merged.merge(ChannelStats.from_state(json.loads(json.dumps(unit.state()))))
    for key in ("channel_mean", "channel_std"):
        np.testing.assert_allclose(merged.summary()[key], whole.summary()[key], rtol=1e-12)
    assert merged.count == whole.count


def test_empty_stats_summary():
    assert ChannelStats(4).summary()["std"] is None


def test_npy_round_trip_refuses_pickles():
    arr = np.arange(12, dtype=np.float16).reshape(3, 2, 2)
    out = decode_npy(encode_npy(arr))
    assert out.dtype == np.float16 and np.array_equal(out, arr)
    with pytest.raises(ValueError):
        encode_npy(np.array([{"a": 1}], dtype=object))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_npy(buf.getvalue())


def test_bfloat16_bits_match_torch_rounding():
    import torch

    values = np.array(
        [0.0, -0.0, 1.0, 1.00390625, 1.01171875, -3.14159, 1e-40, 3.4e38, np.inf, -np.inf],
        dtype=np.float32,
    )
    values = np.concatenate(
        [values, np.random.default_rng(0).normal(0, 5, 1000).astype(np.float32)]
    )
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(to_bfloat16_bits(values), expected)
    assert np.isnan(from_bfloat16_bits(to_bfloat16_bits(np.array([np.nan], np.float32)))).all()
    round_trip = from_bfloat16_bits(expected)
    assert np.array_equal(
        round_trip, torch.from_numpy(expected.view(np.int16)).view(torch.bfloat16).float().numpy()
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_latent_storage_round_trip(dtype):
    latent = np.random.default_rng(2).normal(size=(4, 3, 5)).astype(np.float32)
    out = decode_latent(encode_latent(latent, dtype), dtype)
    assert out.dtype == np.float32 and out.shape == latent.shape
    tolerance = {"float16": 1e-3, "bfloat16": 1e-2, "float32": 0}[dtype]
    np.testing.assert_allclose(out, latent, rtol=tolerance, atol=tolerance)


def test_split_dotted_keys():
    # img.001.jpg, img.001.txt, img.002.jpg: WebDataset's key "img" is really two dotted keys.
    files = {"001.jpg": b"a", "001.txt": b"b", "002.jpg": b"c"}
    assert split_dotted_keys("img", files) == [
        ("img.001", {"jpg": b"a", "txt": b"b"}),
        ("img.002", {"jpg": b"c"}),
    ]
    # A plain field means WebDataset's reading: sample "x" with a multi-part field.
    mixed = {"jpg": b"a", "seg.png": b"b"}
    assert split_dotted_keys("x", mixed) == [("x", mixed)]


def test_key_problem():
    assert key_problem("abc_01-x") == ""
    assert key_problem("dir/sub/abc") == ""
    assert key_problem("v1.2/img") == ""
    for bad in ["", "a b", "../x", "/abs", "a//b", "a/./b", ".hidden/x", "a/b.c", "x" * 600]:
        assert key_problem(bad), bad


def test_load_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished latent corpus"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a latentpipe latent manifest"):
        load_manifest(str(tmp_path))


def test_validate_config():
    ok = EncodeConfig(input="in", output="out", encoder="e.onnx")
    validate_config(ok)
    for field, value in [
        ("batch_size", 0),
        ("actor_cpus", 0),
        ("num_actors", -1),
        ("max_passes", 0),
        ("overflow_stop_fraction", 0.0),
        ("overflow_min_samples", 0),
        ("stall_timeout_s", -1.0),
        ("lease_ttl_s", 0.0),
    ]:
        cfg = EncodeConfig(input="in", output="out", encoder="e.onnx", **{field: value})
        with pytest.raises(ValueError, match=field):
            validate_config(cfg)
    more_than_most = EncodeConfig(
        input="in", output="out", encoder="e.onnx", num_actors=1, min_actors=2
    )
    with pytest.raises(ValueError, match="min_actors"):
        validate_config(more_than_most)
    validate_config(
        EncodeConfig(input="in", output="out", encoder="e.onnx", min_actors=2)
    )  # 0 = auto
    with pytest.raises(ValueError, match="fp16_model"):
        validate_config(
            EncodeConfig(input="i", output="o", encoder="e", fp16_model=True, device="cpu")
        )


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 6), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_read_resolve_and_decode(tmp_path):
    """Every tar group becomes a row (image-less ones too: resolve merges or rejects them);
    unsafe and dotted keys are rejected by name before any decoding; decoding rejects bad
    images with the reason and keeps the size conditioning of good ones."""
    members = [
        ("good.png", _png()),
        ("good.json", b"{}"),
        ("broken.png", b"nope"),
        ("textonly.txt", b"hi"),
        ("../escape.png", _png()),
        ("v1.2/dotted.png", _png()),
        ("img.001.png", _png()),
    ]
    url = str(tmp_path / "s-000000.tar")
    write_raw_tar(url, members)
    rows = read_rows(url)
    keys = ["good", "broken", "textonly", "../escape", "v1.2/dotted", "img.001"]
    assert [r.key for r in rows] == keys and [r.seq for r in rows] == list(range(6))
    by_key = {r.key: r for r in rows}
    assert by_key["good"].reject == "" and by_key["good"].image == _png()
    assert by_key["good"].files == {"json": b"{}"}
    assert by_key["textonly"].reject == "" and by_key["textonly"].image is None
    assert "unsafe key" in by_key["../escape"].reject
    assert by_key["v1.2/dotted"].reject == "" and by_key["v1.2/dotted"].image is not None
    assert "dot" in by_key["img.001"].reject  # "img.001.png": a key with a dot, named

    plan = resolve_rows(rows, url)
    assert [c.key for c in plan.candidates] == ["good", "broken", "v1.2/dotted"]
    assert sorted(r["key"] for _, r in plan.rejects) == ["../escape", "img.001", "textonly"]
    cfg = resolve_preprocess(PreprocessConfig(resolution=4, bucket_area=16), 4, 2, True)
    with ThreadPoolExecutor(2) as pool:
        windows = list(decoded_windows(plan.candidates, cfg, pool, window=2))
    assert [[item.candidate.key for item in w] for w in windows] == [
        ["good", "broken"],
        ["v1.2/dotted"],
    ]
    good, broken = windows[0]
    assert good.reason == "" and broken.prepared is None
    assert broken.reason.startswith("bad image")
    assert good.prepared.pixels.shape == (4, 4, 3) and good.prepared.pixels.max() > 0
    assert good.prepared.original_size == (6, 10)


def test_expected_total_from_index(tmp_path):
    (tmp_path / "index.json").write_text(
        json.dumps({"shards": [{"name": "a.tar", "samples": 3}, {"name": "b.tar", "samples": 4}]})
    )
    assert expected_total([str(tmp_path / "b.tar")]) == 4
    assert expected_total([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]) == 7
    assert expected_total([str(tmp_path / "c.tar")]) is None
    other = tmp_path / "val"
    other.mkdir()
    (other / "index.json").write_text(json.dumps({"shards": [{"name": "a.tar", "samples": 5}]}))
    assert expected_total([str(tmp_path / "a.tar"), str(other / "a.tar")]) == 8


def test_lookup_codebook_shapes_and_range():
    from pipeline.latents.format import lookup_codebook

    codebook = np.arange(12, dtype=np.float32).reshape(4, 3)  # 4 codes of dim 3
    indices = np.array([[0, 3], [2, 1]], dtype=np.uint16)
    out = lookup_codebook(indices, codebook)
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0, 1], codebook[3])
    batched = lookup_codebook(np.stack([indices, indices[::-1]]), codebook)
    assert batched.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(batched[1, :, 0, 0], codebook[2])
    with pytest.raises(ValueError, match="4 codes"):
        lookup_codebook(np.array([[4]], dtype=np.uint16), codebook)
    with pytest.raises(TypeError):
        lookup_codebook(indices.astype(np.float32), codebook)


def test_load_codebook_checks_hash_and_shape(tmp_path):
    import hashlib

    from pipeline.latents.format import load_codebook

    path = tmp_path / "codebook.npy"
    path.write_bytes(encode_npy(np.ones((4, 2), np.float32)))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_codebook(str(path), digest).shape == (4, 2)
    with pytest.raises(ValueError, match="sha256"):
        load_codebook(str(path), "0" * 64)
    path.write_bytes(encode_npy(np.ones(4, np.float64)))
    with pytest.raises(ValueError, match="float32"):
        load_codebook(str(path))


def test_code_usage_summary():
    usage = CodeUsage(8)
    assert usage.summary()["perplexity"] == 0.0
    usage.update(np.array([[0, 1], [2, 3]], dtype=np.uint16))
    usage.update(np.zeros((0, 2, 2), dtype=np.uint16))
    summary = usage.summary()
    assert summary["codes_used"] == 4 and summary["usage"] == 0.5 and summary["indices"] == 4
    assert summary["perplexity"] == pytest.approx(4.0)  # uniform over 4 codes


def test_pool_bounds():
    """0 actors = what the cluster holds; never more actors than units, never fewer than one;
    a cluster that can grow starts with what fits and may ask for up to num_actors."""
    auto = EncodeConfig(input="in", output="out", encoder="e.onnx")
    assert pool_bounds(auto, capacity=8, units=100) == (1, 8, 8)
    assert pool_bounds(auto, capacity=8, units=3) == (1, 3, 3)
    fixed = dataclasses.replace(auto, num_actors=4, min_actors=2)
    assert pool_bounds(fixed, capacity=8, units=100) == (2, 4, 4)
    assert pool_bounds(fixed, capacity=2, units=100) == (2, 2, 2)
    assert pool_bounds(fixed, capacity=8, units=1) == (1, 1, 1)
    assert pool_bounds(fixed, capacity=2, units=100, can_grow=True) == (2, 2, 4)
    assert pool_bounds(auto, capacity=2, units=100, can_grow=True) == (1, 2, 2)


@pytest.mark.parametrize(
    "override",
    ["device=tpu", "storage.dtype=int8", "storage.latent=mode", "preprocess.mode=tiles"],
)
def test_choices_fail_at_load_naming_the_key(override):
    """Choice fields are Enums: a bad value is refused when the config is loaded, by name."""
    from pipeline.config import ConfigError, load_config

    required = ["input=in", "output=out", "encoder=e.onnx"]
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(EncodeConfig, [], [*required, override])
    with pytest.raises(ValueError):  # and in Python, when the dataclass is built
        key, value = override.split("=")
        if key.startswith("storage."):
            StorageConfig(**{key.split(".")[1]: value})
        elif key.startswith("preprocess."):
            PreprocessConfig(**{key.split(".")[1]: value})
        else:
            EncodeConfig(input="in", output="out", encoder="e.onnx", **{key: value})


def test_storage_dtypes_are_the_manifest_contracts():
    from pipeline.contracts.layout import STORED_DTYPES
    from pipeline.encode.config import StorageDtype

    assert tuple(StorageDtype) == STORED_DTYPES


def test_auto_device_uses_the_clusters_gpus_not_the_drivers(monkeypatch):
    """A job's driver runs on a head without a GPU: the cluster's resources decide (pure logic
    around ray.cluster_resources, stubbed here)."""
    from pipeline.encode import passes

    cfg = EncodeConfig(input="in", output="out", encoder="e.onnx")
    monkeypatch.setattr(passes.ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    monkeypatch.setattr(passes, "gpu_visible", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert passes._actor_gpus(cfg) == 1.0
    monkeypatch.delenv("RAY_ADDRESS")  # embedded Ray: a GPU must be usable on this machine
    assert passes._actor_gpus(cfg) == 0.0
    assert passes._actor_gpus(dataclasses.replace(cfg, device="cpu")) == 0.0
