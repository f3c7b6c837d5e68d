"""LatentDataset on hand-built corpora (real tars on memory:// and local dirs, no mocks)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.latents.dataset import LatentDataset
from pipeline.latents.format import CorpusError, join_url, stored_values, write_bytes_atomic
from tests.latent_corpus import Corpus, Sample, random_samples, tamper, write_corpus

SCALE, SHIFT = 0.5, 0.25


def memory_dir() -> str:
    return f"memory://latents-{uuid.uuid4().hex}"


def two_unit_corpus(directory: str, per_unit: int = 5, **options) -> Corpus:
    units = [random_samples(f"u{u}_", per_unit, seed=u) for u in range(2)]
    return write_corpus(directory, units, **options)


def keys_of(dataset) -> list[str]:
    return [sample["key"] for sample in dataset]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_latents_come_out_shifted_scaled_with_fields(dtype):
    directory = memory_dir()
    rng = np.random.default_rng(1)
    z = [rng.normal(size=(4, 3, 5)).astype(np.float32) for _ in range(3)]
    sizes = {"original_size": [30, 41], "crop_top_left": [2, 7], "target_size": [6, 10]}
    samples = [
        Sample("a", z[0], caption="a photo", meta={"caption": "ignored: txt wins"}, sizes=sizes),
        Sample("b", z[1], meta={"caption": "from json", "width": 3}),
        Sample("c", z[2], meta={"no": "caption"}),
    ]
    write_corpus(directory, [samples], dtype=dtype, scaling_factor=SCALE, shift_factor=SHIFT)
    out = {s["key"]: s for s in LatentDataset(directory)}
    for sample, latent in zip(samples, z, strict=True):
        got = out[sample.key]["latent"]
        expected = (stored_values(latent, dtype) - SHIFT) * SCALE
        assert got.dtype == torch.float32 and got.shape == (4, 3, 5)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert [out[k]["caption"] for k in "abc"] == ["a photo", "from json", ""]
    assert out["a"]["original_size"].tolist() == [30, 41]
    assert out["a"]["crop_top_left"].tolist() == [2, 7]
    assert out["b"]["target_size"].dtype == torch.int64
    assert "std" not in out["a"]


def test_std_is_scaled_with_the_latent():
    directory = memory_dir()
    std = np.full((4, 2, 2), 0.2, dtype=np.float32)
    write_corpus(directory, [[Sample("a", np.zeros((4, 2, 2), np.float32), std=std)]])
    (sample,) = LatentDataset(directory)
    np.testing.assert_allclose(sample["std"].numpy(), stored_values(std, "float16") * SCALE)


def test_vq_corpus_looks_up_the_codebook_or_yields_indices():
    directory = memory_dir()
    codebook = np.arange(12, dtype=np.float32).reshape(4, 3)  # 4 codes of dim 3
    indices = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    write_corpus(directory, [[Sample("a", indices)]], dtype="uint16", codebook=codebook)
    (sample,) = LatentDataset(directory)
    expected = (np.moveaxis(codebook[indices.astype(int)], -1, 0) - SHIFT) * SCALE
    np.testing.assert_allclose(sample["latent"].numpy(), expected)
    (raw,) = LatentDataset(directory, vq_output="indices")
    assert raw["indices"].dtype == torch.int64 and raw["indices"].tolist() == indices.tolist()
    assert "latent" not in raw


def test_shards_selects_committed_shards_only():
    directory = memory_dir()
    corpus = two_unit_corpus(directory)
    second = corpus.shards[1].name
    assert set(keys_of(LatentDataset(directory, shards=[second]))) == {
        f"u1_{i:03d}" for i in range(5)
    }
    # A shard-named file that no commit lists (a leftover of an interrupted run) is refused.
    write_bytes_atomic(join_url(directory, "latents-000007.tar"), b"stray")
    with pytest.raises(CorpusError, match="'latents-000007.tar' is not a committed shard of"):
        LatentDataset(directory, shards=["latents-000007.tar"])


@pytest.mark.parametrize("change", ["flip", "truncate"])
def test_tampered_shard_is_refused_before_any_of_its_samples(change):
    directory = memory_dir()
    corpus = two_unit_corpus(directory)
    url = join_url(directory, corpus.shards[1].name)
    if change == "flip":
        tamper(url)
    else:
        write_bytes_atomic(url, b"x" * 100)
    yielded = []
    with pytest.raises(CorpusError, match="sha256|bytes"):
        for sample in LatentDataset(directory):
            yielded.append(sample["key"])
    assert yielded == [f"u0_{i:03d}" for i in range(5)]  # the sound shard, none of the bad one


def test_missing_scaling_factor_is_refused():
    directory = memory_dir()
    two_unit_corpus(directory, scaling_factor=None)
    with pytest.raises(CorpusError, match="scaling_factor"):
        LatentDataset(directory)


def test_encoder_mismatch_is_refused():
    directory = memory_dir()
    two_unit_corpus(directory, encoder_sha256="a" * 64)
    assert len(keys_of(LatentDataset(directory, expected_encoder_sha256="a" * 64))) == 10
    with pytest.raises(CorpusError, match="encoder sha256 a+, expected b+"):
        LatentDataset(directory, expected_encoder_sha256="b" * 64)


def test_unfinished_corpus_is_refused_naming_committed_units():
    directory = memory_dir()
    two_unit_corpus(directory, finished=False)
    with pytest.raises(FileNotFoundError, match=r"2 unit\(s\) committed: u000000, u000001"):
        LatentDataset(directory)


@pytest.mark.parametrize(
    ("split", "world", "expect_shards"),
    [("shards", 2, True), ("samples", 2, False), ("auto", 2, True), ("auto", 3, False)],
)
def test_ranks_partition_the_corpus(split, world, expect_shards):
    directory = memory_dir()
    two_unit_corpus(directory)
    per_rank = [
        keys_of(LatentDataset(directory, split=split, rank=r, world_size=world))
        for r in range(world)
    ]
    counts = Counter(k for keys in per_rank for k in keys)
    assert set(counts.values()) == {1} and len(counts) == 10
    one_shard_each = all(len({k[:2] for k in keys}) == 1 for keys in per_rank)
    assert one_shard_each == expect_shards


def test_too_few_shards_for_split_shards():
    directory = memory_dir()
    two_unit_corpus(directory)
    with pytest.raises(ValueError, match='split="shards" needs at least one shard per reader'):
        LatentDataset(directory, split="shards", rank=0, world_size=3)


def test_rank_and_world_come_from_torch_distributed(monkeypatch):
    directory = memory_dir()
    two_unit_corpus(directory)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    dataset = LatentDataset(directory)
    assert (dataset.rank, dataset.world_size) == (1, 2)
    assert set(keys_of(dataset)) == {f"u1_{i:03d}" for i in range(5)}


@pytest.mark.parametrize("split", ["shards", "samples"])
def test_dataloader_workers_and_ranks_yield_every_sample_once(tmp_path, split):
    directory = str(tmp_path / "corpus")
    units = [random_samples(f"u{u}_", 3 + u, seed=u) for u in range(4)]  # uneven shards
    write_corpus(directory, units)
    seen: list[str] = []
    for rank in range(2):
        dataset = LatentDataset(directory, split=split, rank=rank, world_size=2, batch_size=2)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        for batch in loader:
            assert batch["latent"].shape[1:] == (4, 4, 4)
            seen += batch["key"]
    assert Counter(seen) == Counter(s.key for unit in units for s in unit)


def test_shuffle_is_deterministic_per_epoch():
    directory = memory_dir()
    write_corpus(directory, [random_samples(f"u{u}_", 6, seed=u) for u in range(4)])

    def order(epoch: int, seed: int = 0) -> list[str]:
        dataset = LatentDataset(directory, shuffle=True, seed=seed)
        dataset.set_epoch(epoch)
        return keys_of(dataset)

    plain = keys_of(LatentDataset(directory))
    assert order(0) == order(0)
    assert order(0) != order(1) and order(0) != plain and order(0) != order(0, seed=1)
    assert sorted(order(1)) == sorted(plain)


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_never_mix_latent_shapes(drop_last):
    directory = memory_dir()
    wide = [Sample(f"w{i}", np.zeros((4, 2, 3), np.float32), caption="w") for i in range(4)]
    tall = [Sample(f"t{i}", np.ones((4, 3, 2), np.float32), caption="t") for i in range(5)]
    corpus = write_corpus(directory, [wide[:2] + tall[:3], wide[2:] + tall[3:]])
    assert corpus.manifest.latent.shape is None and len(corpus.shards) == 4
    batches = list(LatentDataset(directory, batch_size=3, drop_last=drop_last))
    for batch in batches:
        assert len({k[0] for k in batch["key"]}) == 1  # one shape per batch
        assert batch["latent"].shape[0] == len(batch["key"]) == batch["target_size"].shape[0]
    sizes = sorted(len(b["key"]) for b in batches)
    assert sizes == ([3, 3] if drop_last else [1, 2, 3, 3])


def test_importing_the_package_loads_neither_torch_nor_ray():
    code = (
        "import sys, pipeline.latents, pipeline.latents.raydata, pipeline.verify;"
        "bad = [m for m in ('torch', 'ray') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
