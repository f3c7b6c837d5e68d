"""Image decoding (modes, bombs, corrupt data) and preprocessing."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.data.images import (
    AXES_SWAPPING_ORIENTATIONS,
    BadImageError,
    apply_exif_orientation,
    decode_image,
    denormalize,
    exif_orientation,
    find_image_field,
    load_checked,
    normalize,
    open_checked,
    resize_center_crop,
)


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _pixel(data: bytes) -> tuple:
    img = decode_image(data)
    assert img.mode == "RGB"
    return img.getpixel((0, 0))


def test_rgb_jpeg_and_webp():
    img = Image.new("RGB", (20, 10), (200, 30, 40))
    for fmt in ("JPEG", "WEBP"):
        decoded = decode_image(_encode(img, fmt, quality=100))
        assert decoded.size == (20, 10)
        assert np.abs(np.array(decoded, dtype=int) - [200, 30, 40]).max() <= 6


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        (Image.new("L", (4, 4), 77), (77, 77, 77)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (255, 255, 255)),  # transparent -> white
        (Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("LA", (4, 4), (0, 128)), (127, 127, 127)),  # half black over white
    ],
)
def test_modes_to_rgb(img, expected):
    assert np.abs(np.subtract(_pixel(_encode(img)), expected)).max() <= 1


def test_palette_with_transparency_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    data = _encode(img, transparency=0)
    decoded = decode_image(data)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 1)) == (250, 0, 0)


def test_cmyk_jpeg():
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = _pixel(_encode(img, "JPEG", quality=100))
    assert r > 200 and g < 40 and b < 40


def test_sixteen_bit_png_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)
    decoded = np.array(decode_image(_encode(Image.fromarray(arr))))
    assert decoded[0, :, 0].tolist() == [0, 128, 255, 4]


def test_exif_orientation_applied():
    img = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    assert decode_image(_encode(img, "JPEG", exif=exif.tobytes())).size == (10, 30)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))


def test_decompression_bomb_rejected_before_decoding():
    with pytest.raises(BadImageError, match="too large"):
        decode_image(_png_header_only(100_000, 100_000))
    with pytest.raises(BadImageError, match="too large"):
        decode_image(_png_header_only(5000, 5000), max_pixels=1_000_000)
    small = _encode(Image.new("RGB", (100, 100)))
    with pytest.raises(BadImageError, match="too large"):
        decode_image(small, max_pixels=9_999)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_and_garbage_data(fmt):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _encode(noisy, fmt)
    with pytest.raises(BadImageError):
        decode_image(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="not a decodable image"):
        decode_image(b"this is not an image at all")
    with pytest.raises(BadImageError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize(
    ("size", "res"), [((40, 20), 16), ((20, 40), 16), ((8, 6), 12), ((16, 16), 16)]
)
def test_resize_center_crop_shape(size, res):
    out = resize_center_crop(Image.new("RGB", size, (1, 2, 3)), res)
    assert out.shape == (res, res, 3) and out.dtype == np.uint8


def test_resize_center_crop_keeps_centre():
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, 20:40] = 255  # white centre third, black sides
    out = resize_center_crop(Image.fromarray(arr), 10)
    assert out[:, 1:-1].min() >= 250  # the centre crop is white (bicubic blurs the edge columns)
    assert out.mean() > 240


def test_normalize_denormalize_round_trip():
    arr = np.arange(0, 256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    chw = normalize(arr)
    assert chw.dtype == np.float32 and chw.shape == (3, 16, 16)
    assert chw.min() == -1.0 and chw.max() == 1.0
    assert np.array_equal(denormalize(chw), arr)
    assert denormalize(np.full((3, 2, 2), 5.0)).max() == 255  # clipped
    with pytest.raises(ValueError):
        normalize(arr.astype(np.float32))


def test_find_image_field():
    assert find_image_field({"json": b"", "png": b""}) == "png"
    assert find_image_field({"png": b"", "jpg": b""}) == "jpg"
    assert find_image_field({"JPEG": b""}) == "JPEG"
    assert find_image_field({"seg.png": b"", "txt": b""}) is None


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_open_checked_reads_only_the_header():
    img = open_checked(_png_header_only(300, 200))  # no pixel data at all
    assert img.size == (300, 200)
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        load_checked(img)
    with pytest.raises(BadImageError, match="empty"):
        open_checked(b"")
    with pytest.raises(BadImageError, match="too large"):
        open_checked(_png_header_only(100_000, 100_000))


def test_open_checked_formats_restricts_the_parsers():
    data = _encode(Image.new("RGB", (4, 4)), "JPEG")
    assert open_checked(data, formats=("JPEG",)).format == "JPEG"
    with pytest.raises(BadImageError, match="not a decodable image"):
        open_checked(data, formats=("PNG",))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_exif_orientation_matches_pil(orientation):
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8))
    img = Image.open(io.BytesIO(_encode(stored, "PNG", exif=_exif(orientation))))
    assert exif_orientation(img) == orientation
    expected = ImageOps.exif_transpose(img)
    upright = apply_exif_orientation(img, orientation)
    assert np.array_equal(np.array(upright), np.array(expected))
    assert (upright.size != stored.size) == (orientation in AXES_SWAPPING_ORIENTATIONS)


def test_exif_orientation_without_decoding():
    jpeg = Image.open(io.BytesIO(_encode(Image.new("RGB", (8, 4)), "JPEG", exif=_exif(6))))
    assert exif_orientation(jpeg, allow_decode=False) == 6  # JPEG EXIF sits in the header
    plain = Image.open(io.BytesIO(_png_header_only(8, 4)))
    assert exif_orientation(plain, allow_decode=False) == 1  # would have to decode: does not
    assert plain.tile  # still not decoded
    bogus = Image.open(io.BytesIO(_encode(Image.new("RGB", (8, 4)), "JPEG", exif=_exif(42))))
    assert exif_orientation(bogus) == 1  # out-of-range tags are ignored


def test_bad_image_reasons_are_stable_across_runs():
    """rejects.jsonl must be byte-identical on every run: no object addresses in reasons."""
    with pytest.raises(BadImageError) as first:
        decode_image(b"definitely not an image")
    assert " at 0x" not in str(first.value) and "not a decodable image" in str(first.value)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_photo_formats_have_image_fields(fmt):
    ext = {"GIF": "gif", "BMP": "bmp", "TIFF": "tif"}[fmt]
    data = _encode(Image.new("RGB", (8, 8), (10, 200, 30)), fmt)
    assert find_image_field({"txt": b"x", ext: data}) == ext
    assert decode_image(data).size == (8, 8)
