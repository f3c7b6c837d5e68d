"""The encode job against every kind of bad input it must survive, on embedded Ray.

One corpus holds all of them; the job must finish, write every good sample exactly once (with
its captions and metadata) and reject every bad one exactly once with a reason.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.tario import write_index
from pipeline.encode import EncodeConfig, PreprocessConfig, StorageConfig, encode_corpus
from pipeline.encode.session import make_session
from pipeline.latents import iter_inputs, iter_latents, manifest_shards, read_rejects
from pipeline.latents.format import SIZES_FIELD, STD_FIELD, decode_latent, iter_shard
from tests.tarfiles import truncate_inside, write_raw_tar

RNG = np.random.default_rng(7)


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _photo(size=(40, 30)) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))


def _palette(transparent: bool) -> bytes:
    # Transparent: every pixel is index 0 (black), marked transparent -> composited on white.
    img = Image.new("P", (30, 30), 0 if transparent else 1)
    img.putpalette([0, 0, 0, 250, 20, 20] + [0] * 762)
    return _save(img, "PNG", **({"transparency": 0} if transparent else {}))


def _good_images() -> dict[str, tuple[str, bytes]]:
    """key -> (image extension, bytes) for every image the job must accept."""
    gray16 = Image.fromarray(np.full((30, 30), 65535, dtype=np.uint16))
    return {
        "jpeg_rgb": ("jpg", _save(_photo(), "JPEG", quality=90)),
        "png_rgb": ("png", _save(_photo(), "PNG")),
        "webp_rgb": ("webp", _save(_photo(), "WEBP")),
        "cmyk": ("jpg", _save(Image.new("CMYK", (30, 30), (0, 255, 255, 0)), "JPEG")),
        "palette": ("png", _palette(False)),
        "palette_alpha": ("png", _palette(True)),
        "gray": ("png", _save(Image.new("L", (30, 30), 90), "PNG")),
        "gray_alpha": ("png", _save(Image.new("LA", (30, 30), (0, 128)), "PNG")),
        "rgba": ("png", _save(Image.new("RGBA", (30, 30), (10, 200, 30, 128)), "PNG")),
        "gray16": ("png", _save(gray16, "PNG")),
        "small": ("png", _save(_photo((8, 6)), "PNG")),  # below the 16 px target
        "dir/slashed": ("png", _save(_photo(), "PNG")),
        "v1.2/dotted_dir": ("png", _save(_photo(), "PNG")),
    }


def _bad_images() -> dict[str, tuple[str, bytes, str]]:
    """key -> (extension, bytes, expected reason fragment)."""
    jpeg = _save(_photo((64, 48)), "JPEG", quality=90)
    return {
        "truncated_jpeg": ("jpg", jpeg[: len(jpeg) // 2], "bad image"),
        "garbage": ("png", b"\x89PNG\r\n\x1a\n definitely not an image", "bad image"),
        "empty_file": ("jpg", b"", "bad image"),
        "bomb": ("png", _png_claiming(100_000, 100_000), "too large"),
    }


def _members(key: str, ext: str, data: bytes) -> list[tuple[str, bytes]]:
    meta = json.dumps({"key": key, "caption": f"a photo called {key}"}).encode()
    return [
        (f"{key}.{ext}", data),
        (f"{key}.txt", f"caption of {key}".encode()),
        (f"{key}.json", meta),
    ]


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("bad_corpus"))
    good, bad = _good_images(), _bad_images()
    members: list[tuple[str, bytes]] = []
    for key, (ext, data) in good.items():
        members += _members(key, ext, data)
    for key, (ext, data, _) in bad.items():
        members += _members(key, ext, data)
    # A sample whose files are not contiguous: image, another sample, then its caption.
    split_image = _save(_photo(), "PNG")
    members += [("split.png", split_image), *_members("between", "png", _save(_photo(), "PNG"))]
    members += [("split.txt", b"caption after another sample")]
    # "a.b.png": WebDataset reads key "a" with field "b.png", still an image.
    members += [("multi.part.png", _save(_photo(), "PNG")), ("multi.txt", b"multi caption")]
    members += _members("../escape", "png", _save(_photo(), "PNG"))
    # Keys with a dot in the file-name part: WebDataset would read both as key "img".
    members += _members("img.001", "png", _save(_photo(), "PNG"))
    members += _members("img.002", "png", _save(_photo(), "PNG"))
    members += [("no_image.txt", b"text only"), ("no_image.json", b"{}")]
    sizes = [write_raw_tar(os.path.join(root, "shard-000000.tar"), members)]
    sizes.append(write_raw_tar(os.path.join(root, "shard-000001.tar"), []))  # an empty shard
    trunc = [m for k in ("t0", "t1", "t2") for m in _members(k, "png", _save(_photo(), "PNG"))]
    trunc_path = os.path.join(root, "shard-000002.tar")
    write_raw_tar(trunc_path, trunc)
    truncate_inside(trunc_path, "t1.txt", keep=7)
    sizes.append(os.path.getsize(trunc_path))
    # A key that an earlier shard already provided, and one fresh sample.
    dup = _members("png_rgb", "png", _save(_photo(), "PNG")) + _members("fresh", "png", split_image)
    sizes.append(write_raw_tar(os.path.join(root, "shard-000003.tar"), dup))
    open(os.path.join(root, "shard-000004.tar"), "wb").close()  # a 0-byte "empty shard"
    sizes.append(0)
    from pipeline.data.tario import ShardInfo

    counts = [len(good) + len(bad) + 7, 0, 3, 2, 0]
    write_index(
        root,
        [
            ShardInfo(f"shard-{i:06d}.tar", n, b)
            for i, (n, b) in enumerate(zip(counts, sizes, strict=True))
        ],
    )
    expected_good = set(good) | {"split", "between", "multi", "t0", "fresh"}
    expected_rejects = {key: reason for key, (_, _, reason) in bad.items()}
    expected_rejects |= {"../escape": "unsafe key", "no_image": "no image field", "t1": "truncated"}
    expected_rejects |= {"img.001": "contains a dot", "img.002": "contains a dot"}
    return {"dir": root, "good": expected_good, "rejects": expected_rejects}


@pytest.fixture(scope="module")
def bad_encoded(ray_local, bad_corpus, tiny_encoder, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("bad_latents"))
    cfg = EncodeConfig(input=bad_corpus["dir"], output=out, encoder=tiny_encoder, batch_size=5)
    return {"dir": out, "manifest": encode_corpus(cfg), "cfg": cfg}


def test_every_good_sample_once_every_bad_one_rejected_once(bad_corpus, bad_encoded):
    written = {key: extras for key, _, extras in iter_latents(bad_encoded["dir"])}
    assert set(written) == bad_corpus["good"]
    rejects = read_rejects(bad_encoded["dir"])
    by_key: dict[str, list[dict]] = {}
    for record in rejects:
        by_key.setdefault(record["key"], []).append(record)
    for key in bad_corpus["rejects"]:
        assert len(by_key.pop(key)) == 1, key
    # The only other reject: the second "png_rgb", from shard 3, as a cross-shard duplicate.
    (dup,) = by_key.pop("png_rgb")
    assert "duplicate" in dup["reason"] and dup["shard"].endswith("shard-000003.tar")
    assert by_key == {}
    reasons = {r["key"]: r["reason"] for r in rejects if r["key"] != "png_rgb"}
    for key, fragment in bad_corpus["rejects"].items():
        assert fragment in reasons[key], (key, reasons[key])
    manifest = bad_encoded["manifest"]
    assert manifest.samples == len(bad_corpus["good"])
    assert manifest.rejects == len(bad_corpus["rejects"]) + 1
    assert manifest.merged_keys == 1  # "split"
    # Inputs that held no sample at all are counted, and named in the lineage.
    assert manifest.empty_inputs == 2
    lineage = iter_inputs(bad_encoded["dir"], manifest)
    assert [i.url.rsplit("/", 1)[1] for i in lineage if i.rows == 0] == [
        "shard-000001.tar",
        "shard-000004.tar",
    ]


def test_captions_and_metadata_carried_through(bad_encoded):
    written = {key: extras for key, _, extras in iter_latents(bad_encoded["dir"])}
    assert written["jpeg_rgb"]["txt"] == b"caption of jpeg_rgb"
    assert json.loads(written["cmyk"]["json"])["caption"] == "a photo called cmyk"
    assert written["split"]["txt"] == b"caption after another sample"
    assert written["multi"]["txt"] == b"multi caption"
    assert set(written["small"]) == {"txt", "json", SIZES_FIELD}


def test_image_modes_encode_like_their_rgb_conversion(bad_encoded, tiny_encoder):
    """CMYK, palette, grey, alpha and 16-bit images store the latent of their RGB rendering."""
    session = make_session(tiny_encoder, "cpu")
    latents = {key: lat for key, lat, _ in iter_latents(bad_encoded["dir"])}
    expected_rgb = {
        "cmyk": (255, 0, 0),
        "palette": (250, 20, 20),
        "palette_alpha": (255, 255, 255),  # transparent black -> white, not black
        "gray": (90, 90, 90),
        "gray16": (255, 255, 255),
        "gray_alpha": (127, 127, 127),
    }
    for key, rgb in expected_rgb.items():
        x = (
            np.full((1, 3, 16, 16), 0, np.float32)
            + (np.array(rgb, np.float32) / 127.5 - 1)[None, :, None, None]
        )
        (mean,) = session.run(["mean"], {"image": x})
        np.testing.assert_allclose(latents[key], mean[0], atol=0.02, err_msg=key)


def test_small_image_policy_reject(ray_local, bad_corpus, tiny_encoder, tmp_path):
    out = str(tmp_path / "strict")
    cfg = EncodeConfig(
        input=bad_corpus["dir"],
        output=out,
        encoder=tiny_encoder,
        preprocess=PreprocessConfig(small_images="reject"),
    )
    manifest = encode_corpus(cfg)
    reasons = {r["key"]: r["reason"] for r in read_rejects(out)}
    assert "smaller than" in reasons["small"]
    assert manifest.samples == len(bad_corpus["good"]) - 1


def test_resume_redoes_only_uncommitted_units_byte_identical(ray_local, bad_encoded, tmp_path):
    """Lose a commit record, a shard and the manifest (a kill between steps): the re-run redoes
    exactly those units and the corpus is byte-identical; a smaller batch size changes nothing."""
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(bad_encoded["dir"], copy)
    os.remove(os.path.join(copy, "manifest.json"))
    os.remove(os.path.join(copy, "_encode", "commits", "u000003.json"))
    os.remove(os.path.join(copy, "latents-000000.tar"))  # commit record kept: must be redone
    with open(os.path.join(copy, "rejects.jsonl"), "w") as f:
        f.write("stale\n")
    cfg = dataclasses.replace(bad_encoded["cfg"], output=copy, batch_size=2)
    manifest = encode_corpus(cfg)
    assert manifest.runs == 2
    names = [s.name for s in manifest_shards(copy, manifest)]
    for name in names + ["rejects.jsonl", "index.json", "shards.jsonl", "inputs.jsonl"]:
        with (
            open(os.path.join(copy, name), "rb") as a,
            open(os.path.join(bad_encoded["dir"], name), "rb") as b,
        ):
            assert a.read() == b.read(), name
    original = bad_encoded["manifest"]
    for key in ("shards_sha256", "channel_mean", "channel_std", "scaling_factor", "shift_factor"):
        assert getattr(manifest, key) == getattr(original, key), key


def test_sample_std_bfloat16_deterministic(ray_local, bad_corpus, tiny_encoder, tmp_path):
    """latent=sample draws one sample per key, reproducibly: two runs with different batch
    sizes store identical bytes, and (sample - mean) / std is standard normal."""
    storage = StorageConfig(dtype="bfloat16", latent="sample", store_std=True, sample_seed=3)
    runs = []
    for batch in (3, 7):
        out = str(tmp_path / f"b{batch}")
        cfg = EncodeConfig(
            input=bad_corpus["dir"],
            output=out,
            encoder=tiny_encoder,
            storage=storage,
            batch_size=batch,
        )
        runs.append((out, encode_corpus(cfg)))
    (first, manifest), (second, _) = runs
    assert manifest.latent.kind == "posterior_sample" and manifest.latent.std_field == STD_FIELD
    assert manifest.latent.storage_dtype == "uint16"
    for entry in manifest_shards(first, manifest):
        a = dict(iter_shard(first, entry))
        b = dict(iter_shard(second, entry))
        assert a == b
    # (sample - mean) / std over the whole corpus is standard normal: the draw is a real one.
    mean_out = str(tmp_path / "means")
    mean_cfg = EncodeConfig(
        input=bad_corpus["dir"],
        output=mean_out,
        encoder=tiny_encoder,
        storage=StorageConfig(dtype="float32"),
    )
    encode_corpus(mean_cfg)
    means = {key: lat for key, lat, _ in iter_latents(mean_out)}
    z_scores = []
    for entry in manifest_shards(first, manifest):
        for key, files in iter_shard(first, entry):
            sample = decode_latent(files["latent.npy"], "bfloat16")
            std = decode_latent(files[STD_FIELD], "bfloat16")
            assert sample.shape == std.shape == (4, 8, 8) and (std > 0).all()
            z_scores.append(((sample - means[key]) / std).ravel())
    z = np.concatenate(z_scores)
    assert len(z_scores) == manifest.samples
    assert abs(z.mean()) < 0.1 and 0.85 < z.std() < 1.15


def test_buckets_group_shapes_and_record_sizes(ray_local, tiny_encoder, tmp_path):
    """Wide, tall and square photos land in aspect-ratio buckets; each shard holds one shape."""
    from pipeline.data.tario import TarShardWriter

    src = str(tmp_path / "images")
    shapes = {"wide": (64, 32), "tall": (32, 64), "square": (40, 40), "wideish": (60, 40)}
    with TarShardWriter(src, prefix="shard", max_samples=10) as writer:
        for key, size in shapes.items():
            writer.write(key, {"png": _save(_photo(size), "PNG"), "txt": key.encode()})
    write_index(src, writer.shards)
    pre = PreprocessConfig(mode="buckets", resolution=32, bucket_step=8, bucket_max_aspect=2.0)
    out = str(tmp_path / "out")
    manifest = encode_corpus(
        EncodeConfig(input=src, output=out, encoder=tiny_encoder, preprocess=pre)
    )
    assert manifest.samples == 4 and manifest.latent.shape is None
    by_key = {}
    for entry in manifest_shards(out, manifest):
        h, w = entry.bucket
        assert entry.name.endswith(f"-h{h}w{w}.tar")
        assert entry.latent_shape == [4, h // 2, w // 2]
        for key, files in iter_shard(out, entry):
            sizes = json.loads(files[SIZES_FIELD])
            assert sizes["target_size"] == [h, w]
            assert decode_latent(files["latent.npy"], "float16").shape == (4, h // 2, w // 2)
            by_key[key] = sizes
    assert (
        by_key["wide"]["original_size"] == [32, 64]
        and by_key["wide"]["target_size"][1] > by_key["wide"]["target_size"][0]
    )
    assert by_key["tall"]["target_size"][0] > by_key["tall"]["target_size"][1]
    assert by_key["square"]["target_size"][0] == by_key["square"]["target_size"][1]


def test_readers_and_verify_on_the_real_output(bad_corpus, bad_encoded):
    """The diffusion-side readers accept the job's output, scale it, and refuse what they must."""
    from pipeline.latents import CorpusError, LatentDataset
    from pipeline.verify import VerifyConfig, verify_corpus

    manifest = bad_encoded["manifest"]
    report = verify_corpus(VerifyConfig(output=bad_encoded["dir"]))
    assert report["ok"], report["errors"]
    assert report["samples"] == manifest.samples and report["rejects"] == manifest.rejects
    dataset = LatentDataset(
        bad_encoded["dir"], batch_size=4, expected_encoder_sha256=manifest.encoder.sha256
    )
    batches = list(dataset)
    assert sorted(k for b in batches for k in b["key"]) == sorted(bad_corpus["good"])
    scaled = np.concatenate([b["latent"].numpy() for b in batches])
    assert abs(scaled.mean()) < 1e-2 and abs(scaled.std() - 1) < 1e-2  # shifted and scaled
    with pytest.raises(CorpusError, match="encoder"):
        LatentDataset(bad_encoded["dir"], expected_encoder_sha256="0" * 64)
    with pytest.raises(CorpusError, match="committed"):
        LatentDataset(bad_encoded["dir"], shards=["latents-000099.tar"])


def test_bucketed_corpus_reads_in_stackable_batches(ray_local, tiny_encoder, tmp_path):
    """Diffusion-side reading of a bucketed corpus: every batch holds one shape, with sizes."""
    from pipeline.data.tario import TarShardWriter
    from pipeline.latents import LatentDataset, read_latents

    src = str(tmp_path / "images")
    sizes = [(64, 32), (32, 64), (40, 40), (66, 30), (30, 62), (41, 39)]
    with TarShardWriter(src, prefix="shard", max_samples=3) as writer:
        for i, size in enumerate(sizes):
            writer.write(f"img{i}", {"png": _save(_photo(size), "PNG"), "txt": f"c{i}".encode()})
    write_index(src, writer.shards)
    pre = PreprocessConfig(mode="buckets", resolution=32, bucket_step=8)
    out = str(tmp_path / "out")
    encode_corpus(EncodeConfig(input=src, output=out, encoder=tiny_encoder, preprocess=pre))
    batches = list(LatentDataset(out, batch_size=2))
    assert sum(len(b["key"]) for b in batches) == len(sizes)
    for batch in batches:
        n, _, h, w = batch["latent"].shape
        assert batch["target_size"].tolist() == [[h * 2, w * 2]] * n
        assert batch["caption"] == [f"c{k[3:]}" for k in batch["key"]]
    rows = read_latents(out, bucket=(24, 40)).take_all()  # the wide bucket: 64x32 and 66x30
    assert sorted(r["key"] for r in rows) == ["img0", "img3"]
    assert all(np.asarray(r["latent"]).shape == (4, 12, 20) for r in rows)
