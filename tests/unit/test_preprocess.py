"""Encode-job preprocessing: config resolution, buckets, and prepare_image on real PIL images."""

from __future__ import annotations

import dataclasses
import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import BadImageError
from pipeline.encode.preprocess import (
    Prepared,
    PreprocessConfig,
    _draft_jpeg,
    _plan,
    bucket_sizes,
    choose_bucket,
    prepare_image,
    resolve_preprocess,
)


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _cfg(**overrides) -> PreprocessConfig:
    """A resolved config for a dynamic-spatial encoder with native resolution 64, factor 8."""
    return resolve_preprocess(PreprocessConfig(**overrides), 64, 8, True)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _gradient(width: int, height: int) -> Image.Image:
    """Smooth content: resampling and JPEG scaling differences stay small on it."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    return Image.fromarray(arr.astype(np.uint8))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG built by hand (for what PIL cannot write: huge headers, 16-bit RGB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# --------------------------------------------------------------------------- resolve


def test_resolve_fills_defaults_and_returns_a_copy():
    cfg = PreprocessConfig()
    resolved = resolve_preprocess(cfg, 256, 8, False)
    assert (resolved.resolution, resolved.bucket_area) == (256, 256 * 256)
    assert (cfg.resolution, cfg.bucket_area) == (0, 0)  # the input is untouched
    again = resolve_preprocess(resolved, 256, 8, False)  # resolving twice is harmless
    assert again == resolved
    buckets = resolve_preprocess(PreprocessConfig(mode="buckets", resolution=128), 256, 8, True)
    assert (buckets.resolution, buckets.bucket_area) == (128, 128 * 128)
    explicit = resolve_preprocess(PreprocessConfig(mode="buckets", bucket_area=5000), 64, 8, True)
    assert explicit.bucket_area == 5000


@pytest.mark.parametrize(
    ("overrides", "dynamic", "match"),
    [
        ({"resolution": 100}, True, r"preprocess\.resolution=100 must be a multiple of .* 8"),
        ({"resolution": -8}, True, r"preprocess\.resolution must be >= 0"),
        ({"resolution": 128}, False, r"preprocess\.resolution=128 .*fixed input size; re-export"),
        ({"mode": "buckets"}, False, r"preprocess\.mode='buckets' .*fixed input size; re-export"),
        ({"mode": "buckets", "bucket_step": 60}, True, r"preprocess\.bucket_step=60 must be"),
        ({"mode": "buckets", "bucket_step": 0}, True, r"preprocess\.bucket_step=0 must be"),
        ({"mode": "buckets", "bucket_max_aspect": 0.5}, True, r"preprocess\.bucket_max_aspect"),
        (
            {"mode": "buckets", "bucket_max_aspect": float("nan")},
            True,
            r"preprocess\.bucket_max_aspect",
        ),
        ({"mode": "buckets", "bucket_area": 4000}, True, r"preprocess\.bucket_area=4000 .*small"),
        ({"bucket_area": -1}, True, r"preprocess\.bucket_area must be >= 0"),
        ({"max_pixels": 0}, True, r"preprocess\.max_pixels must be >= 1"),
    ],
)
def test_resolve_rejects_bad_values(overrides, dynamic, match):
    with pytest.raises(ValueError, match=match):
        resolve_preprocess(PreprocessConfig(**overrides), 64, 8, dynamic)


def test_resolve_ignores_bucket_fields_in_center_crop_mode():
    cfg = resolve_preprocess(PreprocessConfig(bucket_step=7, bucket_max_aspect=0.1), 64, 8, False)
    assert cfg.resolution == 64


def test_resolve_needs_a_native_resolution_when_resolution_is_zero():
    with pytest.raises(ValueError, match="set preprocess.resolution"):
        resolve_preprocess(PreprocessConfig(), 0, 8, True)


# --------------------------------------------------------------------------- buckets


def test_bucket_sizes_golden():
    # By hand, area 65536, step 64: short 64 -> long 1024 (aspect 16), 128 -> 512 (aspect 4),
    # 192 -> 65536 // (192 * 64) * 64 = 320 (aspect 1.67), 256 -> 256 (square).
    base = {"mode": "buckets", "bucket_area": 256 * 256, "bucket_step": 64}
    assert bucket_sizes(_cfg(**base, bucket_max_aspect=2.0)) == [(192, 320), (256, 256), (320, 192)]
    assert bucket_sizes(_cfg(**base, bucket_max_aspect=4.0)) == [
        (128, 512),
        (192, 320),
        (256, 256),
        (320, 192),
        (512, 128),
    ]
    assert bucket_sizes(_cfg(**base, bucket_max_aspect=1.0)) == [(256, 256)]


def test_bucket_sizes_include_the_sdxl_buckets():
    cfg = _cfg(mode="buckets", bucket_area=1024 * 1024, bucket_step=64)
    buckets = bucket_sizes(cfg)
    for bucket in [(1024, 1024), (896, 1152), (832, 1216), (768, 1344), (1344, 768)]:
        assert bucket in buckets
    assert (640, 1536) not in buckets  # aspect 2.4 > 2.0


@pytest.mark.parametrize(
    ("area", "step", "max_aspect"),
    [(1024 * 1024, 64, 2.0), (512 * 512, 32, 3.0), (300 * 300, 64, 2.0), (64 * 64, 64, 2.0)],
)
def test_bucket_sizes_follow_the_rule(area, step, max_aspect):
    cfg = _cfg(mode="buckets", bucket_area=area, bucket_step=step, bucket_max_aspect=max_aspect)
    buckets = bucket_sizes(cfg)
    assert buckets == sorted(set(buckets))
    square = int(area**0.5) // step * step
    assert (square, square) in buckets
    for h, w in buckets:
        assert h % step == 0 and w % step == 0
        assert h * w <= area
        assert max(h, w) / min(h, w) <= max_aspect
        assert (w, h) in buckets
        if (h, w) != (square, square):
            assert min(h, w) * (max(h, w) + step) > area  # the long side is as long as it can be


def test_bucket_sizes_needs_a_resolved_config_and_returns_a_fresh_list():
    with pytest.raises(ValueError, match="resolve_preprocess"):
        bucket_sizes(PreprocessConfig(mode="buckets"))
    cfg = _cfg(mode="buckets")
    bucket_sizes(cfg).clear()
    assert bucket_sizes(cfg) == [(64, 64)]


def test_choose_bucket_nearest_aspect_and_extremes():
    buckets = [(192, 320), (256, 256), (320, 192)]
    assert choose_bucket(500, 500, buckets) == (256, 256)
    assert choose_bucket(200, 300, buckets) == (192, 320)  # 1.5 is nearer 1.67 than 1
    assert choose_bucket(300, 200, buckets) == (320, 192)
    assert choose_bucket(10, 10_000, buckets) == (192, 320)
    assert choose_bucket(10_000, 10, buckets) == (320, 192)


def test_choose_bucket_breaks_ties_by_area_then_height():
    assert choose_bucket(50, 50, [(100, 200), (200, 100)]) == (100, 200)  # equal area
    assert choose_bucket(50, 50, [(200, 100), (100, 200)]) == (100, 200)  # order-independent
    assert choose_bucket(10, 20, [(64, 128), (128, 256)]) == (128, 256)  # same aspect
    with pytest.raises(ValueError):
        choose_bucket(10, 10, [])


# --------------------------------------------------------------------------- geometry


def test_center_crop_shapes_and_offsets():
    cfg = _cfg()  # square 64
    wide = prepare_image(_encode(_gradient(300, 200)), cfg)  # PIL sizes are (width, height)
    assert isinstance(wide, Prepared)
    assert wide.pixels.shape == (64, 64, 3) and wide.pixels.dtype == np.uint8
    assert wide.pixels.flags.c_contiguous
    assert wide.original_size == (200, 300)
    assert wide.crop_top_left == (0, 16)  # resized to 96 wide x 64 tall
    assert wide.target_size == (64, 64)
    tall = prepare_image(_encode(_gradient(200, 300)), cfg)
    assert (tall.original_size, tall.crop_top_left) == ((300, 200), (16, 0))


def test_pixels_match_resizing_the_whole_image_then_cropping():
    img = _noise(300, 200)
    reference = np.array(img.resize((96, 64), Image.Resampling.BICUBIC))[:, 16:80]
    out = prepare_image(_encode(img), _cfg()).pixels
    assert np.abs(out.astype(int) - reference).mean() < 1.0


def test_image_of_exactly_the_target_size_is_returned_unchanged():
    img = _noise(64, 64)
    for policy in ("upscale", "reject"):
        out = prepare_image(_encode(img), _cfg(small_images=policy))
        assert np.array_equal(out.pixels, np.array(img))
        assert out.crop_top_left == (0, 0)


@pytest.mark.parametrize(
    ("size", "max_aspect", "bucket"),
    [
        ((4000, 100), 2.0, (192, 320)),  # (width, height): very wide
        ((100, 4000), 2.0, (320, 192)),  # very tall
        ((4000, 100), 4.0, (128, 512)),
        ((100, 4000), 4.0, (512, 128)),
        ((600, 600), 2.0, (256, 256)),
    ],
)
def test_buckets_mode_output_shapes(size, max_aspect, bucket):
    cfg = _cfg(mode="buckets", bucket_area=256 * 256, bucket_max_aspect=max_aspect)
    out = prepare_image(_encode(_gradient(*size)), cfg)
    assert out.target_size == bucket
    assert out.pixels.shape == (*bucket, 3)
    assert out.original_size == (size[1], size[0])


def test_small_images_upscale_policy():
    out = prepare_image(_encode(_gradient(40, 30)), _cfg())
    assert out.pixels.shape == (64, 64, 3)
    assert out.crop_top_left == (0, 10)  # 40x30 scaled by 64/30 -> 85 wide x 64 tall
    bucketed = prepare_image(_encode(_gradient(40, 30)), _cfg(mode="buckets", bucket_area=128**2))
    assert bucketed.pixels.shape == (*bucketed.target_size, 3)


def test_small_images_reject_policy_decides_before_decoding():
    cfg = _cfg(small_images="reject")
    message = r"^image 40x30 is smaller than the 64x64 target \(preprocess.small_images=reject\)$"
    with pytest.raises(BadImageError, match=message):
        prepare_image(_encode(_gradient(40, 30)), cfg)
    # Header of a 40x30 image with no pixel data: the size alone rejects it, nothing is decoded.
    header_only = _png(40, 30, 8, 2, b"")
    with pytest.raises(BadImageError, match="smaller than"):
        prepare_image(header_only, cfg)
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        prepare_image(header_only, _cfg())  # upscale has to decode, and then fails
    # One side short of its target is enough to need upscaling.
    with pytest.raises(BadImageError, match="smaller than"):
        prepare_image(_encode(_gradient(500, 63)), cfg)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_rejected(fmt):
    data = _encode(_noise(128, 128), fmt)
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        prepare_image(data[: len(data) // 2], _cfg())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty image data"),
        (np.random.default_rng(1).bytes(5000), "not a decodable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a decodable image"),
        (_encode(Image.new("RGB", (64, 64)), "PPM"), "not a decodable image"),  # not allowed
    ],
)
def test_garbage_empty_and_unsupported_bytes(data, match):
    with pytest.raises(BadImageError, match=match):
        prepare_image(data, _cfg())


def test_decompression_bomb_rejected_fast_without_allocating():
    bomb = _png(100_000, 100_000, 8, 2, b"")
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(BadImageError, match="too large"):
        prepare_image(bomb, _cfg())
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 5_000_000  # the 30 GB of pixels were never allocated
    with pytest.raises(BadImageError, match="too large"):
        prepare_image(_png(5000, 5000, 8, 2, b""), _cfg(max_pixels=1_000_000))


# --------------------------------------------------------------------------- modes


def _at_target(img: Image.Image, fmt: str = "PNG", **kwargs) -> np.ndarray:
    """Pixels of a 64x64 image prepared at 64: no resampling, so values compare exactly."""
    return prepare_image(_encode(img, fmt, **kwargs), _cfg()).pixels


def test_cmyk_jpeg_matches_pils_conversion():
    rng = np.random.default_rng(2)
    cmyk = Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), mode="CMYK")
    data = _encode(cmyk, "JPEG", quality=95)
    expected = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    out = prepare_image(data, _cfg()).pixels
    assert np.array_equal(out, expected)


def test_palette_images():
    img = Image.new("P", (64, 64), 0)
    img.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    opaque = _at_target(img)
    assert tuple(opaque[0, 0]) == (10, 20, 30) and tuple(opaque[1, 1]) == (250, 0, 0)
    transparent = _at_target(img, transparency=0)
    assert tuple(transparent[0, 0]) == (255, 255, 255) and tuple(transparent[1, 1]) == (250, 0, 0)


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        (Image.new("L", (64, 64), 77), (77, 77, 77)),
        (Image.new("LA", (64, 64), (0, 128)), (127, 127, 127)),  # half black over white
        (Image.new("RGBA", (64, 64), (10, 20, 30, 0)), (255, 255, 255)),  # transparent -> white
        (Image.new("RGBA", (64, 64), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("1", (64, 64), 1), (255, 255, 255)),
    ],
)
def test_grey_and_alpha_modes(img, expected):
    out = _at_target(img)
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_sixteen_bit_grey_png_is_scaled():
    arr = np.zeros((64, 64), dtype=np.uint16)
    arr[0, :4] = [0, 32896, 65535, 1000]
    out = _at_target(Image.fromarray(arr))
    assert out[0, :4, 0].tolist() == [0, 128, 255, 4]
    assert np.array_equal(out[..., 0], out[..., 2])


def test_sixteen_bit_rgb_png():
    # PIL has no 48-bit RGB mode to save from, so the PNG is written by hand.
    pixel = struct.pack(">HHH", 65535, 0, 32896)
    rows = b"".join(b"\x00" + pixel * 64 for _ in range(64))  # filter byte 0 per row
    out = prepare_image(_png(64, 64, 16, 2, rows), _cfg()).pixels
    assert out.shape == (64, 64, 3)
    assert np.all(out == [255, 0, 128])


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "BMP", "TIFF"])
def test_other_allowed_formats(fmt):
    out = prepare_image(_encode(Image.new("RGB", (80, 64), (200, 100, 0)), fmt), _cfg())
    assert out.pixels.shape == (64, 64, 3)
    assert np.abs(out.pixels.astype(int) - [200, 100, 0]).max() <= 8


# --------------------------------------------------------------------------- orientation


def _quadrant_image(width: int, height: int) -> Image.Image:
    """Grey with a red top-left quadrant (in stored pixels)."""
    arr = np.full((height, width, 3), 128, dtype=np.uint8)
    arr[: height // 2, : width // 2] = (255, 0, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("draft", [True, False])
def test_exif_rotated_jpeg(draft):
    # Stored 96 wide x 64 tall; orientation 6 displays it rotated 90 degrees clockwise.
    data = _encode(_quadrant_image(96, 64), "JPEG", quality=95, exif=_exif(6))
    out = prepare_image(data, _cfg(jpeg_draft=draft))
    assert out.original_size == (96, 64)  # upright: 96 tall, 64 wide
    assert out.crop_top_left == (16, 0)
    # The stored top-left quadrant is now top-right; the crop keeps rows 16..80 of 96.
    assert out.pixels[4, 60, 0] > 200 and out.pixels[4, 60, 1] < 60
    assert abs(int(out.pixels[4, 4, 0]) - 128) < 20


def test_exif_rotation_chooses_the_upright_bucket():
    data = _encode(_gradient(1200, 300), "JPEG", exif=_exif(6))  # stored wide, displayed tall
    out = prepare_image(data, _cfg(mode="buckets", bucket_area=256 * 256, bucket_max_aspect=4.0))
    assert out.original_size == (1200, 300)
    assert out.target_size == (512, 128)


def test_png_exif_after_the_pixels_is_still_applied():
    # PNG allows eXIf after IDAT; PIL only sees it when decoding, after the plan was made.
    png = _encode(_quadrant_image(96, 64))
    iend = png.rindex(b"IEND") - 4
    data = png[:iend] + _png_chunk(b"eXIf", _exif(6)[6:]) + png[iend:]  # drop the "Exif\0\0"
    out = prepare_image(data, _cfg())
    assert out.original_size == (96, 64)
    assert out.crop_top_left == (16, 0)
    assert tuple(out.pixels[4, 60]) == (255, 0, 0)


# --------------------------------------------------------------------------- JPEG draft


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    skimage_data = pytest.importorskip("skimage.data")
    photo = Image.fromarray(skimage_data.astronaut()).resize((1024, 768), Image.Resampling.BICUBIC)
    return _encode(photo, "JPEG", quality=90)


@pytest.mark.parametrize("mode", ["center_crop", "buckets"])
def test_jpeg_draft_on_and_off_agree(photo_jpeg, mode):
    cfg = _cfg(mode=mode, resolution=128, bucket_area=128 * 128)
    drafted = prepare_image(photo_jpeg, cfg)
    full = prepare_image(photo_jpeg, dataclasses.replace(cfg, jpeg_draft=False))
    assert drafted.target_size == full.target_size
    assert drafted.original_size == full.original_size == (768, 1024)
    assert drafted.crop_top_left == full.crop_top_left
    assert np.abs(drafted.pixels.astype(int) - full.pixels).mean() < 2.0


@pytest.mark.parametrize("orientation", [1, 6, 8])
@pytest.mark.parametrize(
    ("stored_size", "overrides"),
    [
        ((1024, 768), {"resolution": 128}),
        ((1024, 768), {"resolution": 96}),  # needs 128 wide: 1/8 would give exactly 128
        ((1000, 999), {"resolution": 120}),
        ((3000, 500), {"mode": "buckets", "bucket_area": 128 * 128, "bucket_max_aspect": 4.0}),
        ((500, 3000), {"mode": "buckets", "bucket_area": 64 * 64, "bucket_step": 16}),
    ],
)
def test_jpeg_draft_never_decodes_below_the_target(stored_size, overrides, orientation):
    data = _encode(_gradient(*stored_size), "JPEG", exif=_exif(orientation))
    cfg = _cfg(**overrides)
    img = Image.open(io.BytesIO(data))
    swaps = orientation in (5, 6, 7, 8)
    width, height = stored_size
    upright = (width, height) if swaps else (height, width)
    plan = _plan(*upright, cfg)
    _draft_jpeg(img, plan.resized, orientation)
    assert img.size[0] < stored_size[0]  # the draft did reduce
    decoded_upright = img.size[::-1] if not swaps else img.size
    assert decoded_upright[0] >= plan.resized[0] and decoded_upright[1] >= plan.resized[1]
    out = prepare_image(data, cfg)
    assert out.pixels.shape == (*plan.target, 3)
