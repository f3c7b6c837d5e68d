"""One unit end to end without Ray (pipeline.encode.unit, pipeline.encode.actor): a real input tar,
real ONNX Runtime sessions (an exported tiny KL autoencoder, and hand-built graphs whose outputs
overflow float16 or are not finite for chosen images), real shards and commit records."""

from __future__ import annotations

import dataclasses
import io
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.contracts.sidecar import load_sidecar
from pipeline.data.fingerprint import fingerprint_of
from pipeline.encode.actor import BatchEncoder, EncoderSpec, RuntimeOptions, UnitEncoder
from pipeline.encode.preprocess import PreprocessConfig, prepare_image, resolve_preprocess
from pipeline.encode.session import EncoderRunner, make_session
from pipeline.encode.store import StoragePlan
from pipeline.encode.unit import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_OVERFLOW,
    UnitCounts,
    UnitSettings,
    UnitTask,
    encode_unit,
)
from pipeline.encode.writer import ShardLayout
from pipeline.latents.format import (
    INDICES_FIELD,
    LATENT_FIELD,
    commit_url,
    decode_latent,
    decode_npy,
    iter_tar_bytes,
    join_url,
    lookup_codebook,
    read_json,
    sha256_bytes,
)
from pipeline.latents.stats import ChannelStats
from tests.latent_corpus import write_tar
from tests.onnx_models import argmax_vq, inf_for_white, nan_for_black, scaled, shifted

FS = fsspec.filesystem("memory")


# ----------------------------------------------------------------------------- encoders


@pytest.fixture(scope="module")
def tiny_kl(tmp_path_factory) -> str:
    """An untrained f2, 4-channel KL autoencoder exported at 16 px (as the integration tests'
    ``tiny_encoder``); returns the encoder.onnx path."""
    import torch

    from pipeline.export import export_model
    from pipeline.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(ch=8, ch_mult=[1, 2], z_channels=4, groups=4))
    out = tmp_path_factory.mktemp("encoder")
    export_model(model, str(out), resolution=16, scale_samples=0)
    return str(out / "encoder.onnx")


def _sidecar_spec(path: str) -> tuple[EncoderSpec, object]:
    """EncoderSpec from the sidecar, as the job's _encoder_spec builds it."""
    sidecar = load_sidecar(path)
    norm = sidecar.input.normalization
    spec = EncoderSpec(
        path=path,
        onnx_sha256=sidecar.onnx_sha256,
        input_name=sidecar.input.name,
        scale=float(norm["scale"]),
        offset=float(norm["offset"]),
        vq=False,
        num_codes=0,
        index_dtype="int64",
        channels=int(sidecar.latent_shape[0]),
        factor=sidecar.downsample_factor,
    )
    return spec, sidecar


def _options(need_std: bool = False) -> RuntimeOptions:
    return RuntimeOptions(
        device="cpu", threads=1, fp16=False, io_binding=False, need_std=need_std, decode_threads=2
    )


# ----------------------------------------------------------------------------- units


def _png(color, size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _noise_png(seed: int, size=(20, 16), high: int = 256) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, high, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _settings(
    output: str, channels: int, *, dtype="float16", batch_size=2, min_samples=4
) -> UnitSettings:
    """UnitSettings as the job's _unit_settings builds them (KL, centre crop at 16 px)."""
    return UnitSettings(
        layout=ShardLayout(
            output=output,
            prefix="latents",
            buckets=False,
            channels=channels,
            factor=2,
            latent_channels=channels,
            vq=False,
        ),
        storage=StoragePlan(
            field=LATENT_FIELD, dtype=dtype, sample=False, store_std=False, sample_seed=0
        ),
        preprocess=resolve_preprocess(PreprocessConfig(), 16, 2, True),
        batch_size=batch_size,
        overflow_stop_fraction=0.5,
        overflow_min_samples=min_samples,
    )


def _root() -> str:
    return f"memory://unit-{uuid.uuid4().hex[:8]}"


def _run(url: str, settings: UnitSettings, encoder, unit: int = 3, codebook=None) -> dict:
    with ThreadPoolExecutor(2) as pool:
        task = UnitTask(unit, url, "run1", time.time())
        return encode_unit(task, settings, encoder, codebook, pool)


def _shard_samples(output: str, entry: dict) -> dict[str, dict[str, bytes]]:
    data = FS.cat_file(join_url(output, entry["name"]))
    assert sha256_bytes(data) == entry["sha256"] and len(data) == entry["bytes"]
    return dict(iter_tar_bytes(data, entry["name"]))


def _photo_unit(root: str) -> tuple[str, list[tuple[str, dict[str, bytes]]]]:
    samples = [
        ("a", {"png": _noise_png(0), "txt": b"caption a"}),
        ("b", {"png": _noise_png(1, (16, 24))}),
        ("broken", {"png": b"not an image"}),
        ("c", {"png": _noise_png(2, (32, 32)), "json": b'{"n": 2}'}),
        ("textonly", {"txt": b"no image"}),
        ("d", {"png": _noise_png(3)}),
        ("a", {"cls": b"7"}),  # the rest of sample a, later in the tar
        ("e", {"png": _noise_png(4, (18, 18))}),
    ]
    return write_tar(join_url(root, "in/shard-000003.tar"), samples), samples


def test_encode_unit_with_an_exported_encoder(tiny_kl):
    spec, sidecar = _sidecar_spec(tiny_kl)
    encoder = BatchEncoder(spec, _options())
    root = _root()
    url, samples = _photo_unit(root)
    out = join_url(root, "out")
    settings = _settings(out, spec.channels, batch_size=2)
    result = _run(url, settings, encoder)
    assert result == {
        "unit": 3,
        "status": STATUS_OK,
        "rows": 8,
        "samples": 5,
        "rejects": 2,
        "encoded": 5,
        "overflow": 0,
    }
    record = read_json(commit_url(out, 3))
    assert record["input"] == url and record["fingerprint"] == fingerprint_of(url)
    assert record["keys"] == ["a", "b", "c", "d", "e"] and record["samples"] == 5
    assert record["rows"] == 8 and record["merged_keys"] == 1 and record["run"] == "run1"
    assert [(r["key"], r["reason"].split(":")[0]) for r in record["rejects"]] == [
        ("broken", "bad image"),
        ("textonly", "no image field (fields"),
    ]
    assert {r["shard"] for r in record["rejects"]} == {url}
    for name in ("nonfinite_rejects", "overflow_rejects", "fp16_retries", "duplicate_rejects"):
        assert record[name] == 0, name
    assert record["encoded"] == 5 and record["code_counts"] is None
    (entry,) = record["shards"]
    assert entry["name"] == "latents-000003.tar" and entry["samples"] == 5
    assert entry["latent_shape"] == [4, 8, 8] and entry["bucket"] is None
    stored = _shard_samples(out, entry)
    assert list(stored) == record["keys"]
    assert stored["a"]["txt"] == b"caption a" and stored["a"]["cls"] == b"7"
    assert stored["c"]["json"] == b'{"n": 2}' and "png" not in stored["c"]
    # The stored latents are the encoder's, in float16, for the preprocessed pixels.
    images = {key: files for key, files in samples if "png" in files}
    pixels = np.stack(
        [prepare_image(images[k]["png"], settings.preprocess).pixels for k in "abcde"]
    )
    direct = encoder.encode(pixels)
    latents = np.stack([decode_latent(stored[k][LATENT_FIELD], "float16") for k in "abcde"])
    expected = np.stack([mean.astype(np.float16).astype(np.float32) for mean, _ in direct])
    np.testing.assert_array_equal(latents, expected)
    stats = ChannelStats(4)
    stats.update(latents)
    assert record["stats"] == stats.state()
    assert entry["latent_shape"] == sidecar.latent_shape


def test_encode_unit_output_does_not_depend_on_batch_size(tiny_kl):
    spec, _ = _sidecar_spec(tiny_kl)
    encoder = BatchEncoder(spec, _options())
    root = _root()
    url, _ = _photo_unit(root)
    records = []
    for batch_size in (1, 4):
        out = join_url(root, f"out{batch_size}")
        settings = _settings(out, spec.channels, batch_size=batch_size)
        assert _run(url, settings, encoder)["status"] == STATUS_OK
        record = read_json(commit_url(out, 3))
        del record["elapsed_s"]
        records.append(record)
    assert records[0] == records[1]  # same shard bytes (sha256), keys, rejects and statistics


def test_encode_unit_on_local_disk(tmp_path):
    """Local input and output: the record's fingerprint is the local one, and the output holds
    the unit's shard and record, no temporary file; an empty input shard commits no shard."""
    encoder = BatchEncoder(scaled(tmp_path / "pool.onnx", 1.0), _options())
    inputs = tmp_path / "in"
    url = write_tar(str(inputs / "a.tar"), [("k", {"png": _noise_png(0), "txt": b"t"})])
    empty = write_tar(str(inputs / "b.tar"), [])
    out = tmp_path / "out"
    assert _run(url, _settings(str(out), 3), encoder, unit=0)["status"] == STATUS_OK
    assert _run(empty, _settings(str(out), 3), encoder, unit=1)["status"] == STATUS_OK
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "_encode/commits/u000000.json",
        "_encode/commits/u000001.json",
        "latents-000000.tar",
    ]
    record = read_json(str(out / "_encode/commits/u000000.json"))
    assert record["fingerprint"] == fingerprint_of(url)
    assert "mtime" in json.dumps(record["fingerprint"])  # local disk: size + mtime
    blank = read_json(str(out / "_encode/commits/u000001.json"))
    assert (blank["rows"], blank["samples"], blank["shards"], blank["keys"]) == (0, 0, [], [])
    assert blank["rejects"] == [] and blank["stats"]["count"] == 0


def test_encoder_that_always_overflows_float16_commits_nothing(tmp_path):
    encoder = BatchEncoder(shifted(tmp_path / "shift.onnx", 70000.0), _options())
    root = _root()
    samples = [(f"k{i}", {"png": _noise_png(i)}) for i in range(6)]
    url = write_tar(join_url(root, "in/s.tar"), samples)
    out = join_url(root, "out")
    result = _run(url, _settings(out, 3, min_samples=4), encoder)
    assert result["status"] == STATUS_OVERFLOW and result["unit"] == 3
    assert "storage.dtype=float16" in result["message"]
    assert "bfloat16 or float32" in result["message"]
    assert not FS.exists(commit_url(out, 3))
    assert not FS.exists(join_url(out, "latents-000003.tar"))
    # The same encoder stored as bfloat16: every image fits.
    wide = join_url(root, "wide")
    result = _run(url, _settings(wide, 3, dtype="bfloat16", min_samples=4), encoder)
    assert result["status"] == STATUS_OK and result["samples"] == 6
    latents = _shard_samples(wide, read_json(commit_url(wide, 3))["shards"][0])
    assert decode_latent(latents["k0"][LATENT_FIELD], "bfloat16").min() > 65504


def test_encoder_that_overflows_for_one_image(tmp_path):
    encoder = BatchEncoder(scaled(tmp_path / "scaled.onnx", 70000.0), _options())
    root = _root()
    # pool = x / 127.5 - 1: at most 0.57 for pixels <= 200 (39,843: fits), 1.0 for white.
    samples = [(f"k{i}", {"png": _noise_png(i, high=201)}) for i in range(7)]
    samples.insert(4, ("white", {"png": _png((255, 255, 255)), "txt": b"w"}))
    url = write_tar(join_url(root, "in/s.tar"), samples)
    out = join_url(root, "out")
    result = _run(url, _settings(out, 3, min_samples=4), encoder)
    assert result["status"] == STATUS_OK
    assert (result["samples"], result["rejects"], result["overflow"]) == (7, 1, 1)
    record = read_json(commit_url(out, 3))
    (reject,) = record["rejects"]
    assert reject["key"] == "white"
    assert "storage.dtype=float16" in reject["reason"] and "bfloat16 or float32" in reject["reason"]
    assert record["overflow_rejects"] == 1 and record["nonfinite_rejects"] == 0
    assert record["encoded"] == 8  # the encoder's output was finite; only float16 could not hold it
    assert record["keys"] == [f"k{i}" for i in range(7)]
    stored = _shard_samples(out, record["shards"][0])
    assert all(
        np.isfinite(decode_latent(s[LATENT_FIELD], "float16")).all() for s in stored.values()
    )


def test_encoder_non_finite_for_one_image(tmp_path):
    encoder = BatchEncoder(nan_for_black(tmp_path / "nan.onnx"), _options())
    root = _root()
    # pixels >= 20 give pool >= -0.84: finite
    samples = [(f"k{i}", {"png": _png((20 + 30 * i, 90, 200))}) for i in range(5)]
    samples.insert(2, ("black", {"png": _png((0, 0, 0))}))
    url = write_tar(join_url(root, "in/s.tar"), samples)
    out = join_url(root, "out")
    result = _run(url, _settings(out, 3, min_samples=4), encoder)
    assert result["status"] == STATUS_OK and result["samples"] == 5 and result["encoded"] == 5
    record = read_json(commit_url(out, 3))
    assert record["rejects"] == [
        {
            "key": "black",
            "shard": url,
            "reason": "encoder produced non-finite values for this image",
        }
    ]
    assert record["nonfinite_rejects"] == 1 and record["overflow_rejects"] == 0
    assert "black" not in record["keys"]


def test_encode_vq_unit(tmp_path):
    """VQ: indices stored as the sidecar's index dtype, statistics over the codebook lookup, and
    the code histogram in the record."""
    encoder = BatchEncoder(argmax_vq(tmp_path / "vq.onnx", num_codes=3), _options())
    codebook = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]], np.float32)  # 3 codes of dim 2
    root = _root()
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 100, 0)]
    samples = [(f"k{i}", {"png": _png(c)}) for i, c in enumerate(colours)]
    url = write_tar(join_url(root, "in/s.tar"), samples)
    out = join_url(root, "out")
    settings = dataclasses.replace(
        _settings(out, 2),
        layout=dataclasses.replace(_settings(out, 2).layout, latent_channels=3, vq=True),
        storage=StoragePlan(
            field=INDICES_FIELD,
            dtype="float16",
            sample=False,
            store_std=False,
            sample_seed=0,
            vq=True,
        ),
    )
    result = _run(url, settings, encoder, codebook=codebook)
    assert result["status"] == STATUS_OK and result["samples"] == 4
    record = read_json(commit_url(out, 3))
    (entry,) = record["shards"]
    assert entry["latent_shape"] == [8, 8]
    stored = _shard_samples(out, entry)
    indices = np.stack([decode_npy(stored[f"k{i}"][INDICES_FIELD]) for i in range(4)])
    assert indices.dtype == np.uint16
    assert [int(x[0, 0]) for x in indices] == [0, 1, 2, 0]  # the dominant colour's code
    assert record["code_counts"] == np.bincount(indices.ravel(), minlength=3).tolist()
    stats = ChannelStats(2)
    stats.update(lookup_codebook(indices, codebook))
    assert record["stats"] == stats.state()


def test_systematic_overflow_threshold():
    settings = _settings("memory://unused", 3, min_samples=4)
    assert not UnitCounts(encoded=10, overflow=3).systematic_overflow(settings)  # too few
    assert not UnitCounts(encoded=10, overflow=4).systematic_overflow(settings)  # < half
    assert UnitCounts(encoded=10, overflow=5).systematic_overflow(settings)
    assert UnitCounts(encoded=4, overflow=4).systematic_overflow(settings)


def test_unit_encoder_returns_unit_errors_as_status(tmp_path):
    """The actor callable (no Ray needed): a unit that raises is an error row naming the cause,
    the next unit of the same actor still works."""
    spec = scaled(tmp_path / "scaled.onnx", 1.0)
    root = _root()
    url = write_tar(join_url(root, "in/s.tar"), [("k", {"png": _noise_png(0)})])
    actor = UnitEncoder(spec, _options(), _settings(join_url(root, "out"), 3), None)
    batch = {
        "unit": np.array([0, 1]),
        "url": np.array([join_url(root, "in/missing.tar"), url], dtype=object),
        "run": np.array(["r", "r"], dtype=object),
        "run_start": np.array([time.time()] * 2),
    }
    out = actor(batch)
    assert out["unit"].tolist() == [0, 1]
    assert out["status"].tolist() == [STATUS_ERROR, STATUS_OK]
    assert "FileNotFoundError" in out["info"][0]
    assert FS.exists(commit_url(join_url(root, "out"), 1))
    actor.pool.shutdown()


def test_wrong_latent_shape_is_an_error(tmp_path):
    spec = dataclasses.replace(scaled(tmp_path / "scaled.onnx", 1.0), factor=4)
    encoder = BatchEncoder(spec, _options())
    with pytest.raises(ValueError, match="encoder produced"):
        encoder.encode(np.zeros((1, 16, 16, 3), np.uint8))


# ----------------------------------------------------------------------------- fp16 retries


class _CountingRunner(EncoderRunner):
    """A real CPU runner that records the batches it was given."""

    def __init__(self, path: str):
        super().__init__(make_session(path, "cpu", 1), "image", False)
        self.batches: list[np.ndarray] = []

    def run(self, output_names, x):
        self.batches.append(x.copy())
        return super().run(output_names, x)


def test_fp16_retry_reruns_only_the_failing_images_in_float32(tmp_path):
    """fp16_model needs CUDA, so the float16 session is stood in for by a CPU session of a graph
    that gives inf for images with a white marker block; the float32 session is a normal one."""
    exact_spec = scaled(tmp_path / "exact.onnx", 1.0)
    flaky_spec = inf_for_white(tmp_path / "flaky.onnx")
    encoder = BatchEncoder(exact_spec, _options(need_std=True))
    encoder.options = dataclasses.replace(encoder.options, fp16=True)
    encoder.runner = _CountingRunner(flaky_spec.path)
    encoder.exact = exact = _CountingRunner(exact_spec.path)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 250, (5, 8, 8, 3), dtype=np.uint8)
    marked = [1, 3]
    images[marked, :2, :2, :] = 255  # a white 2x2 block: pool = 1, 1 / (1 - 1) = inf
    results = encoder.encode(images)

    assert encoder.fp16_retries == 2
    assert len(exact.batches) == 1 and len(exact.batches[0]) == 2  # only the failing images
    direct_exact = encoder._run(exact, images)
    direct_flaky = encoder._run(encoder.runner, images)
    for j, (mean, std) in enumerate(results):
        assert np.isfinite(mean).all() and np.isfinite(std).all()
        source = direct_exact if j in marked else direct_flaky
        np.testing.assert_array_equal(mean, source[0][j])
        np.testing.assert_array_equal(std, np.exp(0.5 * source[1][j]).astype(np.float32))
    # A batch without failures never touches the float32 session.
    exact.batches.clear()
    encoder.encode(images[[0, 2, 4]])
    assert exact.batches == [] and encoder.fp16_retries == 2


def test_fp16_retry_that_is_still_not_finite_is_a_reject(tmp_path):
    flaky = inf_for_white(tmp_path / "flaky.onnx")
    encoder = BatchEncoder(flaky, _options())
    encoder.options = dataclasses.replace(encoder.options, fp16=True)
    encoder.exact = _CountingRunner(flaky.path)  # float32 fails for it too
    images = np.full((2, 4, 4, 3), 100, np.uint8)
    images[0] = 255
    first, second = encoder.encode(images)
    assert first is None and second is not None and encoder.fp16_retries == 1


def test_no_retry_without_fp16(tmp_path):
    flaky = inf_for_white(tmp_path / "flaky.onnx")
    encoder = BatchEncoder(flaky, _options())
    images = np.full((2, 4, 4, 3), 255, np.uint8)
    assert encoder.encode(images) == [None, None]
    assert encoder.fp16_retries == 0 and encoder.exact is None
