"""How the encode job reads an input shard: samples, keys and the image field.

Shared by the encode job and ``latentpipe verify`` (which must see the input exactly as the job
saw it). WebDataset groups tar members by the file name up to its first dot; keys that contain
a dot are recovered from that grouping (:func:`split_dotted_keys`) and rejected by name
(:func:`key_problem`), never merged under an invented key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from pipeline.data.images import IMAGE_EXTENSIONS, find_image_field
from pipeline.data.keys import sanitize_key
from pipeline.data.tario import iter_tar_samples

MAX_KEY_LEN = 512
# Path segments of [A-Za-z0-9._-], none starting with "." (so never ".", ".." or hidden); the last
# segment holds no dot (WebDataset splits key and extension at the basename's first dot).
SAFE_KEY = re.compile(r"^([A-Za-z0-9_-][A-Za-z0-9._-]*/)*[A-Za-z0-9_-]+$")
SAFE_EXT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def key_problem(key: str) -> str:
    """Why ``key`` cannot name output tar members ("" when it is safe).

    Safe keys are what ``sanitize_key`` produces, optionally "/"-separated into sub-paths as
    WebDataset corpora often use (directory segments may hold dots, e.g. "v1.2/img", but never
    start with one, so never ".", ".." or absolute).
    Unsafe keys are rejected, not renamed: a renamed key would no longer match captions,
    metadata or other corpora keyed by the original.
    """
    if not key:
        return "empty key"
    if "." in key.rsplit("/", 1)[-1] and ".." not in key:
        return (
            "key contains a dot in its file-name part: WebDataset readers split member names at "
            f"the first dot, so it cannot be written under this key (sanitize_key gives "
            f"{sanitize_key(key)!r})"
        )
    if len(key) > MAX_KEY_LEN or not SAFE_KEY.match(key):
        safe = sanitize_key(key)
        return f"unsafe key (not [A-Za-z0-9_-] path segments; sanitize_key gives {safe!r})"
    return ""


def split_dotted_keys(key: str, files: dict[str, bytes]) -> list[tuple[str, dict[str, bytes]]]:
    """Recover keys that contain dots from WebDataset's grouping.

    WebDataset splits a member name at the first dot of its file name, so ``img.001.jpg`` and
    ``img.001.txt`` arrive as key ``img`` with fields ``001.jpg`` and ``001.txt``. When every
    field of a group has such a dotted prefix, the group is really one sample per prefix,
    keyed ``img.001`` (which :func:`key_problem` then rejects by name instead of the job
    inventing a key ``img``). Groups with any plain field (``x.jpg`` + ``x.seg.png``) keep
    WebDataset's reading.
    """
    if not files or not all("." in ext for ext in files):
        return [(key, files)]
    samples: dict[str, dict[str, bytes]] = {}
    for ext, data in files.items():
        head, rest = ext.split(".", 1)
        samples.setdefault(f"{key}.{head}", {})[rest] = data
    return list(samples.items())


def iter_input_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, files) of an input shard exactly as the encode job reads it (see
    :func:`split_dotted_keys`); raises TruncatedShardError like ``iter_tar_samples``."""
    for sample in iter_tar_samples(url):
        yield from split_dotted_keys(sample.key, sample.files)


def image_field(files: dict[str, bytes]) -> str | None:
    """The field holding the image: an exact image extension, else the one field whose last
    dotted part is one ("a.b.jpg" in a tar is key "a" with field "b.jpg", which WebDataset's
    decoders also read as an image)."""
    exact = find_image_field(files)
    if exact is not None:
        return exact
    dotted = [ext for ext in files if ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
    return dotted[0] if len(dotted) == 1 else None
