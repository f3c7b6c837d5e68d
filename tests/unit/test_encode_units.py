"""A unit's logic without Ray: reading and resolving an input tar (pipeline.encode.resolve),
turning encoder outputs into stored fields (pipeline.encode.store) and writing the unit's
shards and commit record (pipeline.encode.writer). Real tars on memory:// and tmp_path."""

from __future__ import annotations

import io
import json
import uuid
import warnings

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.encode.resolve import read_rows, resolve_rows
from pipeline.encode.store import NotStorable, StoragePlan, posterior_draw, store_sample
from pipeline.encode.writer import (
    FinishedSample,
    ShardLayout,
    group_by_shape,
    unit_statistics,
    write_record,
    write_shards,
)
from pipeline.latents.format import (
    commit_url,
    decode_latent,
    iter_tar_bytes,
    join_url,
    read_json,
    sha256_bytes,
)
from tests.latent_corpus import write_tar
from tests.tarfiles import truncate_inside, write_raw_tar

SIZES = (6, 10, 0, 2, 4, 4)  # original 6x10, crop at (0, 2), target 4x4


def _png(color=(200, 10, 10), size=(10, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _memory_url(name: str = "s-000000.tar") -> str:
    return f"memory://units-{uuid.uuid4().hex[:8]}/{name}"


def _plan(url: str):
    return resolve_rows(read_rows(url), url)


def _reasons(plan) -> list[tuple[str | None, str]]:
    return [(r["key"], r["reason"]) for _, r in sorted(plan.rejects, key=lambda item: item[0])]


# ----------------------------------------------------------------------------- resolve


def test_split_sample_is_merged_once():
    """a.png, b.png, a.txt: key a is one sample with its caption, not a sample and a reject."""
    url = write_tar(
        _memory_url(), [("a", {"png": _png()}), ("b", {"png": _png()}), ("a", {"txt": b"cap"})]
    )
    rows = read_rows(url)
    assert [(r.seq, r.key) for r in rows] == [(0, "a"), (1, "b"), (2, "a")]
    plan = resolve_rows(rows, url)
    assert [c.key for c in plan.candidates] == ["a", "b"]
    assert plan.candidates[0].files == {"txt": b"cap"} and plan.merged == 1
    assert plan.candidates[0].image == _png() and plan.rows == 3
    assert plan.rejects == []


def test_caption_before_image_and_first_member_wins():
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    url = write_tar(
        _memory_url(),
        [
            ("a", {"txt": b"first", "json": b"{}"}),
            ("b", {"png": blue}),
            ("a", {"png": red, "txt": b"second"}),
        ],
    )
    a, b = _plan(url).candidates
    assert a.key == "a" and a.files == {"txt": b"first", "json": b"{}"}
    assert a.image == red  # the image of the row that carried one
    assert a.seq == 0  # sorts where the key began
    assert b.key == "b" and b.image == blue and b.files == {}


def test_every_key_decided_exactly_once(tmp_path):
    """Every key of the tar ends up a candidate or a reject with its reason, none both (a second
    image under a key is its own reject), and a truncated tail is a reject of its own."""
    members = [
        ("ok.png", _png()),
        ("textonly.txt", b"x"),
        ("dup.png", _png()),
        ("other.png", _png()),
        ("dup.png", _png((0, 255, 0))),
        ("../escape.png", _png()),
        ("img.001.png", _png()),
        ("odd.png", _png()),
        ("odd.a b", b"weird field"),
        ("v1.2/dotted.png", _png()),
        ("cut.png", _png()),
    ]
    url = str(tmp_path / "s-000000.tar")
    write_raw_tar(url, members)
    truncate_inside(url, "cut.png")
    plan = _plan(url)
    assert plan.rows == 10  # nine complete groups, then the one being read when the tar ended
    assert [c.key for c in plan.candidates] == ["ok", "dup", "other", "v1.2/dotted"]
    reasons = _reasons(plan)
    assert [key for key, _ in reasons] == ["textonly", "dup", "../escape", "img.001", "odd", "cut"]
    why = dict(reasons)
    assert why["textonly"] == "no image field (fields: ['txt'])"
    assert why["dup"] == "duplicate key within the shard"
    assert why["../escape"].startswith("unsafe key")
    assert "dot" in why["img.001"]
    assert why["odd"] == "unsupported field name(s) ['a b']"
    assert why["cut"].startswith("truncated shard")
    assert {r["shard"] for _, r in plan.rejects} == {url}
    decided = [c.key for c in plan.candidates] + [key for key, _ in reasons if key != "dup"]
    assert sorted(decided) == sorted(set(decided))


def test_truncated_before_any_key_is_an_unknown_reject(tmp_path):
    url = str(tmp_path / "s.tar")
    write_raw_tar(url, [("first.png", _png())])
    truncate_inside(url, "first.png", keep=3)
    plan = _plan(url)
    assert plan.candidates == [] and len(plan.rejects) == 1
    key, reason = _reasons(plan)[0]
    assert key in (None, "first") and reason.startswith("truncated shard")


def test_missing_input_raises():
    with pytest.raises(FileNotFoundError):
        read_rows(_memory_url("absent.tar"))


def test_reject_reason_on_any_part_rejects_the_key():
    url = write_tar(
        _memory_url(), [("k", {"png": _png()}), ("x", {"png": _png()}), ("k", {"a b": b"?"})]
    )
    plan = _plan(url)
    assert [c.key for c in plan.candidates] == ["x"]
    assert _reasons(plan) == [("k", "unsupported field name(s) ['a b']")]


def test_empty_tar_has_no_rows():
    url = write_tar(_memory_url(), [])
    plan = _plan(url)
    assert plan.rows == 0 and plan.candidates == [] and plan.rejects == []


# ----------------------------------------------------------------------------- store


def _storage(dtype="float16", *, sample=False, store_std=False, seed=0) -> StoragePlan:
    return StoragePlan(
        field="latent.npy", dtype=dtype, sample=sample, store_std=store_std, sample_seed=seed
    )


def test_posterior_draw_depends_on_seed_and_key_only():
    mean, std = np.zeros((4, 3, 3), np.float32), np.ones((4, 3, 3), np.float32)
    a = posterior_draw(mean, std, "key1", 0)
    assert a.dtype == np.float32 and a.shape == mean.shape
    assert np.array_equal(a, posterior_draw(mean, std, "key1", 0))
    assert not np.array_equal(a, posterior_draw(mean, std, "key2", 0))
    assert not np.array_equal(a, posterior_draw(mean, std, "key1", 1))
    assert abs(float(a.std()) - 1.0) < 0.5
    # mean + std * eps: the same eps whatever mean and std are
    shifted = posterior_draw(mean + 2, std * 3, "key1", 0)
    np.testing.assert_allclose(shifted, 2 + 3 * a, rtol=1e-6)


def test_store_sample_fields():
    latent = np.arange(8, dtype=np.float32).reshape(2, 2, 2) / 8
    std = np.full((2, 2, 2), 0.5, np.float32)
    files = {"txt": b"cap", "json": b"{}"}
    stored = store_sample(_storage("bfloat16", store_std=True), "k", latent, std, files, SIZES)
    assert set(stored.files) == {"txt", "json", "latent.npy", "std.npy", "sizes.json"}
    assert stored.files["txt"] == b"cap" and not stored.replaced
    np.testing.assert_array_equal(decode_latent(stored.files["latent.npy"], "bfloat16"), latent)
    np.testing.assert_array_equal(decode_latent(stored.files["std.npy"], "bfloat16"), std)
    np.testing.assert_array_equal(stored.values, latent)
    assert json.loads(stored.files["sizes.json"]) == {
        "original_size": [6, 10],
        "crop_top_left": [0, 2],
        "target_size": [4, 4],
    }
    # An input field named like one of ours gives way, and says so.
    again = store_sample(_storage(), "k", latent, None, {"latent.npy": b"old"}, SIZES)
    assert again.replaced and again.files["latent.npy"] != b"old"


def test_store_sample_posterior_draw_is_what_is_stored():
    mean = np.zeros((2, 3, 3), np.float32)
    std = np.ones((2, 3, 3), np.float32)
    stored = store_sample(_storage("float32", sample=True, seed=7), "k", mean, std, {}, SIZES)
    np.testing.assert_array_equal(stored.values, posterior_draw(mean, std, "k", 7))
    np.testing.assert_array_equal(
        decode_latent(stored.files["latent.npy"], "float32"), stored.values
    )


def test_store_sample_vq_indices_as_they_come():
    plan = StoragePlan(
        field="indices.npy", dtype="float16", sample=False, store_std=False, sample_seed=0, vq=True
    )
    indices = np.array([[0, 3], [2, 1]], dtype=np.uint16)
    stored = store_sample(plan, "k", indices, None, {}, SIZES)
    assert set(stored.files) == {"indices.npy", "sizes.json"}
    np.testing.assert_array_equal(stored.values, indices)


def _overflowing() -> np.ndarray:
    latent = np.zeros((2, 2, 2), np.float32)
    latent[1, 0, 1] = 70000.0
    return latent


def test_float16_overflow_is_not_storable_and_names_the_alternatives():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray RuntimeWarning from the cast either
        with pytest.raises(NotStorable) as info:
            store_sample(_storage("float16"), "k", _overflowing(), None, {}, SIZES)
    err = info.value
    assert err.overflow
    assert "float16" in str(err) and "bfloat16 or float32" in str(err)
    assert "65504" in str(err) and "7e+04" in str(err)
    for dtype in ("bfloat16", "float32"):
        stored = store_sample(_storage(dtype), "k", _overflowing(), None, {}, SIZES)
        assert np.isfinite(stored.values).all()
        assert decode_latent(stored.files["latent.npy"], dtype)[1, 0, 1] == pytest.approx(7e4, 0.01)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_non_finite_is_never_stored(bad, dtype):
    latent = np.zeros((2, 2, 2), np.float32)
    latent[0, 1, 1] = bad
    with pytest.raises(NotStorable, match="non-finite") as info:
        store_sample(_storage(dtype), "k", latent, None, {}, SIZES)
    assert not info.value.overflow


def test_std_overflow_and_non_finite():
    latent = np.zeros((2, 2, 2), np.float32)
    big_std = np.full((2, 2, 2), 1e5, np.float32)
    with pytest.raises(NotStorable, match="posterior std exceeds .*float16") as info:
        store_sample(_storage("float16", store_std=True), "k", latent, big_std, {}, SIZES)
    assert info.value.overflow
    stored = store_sample(_storage("float32", store_std=True), "k", latent, big_std, {}, SIZES)
    assert decode_latent(stored.files["std.npy"], "float32")[0, 0, 0] == 1e5
    nan_std = np.full((2, 2, 2), np.nan, np.float32)
    with pytest.raises(NotStorable, match="non-finite") as info:
        store_sample(_storage("float32", store_std=True), "k", latent, nan_std, {}, SIZES)
    assert not info.value.overflow


def test_posterior_sample_overflow():
    """A finite mean and std whose draw leaves float16's range is an overflow reject."""
    mean = np.full((2, 4, 4), 65000.0, np.float32)
    std = np.full((2, 4, 4), 2000.0, np.float32)
    plan = _storage("float16", sample=True)
    with pytest.raises(NotStorable, match="float16") as info:
        store_sample(plan, "k", mean, std, {}, SIZES)
    assert info.value.overflow
    stored = store_sample(_storage("bfloat16", sample=True), "k", mean, std, {}, SIZES)
    assert np.isfinite(stored.values).all()


# ----------------------------------------------------------------------------- writer


def _layout(output: str, buckets: bool) -> ShardLayout:
    return ShardLayout(
        output=output,
        prefix="lat",
        buckets=buckets,
        channels=2,
        factor=2,
        latent_channels=2,
        vq=False,
    )


def _finished(key, latent, sizes, files=None, dtype="bfloat16") -> FinishedSample:
    stored = store_sample(_storage(dtype), key, latent, None, files or {}, sizes)
    return FinishedSample(key, (sizes[4], sizes[5]), stored.files, stored.values)


@pytest.mark.parametrize("buckets", [False, True])
def test_unit_writes_shards_then_record(buckets):
    out = f"memory://commit-test-{uuid.uuid4().hex[:8]}"
    layout = _layout(out, buckets)
    rng = np.random.default_rng(0)
    square = [
        _finished("a", rng.normal(size=(2, 2, 2)).astype(np.float32), SIZES, {"txt": b"cap"}),
        _finished("b", np.ones((2, 2, 2), np.float32), SIZES),
    ]
    wide = [_finished("wide", np.full((2, 2, 4), 3.0, np.float32), (4, 8, 0, 0, 4, 8))]
    samples = [square[0], *wide, square[1]] if buckets else square
    groups = group_by_shape(samples)
    assert [shape for shape, _ in groups] == ([(4, 4), (4, 8)] if buckets else [(4, 4)])
    assert [s.key for s in groups[0][1]] == ["a", "b"]  # input order within a shape
    shards = write_shards(layout, 7, "in.tar", groups)
    assert not fsspec.filesystem("memory").exists(commit_url(out, 7))  # shards alone: not done
    names = [s["name"] for s in shards]
    assert names == (
        ["lat-000007-h4w4.tar", "lat-000007-h4w8.tar"] if buckets else ["lat-000007.tar"]
    )
    fs = fsspec.filesystem("memory")
    for entry in shards:
        data = fs.cat_file(join_url(out, entry["name"]))
        assert entry["sha256"] == sha256_bytes(data) and entry["bytes"] == len(data)
        assert entry["unit"] == 7 and entry["source"] == "in.tar"
    assert [s["latent_shape"] for s in shards] == (
        [[2, 2, 2], [2, 2, 4]] if buckets else [[2, 2, 2]]
    )
    assert [s["bucket"] for s in shards] == ([[4, 4], [4, 8]] if buckets else [None])
    assert [s["samples"] for s in shards] == ([2, 1] if buckets else [2])
    first = dict(iter_tar_bytes(fs.cat_file(join_url(out, names[0])), names[0]))
    assert list(first) == ["a", "b"]
    assert first["a"]["txt"] == b"cap"
    assert json.loads(first["a"]["sizes.json"])["crop_top_left"] == [0, 2]
    assert decode_latent(first["b"]["latent.npy"], "bfloat16")[0, 0, 0] == 1.0
    stats, codes = unit_statistics(layout, None, groups)
    assert codes is None and stats.count == sum(s.values[0].size for s in samples)
    record = {"unit": 7, "input": "in.tar", "shards": shards, "stats": stats.state()}
    write_record(out, record)
    assert read_json(commit_url(out, 7)) == json.loads(json.dumps(record))


def test_unit_statistics_match_one_pass_over_stored_values():
    layout = _layout("memory://unused", True)
    rng = np.random.default_rng(3)
    samples = [
        _finished(
            f"k{i}",
            rng.normal(size=(2, 2, 2 + 2 * (i % 2))).astype(np.float32),
            (4, 4 + 4 * (i % 2), 0, 0, 4, 4 + 4 * (i % 2)),
        )
        for i in range(6)
    ]
    stats, _ = unit_statistics(layout, None, group_by_shape(samples))
    flat = np.concatenate([s.values.reshape(2, -1) for s in samples], axis=1).astype(np.float64)
    summary = stats.summary()
    np.testing.assert_allclose(summary["channel_mean"], flat.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(summary["channel_std"], flat.std(axis=1), rtol=1e-12)
