"""Safe, unique sample keys.

A sample key becomes part of tar member names and, downstream, of file paths, so it must never
contain dots (WebDataset splits key and extension at the first dot), path separators or '..'.
`sanitize_key` maps any string onto ``^[A-Za-z0-9_-]+$`` and `KeyAllocator` makes the result
unique within one run.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

MAX_KEY_LEN = 200
_HASH_LEN = 8
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_UNDERSCORES = re.compile(r"_{2,}")
SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _short_hash(raw: str) -> str:
    return hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LEN]


def sanitize_key(raw: str) -> str:
    """Map `raw` (e.g. a relative path without extension) to a safe key.

    Accents are transliterated ("café" -> "cafe"), every other character outside
    ``[A-Za-z0-9_-]`` (including '/', '\\' and '.') becomes '_', runs of '_' collapse and
    leading/trailing '_'/'-' are dropped. Keys longer than MAX_KEY_LEN are truncated and get a
    hash of the full raw string appended, so distinct long inputs stay distinct.
    """
    if not isinstance(raw, str):
        raise TypeError(f"sample key must be a str, got {type(raw).__name__}")
    ascii_text = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode("ascii")
    key = _UNDERSCORES.sub("_", _UNSAFE.sub("_", ascii_text)).strip("_-")
    if not key:
        # Nothing usable survived (empty or all-symbol input): derive a stable key from the raw.
        return f"key_{_short_hash(raw)}"
    if len(key) > MAX_KEY_LEN:
        head = key[: MAX_KEY_LEN - _HASH_LEN - 1].rstrip("_-")
        key = f"{head}_{_short_hash(raw)}"
    return key


class KeyAllocator:
    """Hands out sanitized keys that are unique within one run.

    On a clash the key gets a numeric suffix ``_1``, ``_2``, ... (the first free one).
    """

    def __init__(self) -> None:
        self._used: set[str] = set()
        self._next_suffix: dict[str, int] = {}

    def allocate(self, raw: str) -> str:
        """Return a safe key for `raw` not handed out before by this allocator."""
        base = sanitize_key(raw)
        key = base
        suffix = self._next_suffix.get(base, 1)
        while key in self._used:
            key = f"{base}_{suffix}"
            suffix += 1
        self._next_suffix[base] = suffix
        self._used.add(key)
        return key

    def __contains__(self, key: object) -> bool:
        return key in self._used

    def __len__(self) -> int:
        return len(self._used)
