"""Image decoding and preprocessing shared by shard building, training and encoding.

Everything here uses numpy and PIL only so it can run in any worker. `decode_image` turns bytes
into an RGB PIL image (or raises `BadImageError` with the reason), `resize_center_crop` makes a
square uint8 HWC array, and `normalize` / `denormalize` map between uint8 HWC and float32 CHW in
[-1, 1] (x / 127.5 - 1), the convention the exported encoder's sidecar records.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

# In priority order: a sample with both a .jpg and a .gif thumbnail is the .jpg.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
DEFAULT_MAX_PIXELS = 64_000_000
_WHITE = (255, 255, 255, 255)
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Orientations whose display size is the stored size with width and height swapped.
AXES_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class BadImageError(ValueError):
    """The bytes are not a usable image; the message says why.

    Object addresses (PIL's "<_io.BytesIO object at 0x7f...>") are dropped from the message:
    reasons are recorded in rejects.jsonl, which must be identical on every run.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_ADDRESS.sub("", message))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` into an RGB image.

    Transparent images are composited on white, 16-bit and other exotic modes are scaled to 8 bit
    and the EXIF orientation is applied. Raises BadImageError for undecodable or truncated data
    and for images with more than `max_pixels` pixels (checked from the header, before decoding).
    """
    img = open_checked(data, max_pixels)
    load_checked(img)
    img = _apply_orientation(img)
    try:
        return to_rgb(img)
    except Exception as err:
        raise BadImageError(f"cannot convert mode {img.mode} to RGB: {err}") from err


def _apply_orientation(img: Image.Image) -> Image.Image:
    """Rotate per the EXIF orientation tag; a broken EXIF block must not reject the pixels."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def open_checked(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] | None = None
) -> Image.Image:
    """Open `data` reading only the header; reject empty data and more than `max_pixels` pixels.

    Nothing is decoded yet, so a decompression bomb costs only its header. `formats` limits which
    PIL plugins may even parse the bytes (None: all of them).
    """
    if not data:
        raise BadImageError("empty image data")
    return _open_checked(data, max_pixels, formats)


def load_checked(img: Image.Image) -> None:
    """Decode the pixels of an opened image; any PIL failure becomes BadImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about odd-but-decodable metadata
            img.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error...)
        raise BadImageError(f"corrupt or truncated image: {type(err).__name__}: {err}") from err


def exif_orientation(img: Image.Image, *, allow_decode: bool = True) -> int:
    """The EXIF orientation tag (1-8; 1 when absent or unreadable).

    PNG may store eXIf after the pixel data, and PIL's PNG `getexif` decodes the whole image to
    find it. With allow_decode=False a PNG without EXIF in its header answers 1 instead: ask
    again after loading.
    """
    if not allow_decode and img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        orientation = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not reject the pixels
        return 1
    return orientation if orientation in _ORIENTATION_TRANSPOSE or orientation == 1 else 1


def apply_exif_orientation(img: Image.Image, orientation: int) -> Image.Image:
    """Transpose a loaded image for display per `orientation`; returns `img` itself when 1.

    Unlike ImageOps.exif_transpose it neither copies unrotated images nor rewrites metadata.
    """
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


def _open_checked(
    data: bytes, max_pixels: int, formats: tuple[str, ...] | None = None
) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below decides; PIL still hard-fails above ~179 MP.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as err:
        raise BadImageError(f"image too large: {err}") from err
    except Exception as err:
        raise BadImageError(f"not a decodable image: {type(err).__name__}: {err}") from err
    width, height = img.size
    if width <= 0 or height <= 0:
        raise BadImageError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise BadImageError(f"image too large: {width}x{height} pixels exceeds max {max_pixels}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; alpha is composited on white, high bit depth is rescaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_high_depth_to_uint8(img), mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img.convert("RGBA"))
    return img.convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale 16/32-bit integer or float grayscale to uint8 (PIL's own convert just clips)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        # 16-bit data (PNG 16-bit grey decodes as I;16 or I): 65535 -> 255.
        return (np.clip(arr, 0, 65535) / 257.0).round().astype(np.uint8)
    if img.mode == "F" and arr.size and float(np.nanmax(arr)) <= 1.0:
        arr = arr * 255.0  # float images in [0, 1]
    return np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE)
    background.alpha_composite(rgba)
    return background.convert("RGB")


def resize_center_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """Resize the shorter side to `resolution` (bicubic) and centre-crop a square; uint8 HWC."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    img = to_rgb(img)
    width, height = img.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left = (size[0] - resolution) // 2
    top = (size[1] - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return np.array(img, dtype=np.uint8)


def normalize(arr: np.ndarray) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW in [-1, 1]."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {arr.dtype} {arr.shape}")
    chw = arr.transpose(2, 0, 1).astype(np.float32)
    return np.ascontiguousarray(chw / np.float32(127.5) - np.float32(1.0))


def denormalize(chw: np.ndarray) -> np.ndarray:
    """float CHW in [-1, 1] -> uint8 HWC (values outside the range are clipped)."""
    arr = np.asarray(chw, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"expected 3xHxW, got {arr.shape}")
    hwc = (arr.transpose(1, 2, 0) + 1.0) * 127.5
    return np.clip(np.rint(hwc), 0, 255).astype(np.uint8)


def find_image_field(files: dict[str, bytes]) -> str | None:
    """The extension under which a sample stores its image, or None (case-insensitive)."""
    by_lower = {ext.lower(): ext for ext in files}
    for ext in IMAGE_EXTENSIONS:
        if ext in by_lower:
            return by_lower[ext]
    return None
