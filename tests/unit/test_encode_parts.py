"""Encode building blocks without Ray: statistics, .npy and extras coding, manifest, read stage."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data.tario import TarShardWriter
from pipeline.encode.job import EncodeConfig, expected_total, validate_config
from pipeline.encode.latents import decode_npy, encode_npy, load_manifest
from pipeline.encode.stages import decode_batch, key_problem, pack_extras, read_shard, unpack_extras
from pipeline.encode.stats import ChannelStats


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


def test_extras_round_trip_binary():
    files = {"json": b'{"a": 1}', "seg.png": bytes(range(256)), "txt": "é".encode()}
    packed = pack_extras(files)
    assert isinstance(packed, str)
    assert unpack_extras(packed) == files


def test_key_problem():
    assert key_problem("abc_01-x") == ""
    assert key_problem("dir/sub/abc") == ""
    for bad in ["", "a b", "../x", "/abs", "a//b", "a/./b", "x" * 600]:
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
    for field, value in [("dtype", "bfloat16"), ("device", "tpu"), ("batch_size", 0)]:
        cfg = EncodeConfig(input="in", output="out", encoder="e.onnx", **{field: value})
        with pytest.raises(ValueError, match=field):
            validate_config(cfg)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 6), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_read_and_decode_stages_emit_rejects(tmp_path):
    with TarShardWriter(str(tmp_path), prefix="s", max_samples=10) as writer:
        writer.write("good", {"png": _png(), "json": b"{}"})
        writer.write("broken", {"png": b"nope"})
        writer.write("textonly", {"txt": b"hi"})
    url = str(tmp_path / "s-000000.tar")
    rows = list(read_shard({"url": url}))
    assert [r["key"] for r in rows] == ["good", "broken", "textonly"]
    by_key = {r["key"]: r for r in rows}
    assert by_key["good"]["reject"] == "" and unpack_extras(by_key["good"]["extras"]) == {
        "json": b"{}"
    }
    assert "no image field" in by_key["textonly"]["reject"]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = decode_batch(batch, resolution=4)
    assert out["pixels"].shape == (len(rows), 4, 4, 3) and out["pixels"].dtype == np.uint8
    reasons = dict(zip(out["key"], out["reject"], strict=True))
    assert reasons["good"] == "" and out["pixels"][0].max() > 0
    assert reasons["broken"].startswith("bad image")


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
    from pipeline.encode.latents import lookup_codebook

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

    from pipeline.encode.latents import load_codebook

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
    from pipeline.encode.stats import CodeUsage

    usage = CodeUsage(8)
    assert usage.summary()["perplexity"] == 0.0
    usage.update(np.array([[0, 1], [2, 3]], dtype=np.uint16))
    usage.update(np.zeros((0, 2, 2), dtype=np.uint16))
    summary = usage.summary()
    assert summary["codes_used"] == 4 and summary["usage"] == 0.5 and summary["indices"] == 4
    assert summary["perplexity"] == pytest.approx(4.0)  # uniform over 4 codes


def test_encoder_output_by_model_kind():
    from pipeline.encode.stages import encoder_output

    assert encoder_output({"latent_shape": [4, 8, 8]}) == ("mean", (4, 8, 8), "float32")
    vq = {"latent_shape": [4, 8, 8], "model_kind": "vq", "index_dtype": "uint16"}
    assert encoder_output(vq) == ("indices", (8, 8), "uint16")
