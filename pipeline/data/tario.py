"""Streaming WebDataset-style tar shards: read samples, write shards atomically, write index.json.

Reading follows the WebDataset convention: a member ``dir/abc.seg.png`` belongs to sample key
``dir/abc`` with extension ``seg.png`` (extensions are lower-cased, as WebDataset does), and
consecutive members with the same key form one sample. A truncated or corrupt shard raises
`TruncatedShardError` only after every complete sample before the damage has been yielded.

Writing goes to a hidden temporary name and is moved into place when the shard is complete, so
a concurrent reader never sees half a shard.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)

_BLOCK = tarfile.BLOCKSIZE
_TAIL_KEEP = 64 * 1024  # more than tarfile's 10 KiB read-ahead, so the end block is still held
# Path segments that cannot escape or hide: no ".", ".." or leading dots; no dot in the last one.
_MEMBER_KEY = re.compile(r"^([A-Za-z0-9_-][A-Za-z0-9._-]*/)*[A-Za-z0-9_-]+$")
_MEMBER_EXT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
# What a damaged stream can raise while being decompressed or parsed.
_STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


@dataclass
class TarSample:
    """One sample: its key and its files keyed by extension (no leading dot)."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)


class TruncatedShardError(Exception):
    """A shard ended early or is corrupt; complete samples before the damage were yielded."""

    def __init__(self, url: str, last_good_key: str | None, partial_key: str | None, reason: str):
        self.url = url
        self.last_good_key = last_good_key
        self.partial_key = partial_key
        self.reason = reason
        where = f"after sample {last_good_key!r}" if last_good_key else "before any complete sample"
        partial = f"; sample {partial_key!r} is incomplete" if partial_key else ""
        super().__init__(f"shard {url} is truncated or corrupt {where}{partial}: {reason}")

    def __reduce__(self):
        # Keep the attributes when pickled across processes (Ray tasks, dataloader workers).
        return type(self), (self.url, self.last_good_key, self.partial_key, self.reason)


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """(key, ext) of a tar member name, or (None, None) if it has no usable extension."""
    while name.startswith("./"):
        name = name[2:]
    directory, base = posixpath.split(name)
    if not base or base.startswith(".") or "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    if not ext:
        return None, None
    return posixpath.join(directory, stem), ext.lower()


# ----------------------------------------------------------------------------- reading


class _TrackingReader:
    """File-like wrapper counting bytes read and remembering the most recent ones.

    tarfile silently stops at a missing or garbled header; remembering the tail lets us check
    that the archive really ended with a zero block (see `_ended_cleanly`).
    """

    def __init__(self, source: IO[bytes]):
        self.pos = 0
        self._tail = b""
        self.error: Exception | None = None
        # read1 returns what one decompression step produced, so an error on a later step
        # cannot discard bytes already decompressed (read() would buffer and lose them).
        self._read = getattr(source, "read1", source.read)

    def read(self, size: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:
            data = self._read(size)
        except _STREAM_ERRORS as err:
            # Report a damaged stream as end-of-data instead of raising: tarfile reads ahead in
            # 10 KiB records and would otherwise drop the complete members in that record.
            self.error = err
            return b""
        self.pos += len(data)
        self._tail = (self._tail + data)[-_TAIL_KEEP:]
        return data

    def block_at(self, offset: int) -> bytes:
        """The 512 bytes at absolute `offset` if still remembered (fewer if the stream ended)."""
        start = offset - (self.pos - len(self._tail))
        if start < 0:
            return b""
        return self._tail[start : start + _BLOCK]


class _PrefixedReader:
    """Re-attaches bytes already consumed (for format sniffing) to a non-seekable stream."""

    def __init__(self, prefix: bytes, source: IO[bytes]):
        self._prefix = prefix
        self._source = source

    def read(self, size: int = -1) -> bytes:
        if not self._prefix:
            return self._source.read(size)
        if size is None or size < 0:
            data, self._prefix = self._prefix + self._source.read(), b""
            return data
        data, self._prefix = self._prefix[:size], self._prefix[size:]
        if len(data) < size:
            data += self._source.read(size - len(data))
        return data


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    """Transparently decompress gzip / bzip2 / xz tars (what tarfile's ``r|*`` accepts)."""
    magic = raw.read(6)
    stream = _PrefixedReader(magic, raw)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(stream, mode="rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream, mode="rb")
    return stream


def _ended_cleanly(tf: tarfile.TarFile, reader: _TrackingReader) -> bool:
    """True if the header block where tarfile stopped is the all-zero end-of-archive block."""
    block = reader.block_at(tf.offset)
    return len(block) == _BLOCK and block.count(0) == _BLOCK


def iter_tar_samples(url: str) -> Iterator[TarSample]:
    """Yield the samples of the tar at `url` (any fsspec URL), streaming.

    Raises FileNotFoundError if the shard does not exist and `TruncatedShardError` (after
    yielding every complete sample) if it is truncated or corrupt.
    """
    with fsspec.open(url, "rb") as raw:
        reader = _TrackingReader(_decompressed(raw))
        yield from _iter_grouped(url, reader)


def _iter_grouped(url: str, reader: _TrackingReader) -> Iterator[TarSample]:
    current: TarSample | None = None
    last_good: str | None = None
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if key is None or ext is None:
                    log.warning("%s: ignoring member %r (no key.extension name)", url, member.name)
                    continue
                if current is not None and key != current.key:
                    yield current
                    last_good, current = current.key, None
                if current is None:
                    current = TarSample(key)
                _add_member(url, current, ext, tf, member)
            if reader.error is not None:
                raise reader.error
            if not _ended_cleanly(tf, reader):
                raise tarfile.ReadError("missing end-of-archive marker (stream cut short?)")
    except _STREAM_ERRORS as err:
        if reader.pos == 0 and reader.error is None:
            # A 0-byte file: an empty shard (often written by a producer with nothing to put
            # in it), not a damaged one. Nothing is lost; callers see no samples.
            log.warning("%s is empty (0 bytes): no samples", url)
            return
        cause = reader.error or err  # the decompression error explains tarfile's complaint
        partial = current.key if current is not None else None
        reason = f"{type(cause).__name__}: {cause}"
        raise TruncatedShardError(url, last_good, partial, reason) from cause
    if current is not None:
        yield current


def _add_member(
    url: str, sample: TarSample, ext: str, tf: tarfile.TarFile, member: tarfile.TarInfo
) -> None:
    handle = tf.extractfile(member)
    data = handle.read() if handle is not None else b""
    if len(data) != member.size:
        raise tarfile.ReadError(f"unexpected end of data in {member.name!r}")
    if ext in sample.files:
        log.warning("%s: duplicate member %r in sample %r; keeping the first", url, ext, sample.key)
        return
    sample.files[ext] = data


# ----------------------------------------------------------------------------- writing


@dataclass
class ShardInfo:
    """A committed shard: file name (relative to the output dir), sample count, size in bytes."""

    name: str
    samples: int
    bytes: int


class _CountingWriter:
    """Forwards writes to an fsspec file and counts the bytes (the exact shard size)."""

    def __init__(self, target: IO[bytes]):
        self._target = target
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self._target.write(data)
        self.bytes += len(data)
        return len(data)


@dataclass
class _OpenShard:
    name: str
    tmp_path: str
    handle: Any
    counter: _CountingWriter
    tar: tarfile.TarFile
    samples: int = 0
    approx_bytes: int = 0


def _member_bytes(size: int) -> int:
    """Tar space taken by one member: header block plus data padded to whole blocks."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _validate_sample(key: str, files: dict[str, bytes]) -> None:
    if not isinstance(key, str) or not _MEMBER_KEY.match(key):
        raise ValueError(f"unsafe sample key {key!r}: use pipeline.data.keys.sanitize_key")
    if not files:
        raise ValueError(f"sample {key!r} has no files")
    for ext, data in files.items():
        if not isinstance(ext, str) or not _MEMBER_EXT.match(ext):
            raise ValueError(f"sample {key!r}: invalid extension {ext!r}")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"sample {key!r}.{ext}: expected bytes, got {type(data).__name__}")


class TarShardWriter:
    """Writes samples into ``{output_dir}/{prefix}-{index:06d}.tar`` shards over fsspec.

    A new shard starts once the current one holds `max_samples` samples or adding the next sample
    would exceed `max_bytes` (a shard always gets at least one sample). Use as a context manager:
    on an exception the shard in progress is discarded, committed shards stay.
    """

    def __init__(
        self,
        output_dir: str,
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int = 256 * 1024 * 1024,
    ):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be >= 1")
        if not re.match(r"^[A-Za-z0-9_-]+$", prefix):
            raise ValueError(f"invalid shard prefix {prefix!r}")
        self.output_dir = output_dir
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self._fs, self._dir = url_to_fs(output_dir)
        self._fs.makedirs(self._dir, exist_ok=True)
        self._shards: list[ShardInfo] = []
        self._open: _OpenShard | None = None
        self._closed = False

    @property
    def shards(self) -> list[ShardInfo]:
        """Shards committed so far."""
        return list(self._shards)

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Append one sample; `files` maps extension (e.g. "jpg", "latent.npy") to bytes."""
        if self._closed:
            raise RuntimeError("TarShardWriter is closed")
        _validate_sample(key, files)
        size = sum(_member_bytes(len(data)) for data in files.values())
        shard = self._open
        if shard is not None and (
            shard.samples >= self.max_samples or shard.approx_bytes + size > self.max_bytes
        ):
            self._commit()
        shard = self._open or self._start()
        add_sample(shard.tar, key, files)
        shard.samples += 1
        shard.approx_bytes += size

    def close(self) -> list[ShardInfo]:
        """Commit the shard in progress and return every committed shard."""
        if not self._closed:
            if self._open is not None:
                self._commit()
            self._closed = True
        return self.shards

    def abort(self) -> None:
        """Discard the shard in progress (its temporary file is removed)."""
        shard, self._open, self._closed = self._open, None, True
        if shard is None:
            return
        try:
            shard.tar.close()
            shard.handle.close()
        finally:
            if self._fs.exists(shard.tmp_path):
                self._fs.rm(shard.tmp_path)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _start(self) -> _OpenShard:
        name = f"{self.prefix}-{len(self._shards):06d}.tar"
        tmp_path = posixpath.join(self._dir, f".{name}.tmp")
        handle = self._fs.open(tmp_path, "wb")
        counter = _CountingWriter(handle)
        tar = tarfile.open(fileobj=counter, mode="w|", format=tarfile.PAX_FORMAT)  # type: ignore[call-overload]
        self._open = _OpenShard(name, tmp_path, handle, counter, tar)
        return self._open

    def _commit(self) -> None:
        shard, self._open = self._open, None
        assert shard is not None
        shard.tar.close()
        shard.handle.close()
        self._fs.mv(shard.tmp_path, posixpath.join(self._dir, shard.name))
        self._shards.append(ShardInfo(shard.name, shard.samples, shard.counter.bytes))
        log.info("wrote %s/%s (%d samples)", self.output_dir, shard.name, shard.samples)


def build_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """An uncompressed tar of ``samples`` (key, {ext: bytes}) in memory, members in the given
    order, byte-for-byte reproducible (fixed mtime and mode, PAX format) like TarShardWriter."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for key, files in samples:
            _validate_sample(key, files)
            add_sample(tar, key, files)
    return buffer.getvalue()


def add_sample(tar: tarfile.TarFile, key: str, files: dict[str, bytes]) -> None:
    """The one way a sample becomes tar members (TarShardWriter and build_tar, so image shards,
    latent shards and the tests' corpora): ``{key}.{ext}`` in order, mode 0o444 and mtime 0 so
    the bytes depend on the data alone."""
    for ext, data in files.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        tar.addfile(info, _BytesReader(bytes(data)))


class _BytesReader:
    """Minimal file-like over bytes for tarfile.addfile (avoids an io.BytesIO copy)."""

    def __init__(self, data: bytes):
        self._view = memoryview(data)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._pos + size
        chunk = self._view[self._pos : end]
        self._pos += len(chunk)
        return chunk.tobytes()


def write_index(output_dir: str, shards: list[ShardInfo], extra: dict | None = None) -> str:
    """Write ``{output_dir}/index.json`` listing `shards` (plus `extra` keys); return its URL."""
    index: dict[str, Any] = {
        "shards": [asdict(s) for s in shards],
        "samples": sum(s.samples for s in shards),
    }
    clash = set(index) & set(extra or {})
    if clash:
        raise ValueError(f"extra index fields would overwrite {sorted(clash)}")
    index.update(extra or {})
    fs, path = url_to_fs(output_dir)
    fs.makedirs(path, exist_ok=True)
    tmp_path = posixpath.join(path, ".index.json.tmp")
    with fs.open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    fs.mv(tmp_path, posixpath.join(path, "index.json"))
    return output_dir.rstrip("/") + "/index.json"
