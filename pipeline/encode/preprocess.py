"""Image bytes -> uint8 pixels for the encoder: centre crops or aspect-ratio buckets.

Pure numpy + PIL so it runs in the CPU decode tasks of the encode job, one `prepare_image` call
per image. The order of work is chosen so bad inputs cost as little as possible: the header alone
decides bombs, the target size and the small-image policy; JPEGs are then decoded at the smallest
libjpeg scale (1/2, 1/4, 1/8) that still covers the target, and only the crop window is resampled.

Crop offsets follow the SDXL convention: `crop_top_left` is the (top, left) of the crop in the
image resized to cover the target, which together with `original_size` and `target_size` is what
SDXL-style size/crop conditioning needs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

# Importing a plugin registers it; Image.open(formats=...) only finds registered ones.
from PIL import (  # noqa: F401
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from pipeline.data.images import (
    AXES_SWAPPING_ORIENTATIONS,
    BadImageError,
    apply_exif_orientation,
    exif_orientation,
    load_checked,
    open_checked,
    to_rgb,
)


class PreprocessMode(StrEnum):
    center_crop = "center_crop"  # one square side (resolution) for every image
    buckets = "buckets"  # aspect-ratio buckets of ~equal pixel area


class SmallImages(StrEnum):
    upscale = "upscale"
    reject = "reject"


# PIL plugins allowed to parse untrusted bytes: the photo formats of real corpora (JPEG includes
# MPO). Everything else (EPS would start Ghostscript, plus many rarely fuzzed parsers) is rejected
# before it is parsed. Filtered so a PIL built without e.g. libwebp still opens the rest.
ENCODE_FORMATS = tuple(
    fmt for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF") if fmt in Image.OPEN
)
_JPEG_FORMATS = ("JPEG", "MPO")
# Above a 3x downscale PIL first box-reduces by an integer factor: ~2x faster, visually identical.
_REDUCING_GAP = 3.0


@dataclass
class PreprocessConfig:
    mode: PreprocessMode = PreprocessMode.center_crop
    resolution: int = 0  # center_crop: output side; 0 = the encoder's native resolution
    bucket_area: int = 0  # buckets: target pixel area; 0 = resolution**2 (resolved)
    bucket_step: int = 64  # bucket sides are multiples of this
    bucket_max_aspect: float = 2.0  # max long/short side ratio of a bucket
    small_images: SmallImages = SmallImages.upscale  # images that would need upscaling
    max_pixels: int = 64_000_000  # decompression-bomb guard, checked from the header
    jpeg_draft: bool = True  # decode big JPEGs at 1/2, 1/4, 1/8 scale (never below the target)

    def __post_init__(self) -> None:
        # Choices are Enums: a bad value fails at config load (OmegaConf names the key) or here.
        self.mode = PreprocessMode(self.mode)
        self.small_images = SmallImages(self.small_images)


@dataclass(frozen=True)
class Prepared:
    pixels: np.ndarray  # uint8 [target_h, target_w, 3], C-contiguous
    original_size: tuple[int, int]  # (height, width) after EXIF orientation
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the *resized* image (SDXL)
    target_size: tuple[int, int]  # (height, width) == pixels.shape[:2]


@dataclass(frozen=True)
class _Plan:
    """Geometry for one image, all (height, width) in the upright (EXIF-applied) frame."""

    target: tuple[int, int]
    resized: tuple[int, int]  # the whole image scaled to just cover the target
    crop_top_left: tuple[int, int]
    upscales: bool


# --------------------------------------------------------------------------- configuration


def resolve_preprocess(
    cfg: PreprocessConfig, native_resolution: int, downsample_factor: int, dynamic_spatial: bool
) -> PreprocessConfig:
    """A validated copy of `cfg` with `resolution` and `bucket_area` filled in.

    Bucket fields are only validated in buckets mode (center_crop ignores them). Raises
    ValueError naming the offending `preprocess.<field>`.
    """
    if downsample_factor < 1:
        raise ValueError(f"encoder downsample_factor must be >= 1, got {downsample_factor}")
    if cfg.max_pixels < 1:
        raise ValueError(f"preprocess.max_pixels must be >= 1, got {cfg.max_pixels}")
    resolution = _resolve_resolution(cfg, native_resolution, downsample_factor, dynamic_spatial)
    if cfg.bucket_area < 0:
        raise ValueError(
            f"preprocess.bucket_area must be >= 0 (0 = resolution**2), got {cfg.bucket_area}"
        )
    resolved = dataclasses.replace(
        cfg, resolution=resolution, bucket_area=cfg.bucket_area or resolution**2
    )
    if cfg.mode == "buckets":
        _check_buckets(resolved, downsample_factor, dynamic_spatial)
    return resolved


def _resolve_resolution(
    cfg: PreprocessConfig, native: int, downsample_factor: int, dynamic_spatial: bool
) -> int:
    if cfg.resolution < 0:
        raise ValueError(f"preprocess.resolution must be >= 0 (0 = native), got {cfg.resolution}")
    resolution = cfg.resolution or native
    if resolution < 1:
        raise ValueError(
            f"preprocess.resolution is 0 (= native) but the encoder reports no native "
            f"resolution ({native}); set preprocess.resolution"
        )
    if resolution % downsample_factor:
        raise ValueError(
            f"preprocess.resolution={resolution} must be a multiple of the encoder's "
            f"downsample factor {downsample_factor}"
        )
    if resolution != native and not dynamic_spatial:
        raise ValueError(
            f"preprocess.resolution={resolution} differs from the encoder's input size {native}: "
            f"the encoder was exported with a fixed input size; re-export it with dynamic "
            f"spatial axes to encode at another resolution"
        )
    return resolution


def _check_buckets(cfg: PreprocessConfig, downsample_factor: int, dynamic_spatial: bool) -> None:
    if not dynamic_spatial:
        raise ValueError(
            "preprocess.mode='buckets' needs variable input sizes, but the encoder was exported "
            "with a fixed input size; re-export it with dynamic spatial axes or use center_crop"
        )
    step = cfg.bucket_step
    if step < 1 or step % downsample_factor:
        raise ValueError(
            f"preprocess.bucket_step={step} must be a positive multiple of the encoder's "
            f"downsample factor {downsample_factor}"
        )
    if not cfg.bucket_max_aspect >= 1.0:  # also rejects NaN
        raise ValueError(f"preprocess.bucket_max_aspect must be >= 1, got {cfg.bucket_max_aspect}")
    if cfg.bucket_area < step * step:
        raise ValueError(
            f"preprocess.bucket_area={cfg.bucket_area} is too small for even one "
            f"{step}x{step} bucket (preprocess.bucket_step={step})"
        )


# --------------------------------------------------------------------------- buckets


def bucket_sizes(cfg: PreprocessConfig) -> list[tuple[int, int]]:
    """All (height, width) buckets of a resolved config, sorted ascending.

    The rule (kohya / SDXL style): for every short side s = step, 2*step, ... up to the largest
    multiple of step <= sqrt(area), the long side is the largest multiple of step with
    s * long <= area, i.e. long = area // (s * step) * step. The pair is kept, in both
    orientations, when long / s <= bucket_max_aspect. The square bucket (that largest s, twice)
    is always included. Example: area 256*256, step 64, max aspect 2 gives
    [(192, 320), (256, 256), (320, 192)]; (128, 512) has aspect 4 and is left out.
    """
    if cfg.bucket_area < 1:
        raise ValueError("bucket_sizes needs a resolved config: call resolve_preprocess first")
    return list(_bucket_table(cfg.bucket_area, cfg.bucket_step, float(cfg.bucket_max_aspect)))


@functools.lru_cache(maxsize=64)
def _bucket_table(area: int, step: int, max_aspect: float) -> tuple[tuple[int, int], ...]:
    largest_short = math.isqrt(area) // step * step
    if largest_short < step:
        raise ValueError(f"bucket area {area} is too small for a {step}x{step} bucket")
    buckets = {(largest_short, largest_short)}
    for short in range(step, largest_short + 1, step):
        long = area // (short * step) * step  # >= short because short**2 <= area
        if long / short <= max_aspect:
            buckets.update({(short, long), (long, short)})
    return tuple(sorted(buckets))


def choose_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's, measured as |log(h/w) - log(bh/bw)|.

    Ties (an aspect exactly between two buckets) go to the larger area, then the smaller height.
    """
    if not buckets:
        raise ValueError("choose_bucket needs at least one bucket")
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    # log(h) - log(w) rather than log(h / w): mirrored buckets then give exactly mirrored values,
    # so ties are exact and the tie-break, not float noise, decides.
    image_aspect = math.log(height) - math.log(width)

    def rank(bucket: tuple[int, int]) -> tuple[float, int, int]:
        bh, bw = bucket
        distance = abs(image_aspect - (math.log(bh) - math.log(bw)))
        return round(distance, 12), -bh * bw, bh

    return min(buckets, key=rank)


# --------------------------------------------------------------------------- per image


def prepare_image(data: bytes, cfg: PreprocessConfig) -> Prepared:
    """Decode `data` and resize + centre-crop it to the target size of a resolved `cfg`.

    Raises BadImageError (a ValueError) with a readable reason for any bad input: empty,
    garbage, truncated, unsupported format, over max_pixels, or too small under
    small_images=reject. Config mistakes raise a plain ValueError instead.
    """
    _require_resolved(cfg)
    img = open_checked(data, cfg.max_pixels, formats=ENCODE_FORMATS)
    orientation = exif_orientation(img, allow_decode=False)
    height, width = _upright_size(img.size, orientation)
    plan = _plan(height, width, cfg)
    if cfg.jpeg_draft and not plan.upscales and img.format in _JPEG_FORMATS:
        _draft_jpeg(img, plan.resized, orientation)
    load_checked(img)
    late_orientation = exif_orientation(img)
    if _swaps(late_orientation) != _swaps(orientation):
        # EXIF found only while decoding (PNG eXIf after the pixels): redo the geometry.
        height, width = width, height
        plan = _plan(height, width, cfg)
    img = apply_exif_orientation(img, late_orientation)
    try:
        img = to_rgb(img)
    except Exception as err:
        raise BadImageError(f"cannot convert mode {img.mode} to RGB: {err}") from err
    pixels = _resize_crop(img, plan)
    return Prepared(pixels, (height, width), plan.crop_top_left, plan.target)


def _require_resolved(cfg: PreprocessConfig) -> None:
    if cfg.resolution < 1 or cfg.bucket_area < 1:
        raise ValueError("prepare_image needs a resolved config: call resolve_preprocess first")


def _swaps(orientation: int) -> bool:
    return orientation in AXES_SWAPPING_ORIENTATIONS


def _upright_size(stored_wh: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(height, width) as displayed, from PIL's stored (width, height)."""
    width, height = stored_wh
    return (width, height) if _swaps(orientation) else (height, width)


def _plan(height: int, width: int, cfg: PreprocessConfig) -> _Plan:
    """Target, cover-resize size and centred crop for an upright height x width image.

    Applies the small-image policy here, from header sizes, so rejects cost no decoding.
    """
    target = _target_size(height, width, cfg)
    th, tw = target
    scale = max(th / height, tw / width)
    if scale > 1 and cfg.small_images == "reject":
        raise BadImageError(
            f"image {width}x{height} is smaller than the {tw}x{th} target "
            f"(preprocess.small_images=reject)"
        )
    # max(): float rounding must never make the covering side one pixel short of the target.
    resized = (max(th, round(height * scale)), max(tw, round(width * scale)))
    crop_top_left = ((resized[0] - th) // 2, (resized[1] - tw) // 2)
    return _Plan(target, resized, crop_top_left, scale > 1)


def _target_size(height: int, width: int, cfg: PreprocessConfig) -> tuple[int, int]:
    if cfg.mode == "center_crop":
        return cfg.resolution, cfg.resolution
    buckets = _bucket_table(cfg.bucket_area, cfg.bucket_step, float(cfg.bucket_max_aspect))
    return choose_bucket(height, width, buckets)


def _draft_jpeg(img: Image.Image, resized_hw: tuple[int, int], orientation: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= the cover-resize size.

    PIL's draft picks the largest power-of-two reduction s with stored_size // s >= requested on
    both axes, so the decoded image still covers the target and is only ever downscaled.
    The request is in the stored frame, so orientations that swap axes swap it back.
    """
    rh, rw = resized_hw
    requested_wh = (rh, rw) if _swaps(orientation) else (rw, rh)
    try:
        img.draft(None, requested_wh)
    except Exception as err:  # a malformed JPEG can fail while setting up the decoder
        raise BadImageError(f"corrupt JPEG: {type(err).__name__}: {err}") from err


def _resize_crop(img: Image.Image, plan: _Plan) -> np.ndarray:
    """Resample only the crop window of `img` (bicubic) to the target; uint8 HWC.

    Same pixels as resizing the whole image to plan.resized and cropping (PIL still reads the
    filter support outside the window), without resampling or allocating the cut-off part.
    """
    th, tw = plan.target
    rh, rw = plan.resized
    top, left = plan.crop_top_left
    width, height = img.size  # the decoded size: smaller than the original after a JPEG draft
    sx, sy = width / rw, height / rh
    # min(): float rounding must not push the window past the edge (PIL rejects that).
    box = (left * sx, top * sy, min(width, (left + tw) * sx), min(height, (top + th) * sy))
    if box != (0, 0, width, height) or (tw, th) != img.size:
        img = img.resize((tw, th), Image.Resampling.BICUBIC, box=box, reducing_gap=_REDUCING_GAP)
    return np.array(img, dtype=np.uint8)
