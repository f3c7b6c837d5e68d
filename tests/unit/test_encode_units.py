"""The driver's unit logic without Ray: merging split samples, exactly-once decisions, commits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.encode.stages import pack_extras
from pipeline.encode.units import (
    LatentLayout,
    Row,
    StoragePlan,
    UnitCommitter,
    posterior_draw,
    resolve_unit,
)
from pipeline.latents.format import (
    commit_url,
    decode_latent,
    iter_tar_bytes,
    read_json,
    sha256_bytes,
)

SIZES = (6, 10, 0, 2, 4, 4)
LAYOUT = LatentLayout(channels=2, factor=2, dtype="float32")  # 4x4 px -> [2, 2, 2]


def _row(seq, key, *, image=True, extras=None, reject="", latent=None):
    latent = np.full((2, 2, 2), seq, np.float32) if latent is None else latent
    return Row(
        seq=seq,
        key=key,
        has_image=image,
        extras=pack_extras(extras or {}),
        reject=reject,
        sizes=SIZES,
        latent=latent.tobytes() if image and not reject else b"",
        std=b"",
    )


def test_split_sample_is_merged_once():
    """a.jpg, b.jpg, a.txt: key a is one sample with its caption, not a sample and a reject."""
    rows = [_row(0, "a"), _row(1, "b"), _row(2, "a", image=False, extras={"txt": b"cap"})]
    result = resolve_unit(rows, "s.tar", LAYOUT)
    assert [s.key for s in result.samples] == ["a", "b"]
    assert result.samples[0].files == {"txt": b"cap"} and result.merged == 1
    assert result.rejects == []


def test_caption_before_image_and_first_member_wins():
    rows = [
        _row(0, "a", image=False, extras={"txt": b"first", "json": b"{}"}),
        _row(1, "b"),
        _row(2, "a", extras={"txt": b"second"}),
    ]
    (a, _b) = resolve_unit(rows, "s.tar", LAYOUT).samples
    assert a.files == {"txt": b"first", "json": b"{}"}
    assert float(a.latent[0, 0, 0]) == 2.0  # the latent of the row that carried the image


def test_every_key_decided_exactly_once():
    rows = [
        _row(0, "ok"),
        _row(1, "textonly", image=False, extras={"txt": b"x"}),
        _row(2, "bad", reject="bad image: truncated"),
        _row(3, "dup"),
        _row(4, "dup"),
        _row(5, "", image=False, reject="truncated shard: ..."),
    ]
    result = resolve_unit(rows, "s.tar", LAYOUT)
    assert [s.key for s in result.samples] == ["ok", "dup"]
    reasons = [(r["key"], r["reason"].split(" ")[0]) for r in result.rejects]
    assert reasons == [
        ("textonly", "no"),
        ("bad", "bad"),
        ("dup", "duplicate"),
        (None, "truncated"),
    ]


def test_reject_reason_on_any_part_rejects_the_key():
    rows = [_row(0, "k"), _row(1, "k", image=False, reject="unsupported field name(s) ['a b']")]
    result = resolve_unit(rows, "s.tar", LAYOUT)
    assert result.samples == [] and [r["key"] for r in result.rejects] == ["k"]


def test_posterior_draw_depends_on_seed_and_key_only():
    mean, std = np.zeros((4, 3, 3), np.float32), np.ones((4, 3, 3), np.float32)
    a = posterior_draw(mean, std, "key1", 0)
    assert np.array_equal(a, posterior_draw(mean, std, "key1", 0))
    assert not np.array_equal(a, posterior_draw(mean, std, "key2", 0))
    assert not np.array_equal(a, posterior_draw(mean, std, "key1", 1))
    assert abs(float(a.std()) - 1.0) < 0.5


@pytest.mark.parametrize("buckets", [False, True])
def test_commit_writes_shards_then_record(buckets):
    out = f"memory://commit-test-{buckets}"
    plan = StoragePlan(
        field="latent.npy",
        dtype="bfloat16",
        sample=False,
        store_std=False,
        sample_seed=0,
        layout=LAYOUT,
    )
    committer = UnitCommitter(out, "lat", plan, channels=2, buckets=buckets)
    wide = Row(
        9,
        "wide",
        True,
        pack_extras({}),
        "",
        (4, 8, 0, 0, 4, 8),
        np.ones((2, 2, 4), np.float32).tobytes(),
        b"",
    )
    rows = [_row(0, "a", extras={"txt": b"cap"}), _row(1, "b"), wide]
    if not buckets:
        rows = rows[:2]
    record = committer.commit(7, "in.tar", rows, {"run": "r1"})
    assert read_json(commit_url(out, 7)) == json.loads(json.dumps(record))
    names = [s["name"] for s in record["shards"]]
    assert names == (
        ["lat-000007-h4w4.tar", "lat-000007-h4w8.tar"] if buckets else ["lat-000007.tar"]
    )
    import fsspec

    fs = fsspec.filesystem("memory")
    data = fs.cat_file(f"/commit-test-{buckets}/{names[0]}")
    assert sha256_bytes(data) == record["shards"][0]["sha256"]
    samples = dict(iter_tar_bytes(data, names[0]))
    assert samples["a"]["txt"] == b"cap"
    assert json.loads(samples["a"]["sizes.json"]) == {
        "original_size": [6, 10],
        "crop_top_left": [0, 2],
        "target_size": [4, 4],
    }
    assert decode_latent(samples["b"]["latent.npy"], "bfloat16")[0, 0, 0] == 1.0
    # A later unit re-using key "a" gets it rejected as a cross-shard duplicate.
    later = committer.commit(8, "in2.tar", [_row(0, "a"), _row(1, "c")], {})
    assert later["keys"] == ["c"] and later["rejects"][0]["key"] == "a"
