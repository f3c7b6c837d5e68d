"""End-to-end encode on embedded Ray: image shards (with bad samples) -> latent shards + manifest."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import decode_image, normalize, resize_center_crop
from pipeline.data.tario import TarShardWriter, write_index
from pipeline.encode import EncodeConfig, EncodeConflictError, StorageConfig, encode_corpus
from pipeline.encode.job import EncodeCapacityError
from pipeline.encode.preprocess import PreprocessConfig
from pipeline.encode.session import make_session
from pipeline.latents import iter_latents, load_manifest, manifest_shards, read_rejects
from pipeline.latents.format import SIZES_FIELD
from tests.tarfiles import truncate_inside, write_raw_tar

RNG = np.random.default_rng(0)


def _image_bytes(fmt: str, size=(24, 20)) -> bytes:
    arr = RNG.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _sample(i: int, fmt: str = "PNG") -> dict[str, bytes]:
    ext = "png" if fmt == "PNG" else "jpg"
    return {
        ext: _image_bytes(fmt),
        "json": json.dumps({"i": i}).encode(),
        "txt": f"caption {i}".encode(),
        "cls": str(i % 3).encode(),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Four input shards + index.json, with one of each failure the encoder must survive."""
    root = str(tmp_path_factory.mktemp("images"))
    samples: dict[str, dict[str, bytes]] = {}
    with TarShardWriter(root, prefix="shard", max_samples=5) as writer:
        for i in range(10):
            key = f"s{i // 5}_{i % 5}"
            files = _sample(i, "PNG" if i % 2 else "JPEG")
            if key == "s0_2":
                files["png" if "png" in files else "jpg"] = b"\x89PNG\r\n\x1a\n not an image"
            if key == "s1_3":
                files = {"json": files["json"]}  # no image at all
            writer.write(key, files)
            samples[key] = files
    infos = writer.close()
    raw = os.path.join(root, "shard-000002.tar")
    good = _sample(20)
    write_raw_tar(
        raw,
        [("bad key.png", _image_bytes("PNG")), ("s0_1.png", _image_bytes("PNG"))]
        + [(f"good_2.{ext}", data) for ext, data in good.items()],
    )
    samples["good_2"] = good
    with TarShardWriter(root, prefix="trunc", max_samples=10) as writer:
        for i in range(4):
            samples[f"t_{i}"] = _sample(30 + i)
            writer.write(f"t_{i}", samples[f"t_{i}"])
    trunc_info = writer.close()[0]
    trunc = os.path.join(root, "shard-000003.tar")
    os.rename(os.path.join(root, trunc_info.name), trunc)
    truncate_inside(trunc, "t_2.png")
    infos += [
        type(trunc_info)("shard-000002.tar", 3, os.path.getsize(raw)),
        type(trunc_info)("shard-000003.tar", 4, trunc_info.bytes),
    ]
    write_index(root, infos)
    return {
        "dir": root,
        "samples": samples,
        "good": {"s0_0", "s0_1", "s0_3", "s0_4", "s1_0", "s1_1", "s1_2", "s1_4", "good_2"}
        | {"t_0", "t_1"},
        "rejected": {"s0_2": "bad image", "s1_3": "no image", "bad key": "unsafe key"}
        | {"t_2": "truncated"},
    }


@pytest.fixture(scope="module")
def encoded(ray_local, corpus, tiny_encoder, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("latents"))
    cfg = EncodeConfig(input=corpus["dir"], output=out, encoder=tiny_encoder, batch_size=4)
    manifest = encode_corpus(cfg)
    return {"dir": out, "manifest": manifest, "cfg": cfg}


def test_every_key_exactly_once(corpus, encoded):
    keys = [k for k, _, _ in iter_latents(encoded["dir"])]
    assert len(keys) == len(set(keys))
    assert set(keys) == corpus["good"]
    rejects = read_rejects(encoded["dir"])
    by_key: dict[str, list[str]] = {}
    for r in rejects:
        by_key.setdefault(r["key"], []).append(r["reason"])
    for key, fragment in corpus["rejected"].items():
        assert len(by_key[key]) == 1 and fragment in by_key[key][0], (key, by_key.get(key))
    # The second "s0_1" (shard 2) is refused as a duplicate; the first one was written.
    assert len(by_key["s0_1"]) == 1 and "duplicate" in by_key["s0_1"][0]
    dup = next(r for r in rejects if r["key"] == "s0_1")
    assert dup["shard"].endswith("shard-000002.tar")
    assert len(rejects) == len(corpus["rejected"]) + 1


def test_manifest_counts_and_stats(encoded):
    manifest = load_manifest(encoded["dir"])
    assert manifest == encoded["manifest"]
    shards = manifest_shards(encoded["dir"], manifest)
    assert manifest.samples == 11 == sum(s.samples for s in shards) and manifest.shard_count == 4
    # One shard per input shard; shard 2's only good sample besides the duplicate is good_2.
    assert [s.samples for s in shards] == [4, 4, 1, 2]
    assert [s.source.rsplit("/", 1)[1] for s in shards] == [f"shard-00000{i}.tar" for i in range(4)]
    assert all(len(s.sha256) == 64 and s.latent_shape == [4, 8, 8] for s in shards)
    assert manifest.rejects == 5 and manifest.input_samples == 16
    assert manifest.duplicate_rejects == 1 and manifest.nonfinite_rejects == 0
    latent = manifest.latent
    assert (latent.field, latent.shape, latent.dtype, latent.kind) == (
        "latent.npy",
        [4, 8, 8],
        "float16",
        "posterior_mean",
    )
    assert manifest.preprocess["resolution"] == 16 and manifest.storage["dtype"] == "float16"
    latents = np.stack([lat.astype(np.float64) for _, lat, _ in iter_latents(encoded["dir"])])
    assert latents.shape == (11, 4, 8, 8)
    # Statistics are taken on the stored (float16) values over the whole corpus.
    np.testing.assert_allclose(manifest.channel_mean, latents.mean(axis=(0, 2, 3)), atol=1e-9)
    np.testing.assert_allclose(manifest.channel_std, latents.std(axis=(0, 2, 3)), rtol=1e-9)
    assert manifest.scaling_factor == pytest.approx(1 / latents.std(), rel=1e-9)
    assert manifest.shift_factor == pytest.approx(latents.mean(), abs=1e-9)
    with open(os.path.join(encoded["dir"], "index.json")) as f:
        index = json.load(f)
    assert index["samples"] == 11
    leftovers = [n for n in os.listdir(encoded["dir"]) if n.startswith(".")]
    assert leftovers == []


def test_latents_match_direct_onnx_and_extras_kept(corpus, encoded, tiny_encoder):
    session = make_session(tiny_encoder, "cpu")
    for key, latent, extras in iter_latents(encoded["dir"]):
        files = corpus["samples"][key]
        image_ext = "png" if "png" in files else "jpg"
        sizes = json.loads(extras.pop(SIZES_FIELD))
        assert extras == {k: v for k, v in files.items() if k != image_ext}
        assert sizes["original_size"] == [20, 24] and sizes["target_size"] == [16, 16]
        assert sizes["crop_top_left"] == [0, 1]  # 24x20 -> 19x16 (bicubic), centre crop 16
        x = normalize(resize_center_crop(decode_image(files[image_ext]), 16))[None]
        (mean,) = session.run(["mean"], {"image": x})
        np.testing.assert_allclose(latent, mean[0], atol=2e-3, rtol=2e-3)


def test_read_back_with_webdataset(encoded):
    import webdataset as wds

    shards = manifest_shards(encoded["dir"], encoded["manifest"])
    urls = [os.path.join(encoded["dir"], s.name) for s in shards]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    rows = list(ds)
    assert len(rows) == 11
    for row in rows:
        assert row["latent.npy"].shape == (4, 8, 8) and row["latent.npy"].dtype == np.float16
        assert isinstance(row["json"], dict) and "i" in row["json"]


def test_read_back_with_ray_data(ray_local, encoded):
    import ray

    shards = manifest_shards(encoded["dir"], encoded["manifest"])
    urls = [os.path.join(encoded["dir"], s.name) for s in shards]
    rows = ray.data.read_webdataset(urls).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(
        k for k, _, _ in iter_latents(encoded["dir"])
    )
    assert all(np.asarray(r["latent.npy"]).shape == (4, 8, 8) for r in rows)


def _mtimes(directory: str) -> dict[str, float]:
    # _encode/ holds the lease, which every run takes and releases: not corpus data.
    return {
        n: os.path.getmtime(os.path.join(directory, n))
        for n in os.listdir(directory)
        if n != "_encode"
    }


def test_rerun_of_finished_job_does_nothing(encoded, caplog):
    before = _mtimes(encoded["dir"])
    with caplog.at_level("INFO", logger="pipeline.encode.job"):
        manifest = encode_corpus(encoded["cfg"])
    assert "already complete" in caplog.text and "nothing to do" in caplog.text
    assert manifest == load_manifest(encoded["dir"])
    assert _mtimes(encoded["dir"]) == before


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"storage": StorageConfig(dtype="float32")}, "storage"),
        ({"preprocess": PreprocessConfig(small_images="reject")}, "preprocess"),
        ({"prefix": "other"}, "prefix"),
    ],
)
def test_changed_settings_refused_for_same_output(encoded, change, named):
    cfg = dataclasses.replace(encoded["cfg"], **change)
    with pytest.raises(EncodeConflictError, match=named):
        encode_corpus(cfg)


def test_other_encoder_refused_for_same_output(encoded, tiny_vq_encoder):
    cfg = dataclasses.replace(encoded["cfg"], encoder=tiny_vq_encoder)
    with pytest.raises(EncodeConflictError, match="encoder_sha256"):
        encode_corpus(cfg)


def test_missing_input_shard_fails_before_work(corpus, tiny_encoder, tmp_path):
    shards = f"{corpus['dir']}/shard-000000.tar,{corpus['dir']}/shard-000009.tar"
    cfg = EncodeConfig(input=shards, output=str(tmp_path / "out"), encoder=tiny_encoder)
    with pytest.raises(FileNotFoundError, match="shard-000009.tar"):
        encode_corpus(cfg)
    assert not (tmp_path / "out").exists()


def test_float32_to_object_store_matches(ray_local, corpus, encoded, tiny_encoder):
    """Second run: S3 output, float32, explicit shard list -> the same latents."""
    shards = ",".join(os.path.join(corpus["dir"], f"shard-{i:06d}.tar") for i in range(4))
    cfg = EncodeConfig(
        input=shards,
        output="s3://latentpipe-test/latents-f32",
        encoder=tiny_encoder,
        batch_size=3,
        storage=StorageConfig(dtype="float32"),
        threads_per_actor=1,
    )
    manifest = encode_corpus(cfg)
    assert manifest.samples == 11 and manifest.rejects == 5
    assert manifest.shard_count == 4
    first = {k: lat for k, lat, _ in iter_latents(encoded["dir"])}
    for key, latent, _ in iter_latents("s3://latentpipe-test/latents-f32"):
        assert latent.dtype == np.float32
        np.testing.assert_allclose(latent, first[key].astype(np.float32), atol=2e-3)
    assert manifest.channel_mean == pytest.approx(encoded["manifest"].channel_mean, abs=1e-3)
    rejects = [r["key"] for r in read_rejects("s3://latentpipe-test/latents-f32")]
    assert sorted(rejects, key=str) == sorted(["s0_2", "s1_3", "bad key", "s0_1", "t_2"])


def test_object_store_resume_redoes_only_the_lost_unit(ray_local, corpus, tiny_encoder):
    """On an object store (no rename) a unit is committed by its record alone: lose one record
    and the manifest, and the re-run rewrites that unit's shard with the same bytes."""
    import fsspec

    out = "s3://latentpipe-test/resume-obj"
    fs, root = fsspec.core.url_to_fs(out)
    cfg = EncodeConfig(input=corpus["dir"], output=out, encoder=tiny_encoder)
    first = encode_corpus(cfg)
    entries = manifest_shards(out, first)
    shards = {s.name: fs.cat_file(f"{root}/{s.name}") for s in entries}
    fs.rm(f"{root}/manifest.json")
    fs.rm(f"{root}/_encode/commits/u000001.json")
    fs.pipe_file(f"{root}/latents-000001.tar", b"half a shard from a killed run")
    second = encode_corpus(dataclasses.replace(cfg, batch_size=5))
    assert second.runs == 2 and manifest_shards(out, second) == entries
    for name, data in shards.items():
        assert fs.cat_file(f"{root}/{name}") == data, name


def test_memory_filesystem_refused_with_the_reason(ray_local, corpus, tiny_encoder):
    """memory:// lives in one process; the workers that write the corpus would not see it."""
    cfg = EncodeConfig(input=corpus["dir"], output="memory://private", encoder=tiny_encoder)
    with pytest.raises(ValueError, match="private to one process"):
        encode_corpus(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"num_actors": 3, "min_actors": 3}, "min_actors=3"), ({"device": "cuda"}, "GPU")],
)
def test_unschedulable_config_fails_fast(
    ray_local, corpus, tiny_encoder, tmp_path, overrides, message
):
    """More actors than embedded Ray holds (or absent GPUs) raise instead of hanging."""
    out = tmp_path / "out"
    cfg = EncodeConfig(input=corpus["dir"], output=str(out), encoder=tiny_encoder, **overrides)
    with pytest.raises(EncodeCapacityError, match=message):
        encode_corpus(cfg)
    assert not (out / "manifest.json").exists()


# ---- VQ encoders: code indices stored as uint16, statistics on their codebook lookup ---------


@pytest.fixture(scope="module")
def vq_encoded(ray_local, corpus, tiny_vq_encoder, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("vq_latents"))
    cfg = EncodeConfig(input=corpus["dir"], output=out, encoder=tiny_vq_encoder, batch_size=4)
    return {"dir": out, "manifest": encode_corpus(cfg)}


def test_vq_exactly_once_and_rejects_as_kl(corpus, encoded, vq_encoded):
    keys = [k for k, _, _ in iter_latents(vq_encoded["dir"])]
    assert len(keys) == len(set(keys)) and set(keys) == corpus["good"]

    def reasons(directory):  # object addresses in PIL's messages differ from run to run
        rejects = read_rejects(directory)
        return sorted(
            (str(r["key"]), r["shard"], re.sub(" at 0x[0-9a-f]+", "", r["reason"])) for r in rejects
        )

    assert reasons(vq_encoded["dir"]) == reasons(encoded["dir"])


def test_vq_manifest_fields_and_stats_on_lookup(vq_encoded, tiny_vq_encoder):
    from pipeline.contracts.sidecar import file_sha256, load_sidecar
    from pipeline.latents import load_manifest_codebook, lookup_codebook

    manifest = load_manifest(vq_encoded["dir"])
    sidecar = load_sidecar(tiny_vq_encoder)
    latent = manifest.latent.to_dict()
    assert {k: latent[k] for k in ("field", "shape", "dtype", "kind", "num_codes", "code_dim")} == {
        "field": "indices.npy",
        "shape": [8, 8],
        "dtype": "uint16",
        "kind": "vq_indices",
        "num_codes": 64,
        "code_dim": 4,
    }
    assert latent["codebook_file"] == "codebook.npy"
    assert latent["codebook_sha256"] == sidecar.vq.codebook_sha256
    # The corpus carries its own copy of the codebook, byte-identical to the encoder's.
    assert (
        file_sha256(os.path.join(vq_encoded["dir"], "codebook.npy")) == sidecar.vq.codebook_sha256
    )
    assert manifest.samples == 11 and manifest.rejects == 5
    codebook = load_manifest_codebook(vq_encoded["dir"])
    indices = np.stack([idx for _, idx, _ in iter_latents(vq_encoded["dir"])])
    assert indices.dtype == np.uint16 and indices.shape == (11, 8, 8)
    quantized = lookup_codebook(indices, codebook).astype(np.float64)
    assert quantized.shape == (11, 4, 8, 8)
    np.testing.assert_allclose(manifest.channel_mean, quantized.mean(axis=(0, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(manifest.channel_std, quantized.std(axis=(0, 2, 3)), rtol=1e-6)
    assert manifest.scaling_factor == pytest.approx(1 / quantized.std(), rel=1e-6)
    assert manifest.shift_factor == pytest.approx(quantized.mean(), abs=1e-6)
    counts = np.bincount(indices.ravel(), minlength=64)
    usage = manifest.code_usage
    assert usage["codes_used"] == int((counts > 0).sum()) and usage["indices"] == indices.size
    assert usage["usage"] == pytest.approx(usage["codes_used"] / 64)
    assert 1.0 <= usage["perplexity"] <= usage["codes_used"]


def test_vq_lookup_equals_onnx_quantized(corpus, vq_encoded, tiny_vq_encoder):
    from pipeline.latents import load_manifest_codebook, lookup_codebook

    session = make_session(tiny_vq_encoder, "cpu")
    codebook = load_manifest_codebook(vq_encoded["dir"])
    for key, indices, _ in iter_latents(vq_encoded["dir"]):
        files = corpus["samples"][key]
        image_ext = "png" if "png" in files else "jpg"
        x = normalize(resize_center_crop(decode_image(files[image_ext]), 16))[None]
        onnx_indices, quantized = session.run(["indices", "quantized"], {"image": x})
        np.testing.assert_array_equal(indices, onnx_indices[0])
        np.testing.assert_array_equal(lookup_codebook(indices, codebook), quantized[0])


def test_vq_indices_read_back_with_webdataset_as_uint16(vq_encoded):
    import webdataset as wds

    shards = manifest_shards(vq_encoded["dir"], vq_encoded["manifest"])
    urls = [os.path.join(vq_encoded["dir"], s.name) for s in shards]
    rows = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(rows) == 11
    stored = {k: idx for k, idx, _ in iter_latents(vq_encoded["dir"])}
    for row in rows:
        assert row["indices.npy"].dtype == np.uint16 and row["indices.npy"].shape == (8, 8)
        np.testing.assert_array_equal(row["indices.npy"], stored[row["__key__"]])
        assert "latent.npy" not in row


def test_vq_tampered_codebook_refused(corpus, tiny_vq_encoder, tmp_path):
    from pipeline.contracts.sidecar import SidecarError

    enc = tmp_path / "enc"
    enc.mkdir()
    src = os.path.dirname(tiny_vq_encoder)
    for name in ("encoder.onnx", "encoder.json", "codebook.npy"):
        (enc / name).write_bytes(open(os.path.join(src, name), "rb").read())
    codebook = np.load(enc / "codebook.npy")
    np.save(enc / "codebook.npy", codebook[::-1].copy())  # same shape, other codes
    cfg = EncodeConfig(
        input=corpus["dir"], output=str(tmp_path / "out"), encoder=str(enc / "encoder.onnx")
    )
    with pytest.raises(SidecarError, match="codebook"):
        encode_corpus(cfg)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_progress_lines_name_done_total_rate_eta_rejects(
    ray_local, corpus, tiny_encoder, caplog, tmp_path
):
    cfg = EncodeConfig(
        input=corpus["dir"],
        output=str(tmp_path / "progress"),
        encoder=tiny_encoder,
        progress_every_s=1e-6,
    )
    with caplog.at_level("INFO", logger="pipeline.encode.job"):
        encode_corpus(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("wrote 11 latents") and "5 rejected" in m for m in messages)
    lines = [m for m in messages if m.startswith("encoded ")]
    assert len(lines) >= 2
    # index.json promises 17 samples; the truncated shard delivers 3 of its 4 (2 + 1 partial).
    # The progress line also names the capacity: nodes and encoder actors alive. The fifth
    # reject, a cross-shard duplicate, is decided at finalise, which the last line reports.
    assert re.fullmatch(
        r"encoded 16/17 images \([\d.]+ img/s, ETA \dh\d\dm\d\ds\), 4 rejected so far; "
        r"4/4 input shards committed; nodes 1 alive, encoder actors \d+ alive.*",
        lines[-1],
    )
