"""Data layer: sample keys, shard URLs, tar shard I/O, image preprocessing, shard building and
the training/eval readers.

The reader (which needs torch) is imported lazily so that shard I/O stays light in workers that
only read or write tars.
"""

import importlib

from pipeline.data.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    decode_image,
    denormalize,
    find_image_field,
    normalize,
    resize_center_crop,
)
from pipeline.data.keys import KeyAllocator, sanitize_key
from pipeline.data.shards import ShardsConfig, build_shards
from pipeline.data.tario import (
    ShardInfo,
    TarSample,
    TarShardWriter,
    TruncatedShardError,
    iter_tar_samples,
    write_index,
)
from pipeline.data.urls import expand_shard_urls

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "DataConfig",
    "KeyAllocator",
    "ShardImageDataset",
    "ShardInfo",
    "ShardsConfig",
    "TarSample",
    "TarShardWriter",
    "TruncatedShardError",
    "build_shards",
    "decode_image",
    "denormalize",
    "expand_shard_urls",
    "find_image_field",
    "iter_tar_samples",
    "iter_val_images",
    "make_loader",
    "normalize",
    "resize_center_crop",
    "sanitize_key",
    "write_index",
]

# The reader needs torch: resolved on first use (the package's own module, named as a string).
_LAZY_READER = {"DataConfig", "ShardImageDataset", "iter_val_images", "make_loader"}
_READER = "pipeline.data.reader"


def __getattr__(name: str):
    if name in _LAZY_READER:
        return getattr(importlib.import_module(_READER), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
