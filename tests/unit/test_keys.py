"""sanitize_key / KeyAllocator: safe, stable, unique keys."""

import re

import pytest

from pipeline.data.keys import MAX_KEY_LEN, KeyAllocator, sanitize_key

SAFE = re.compile(r"^[A-Za-z0-9_-]+$")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("abc", "abc"),
        ("dir/sub/img_001", "dir_sub_img_001"),
        ("win\\path\\x", "win_path_x"),
        ("../../etc/passwd", "etc_passwd"),
        ("a.b.c", "a_b_c"),
        ("my photo (1)", "my_photo_1"),
        ("café-crème", "cafe-creme"),
        ("a___b", "a_b"),
    ],
)
def test_sanitize_examples(raw, expected):
    assert sanitize_key(raw) == expected


@pytest.mark.parametrize("raw", ["", "...", "/", "日本語", "..", "___", " "])
def test_sanitize_never_empty(raw):
    key = sanitize_key(raw)
    assert SAFE.match(key)
    assert sanitize_key(raw) == key  # stable


def test_sanitize_truncates_with_hash():
    long_a, long_b = "x" * 500 + "a", "x" * 500 + "b"
    key_a, key_b = sanitize_key(long_a), sanitize_key(long_b)
    assert len(key_a) <= MAX_KEY_LEN and SAFE.match(key_a)
    assert key_a != key_b


def test_sanitize_rejects_non_str():
    with pytest.raises(TypeError):
        sanitize_key(b"bytes")  # type: ignore[arg-type]


def test_allocator_suffixes_clashes():
    keys = KeyAllocator()
    assert [keys.allocate(r) for r in ["a/b", "a.b", "a_b", "a_b_1", "c"]] == [
        "a_b",
        "a_b_1",
        "a_b_2",
        "a_b_1_1",
        "c",
    ]
    assert "a_b_2" in keys and len(keys) == 5


def test_allocator_many_unique():
    keys = KeyAllocator()
    allocated = [keys.allocate("same") for _ in range(100)]
    assert len(set(allocated)) == 100
    assert all(SAFE.match(k) for k in allocated)
