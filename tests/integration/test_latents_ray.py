"""read_latents on embedded Ray over hand-built corpora (local dirs: Ray tasks run elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.latents.format import CorpusError, join_url, stored_values
from pipeline.latents.raydata import read_latents
from tests.latent_corpus import Corpus, Sample, random_samples, tamper, write_corpus

SCALE, SHIFT = 0.5, 0.25


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory) -> tuple[str, Corpus, dict[str, Sample]]:
    """Two units, each with a 4x2x3 (bucket 4x6) and a 4x3x2 (bucket 6x4) latent shard."""
    directory = str(tmp_path_factory.mktemp("bucketed"))
    rng = np.random.default_rng(0)
    units = []
    for u in range(2):
        wide = [Sample(f"w{u}{i}", rng.normal(size=(4, 2, 3)).astype(np.float32)) for i in range(3)]
        tall = [Sample(f"t{u}{i}", rng.normal(size=(4, 3, 2)).astype(np.float32)) for i in range(2)]
        wide[0].caption = "a wide one"
        units.append(wide + tall)
    corpus = write_corpus(directory, units, scaling_factor=SCALE, shift_factor=SHIFT)
    return directory, corpus, {s.key: s for unit in units for s in unit}


def test_rows_are_scaled_samples_of_one_bucket(ray_local, bucketed):
    directory, _, samples = bucketed
    rows = read_latents(directory, bucket=(4, 6)).take_all()
    assert sorted(r["key"] for r in rows) == sorted(k for k in samples if k.startswith("w"))
    for row in rows:
        expected = (stored_values(samples[row["key"]].latent, "float16") - SHIFT) * SCALE
        assert row["latent"].dtype == np.float32
        np.testing.assert_allclose(row["latent"], expected, rtol=1e-6)
        assert row["target_size"].tolist() == [4, 6] and row["original_size"].dtype == np.int64
        assert row["crop_top_left"].tolist() == [0, 0]
    captions = {r["key"]: r["caption"] for r in rows}
    assert captions["w00"] == "a wide one" and captions["w01"] == ""
    batch = next(iter(read_latents(directory, bucket=(6, 4)).iter_batches(batch_size=4)))
    assert batch["latent"].shape == (4, 4, 3, 2)


def test_unknown_bucket_and_shard_are_refused_on_the_driver(ray_local, bucketed):
    directory, corpus, _ = bucketed
    with pytest.raises(CorpusError, match=r"no shard in bucket \[8, 8\]"):
        read_latents(directory, bucket=(8, 8))
    with pytest.raises(CorpusError, match="is not a committed shard"):
        read_latents(directory, shards=["latents-000099.tar"])
    first = corpus.shards[0].name
    assert read_latents(directory, shards=[first]).count() == corpus.shards[0].samples


def test_tampered_shard_fails_the_read(ray_local, tmp_path):
    directory = str(tmp_path)
    corpus = write_corpus(directory, [random_samples("a", 4), random_samples("b", 4, seed=1)])
    assert read_latents(directory).count() == 8
    tamper(join_url(directory, corpus.shards[1].name))
    with pytest.raises(Exception, match="sha256"):
        read_latents(directory).take_all()
