"""The latent-corpus manifest (format v3) as a typed contract, and its streaming readers.

``manifest.json`` is a summary: it never grows with the number of keys or shards. The shard list
lives in ``shards.jsonl`` (one :class:`ShardEntry` a line, unit order then bucket order) and the
lineage of each input shard in ``inputs.jsonl`` (one :class:`InputLineage` a line, unit order);
the manifest pins both by sha256 and line count. Readers stream them line by line
(:func:`iter_shard_entries`, :func:`iter_inputs`) and raise :class:`CorpusError` at the end when
the file is not the one the manifest pins; :func:`manifest_shards` checks before it returns.

Readers trust only shards listed there, and check each one's size and sha256 before yielding any
of its samples (``pipeline.latents.format``). The directory layout: ``pipeline.contracts.layout``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.contracts.fields import Fields
from pipeline.contracts.layout import (
    INDEX_DTYPES,
    INDICES_FIELD,
    INPUTS_FILE,
    LATENT_FIELD,
    LATENT_KINDS,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    REJECTS_FILE,
    SHARDS_FILE,
    STORED_DTYPES,
    VQ_KIND,
    commits_url,
    is_local,
    join_url,
    read_json,
    storage_dtype,
)
from pipeline.contracts.sidecar import Sidecar, SidecarError


class CorpusError(ValueError):
    """A latent corpus is unfinished, inconsistent, or not the one the caller expects."""


# ----------------------------------------------------------------------------- line records


@dataclass(frozen=True)
class ShardEntry:
    """One latent shard: a line of ``shards.jsonl``."""

    name: str  # file name in the corpus directory
    samples: int
    bytes: int
    sha256: str
    unit: int  # the input shard it was encoded from (position in the job's input list)
    source: str  # that input shard's URL
    bucket: list[int] | None  # [height, width] in pixels (bucket mode), else None
    latent_shape: list[int]  # of every stored sample: [C, h, w] (KL) or [h, w] (VQ indices)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ShardEntry:
        f = Fields(data, where, CorpusError)
        entry = cls(
            name=f.str("name"),
            samples=f.int("samples", minimum=0),
            bytes=f.int("bytes", minimum=0),
            sha256=f.str("sha256"),
            unit=f.int("unit", minimum=0),
            source=f.str("source"),
            bucket=f.ints("bucket", length=2) if f.raw("bucket") is not None else None,
            latent_shape=f.ints("latent_shape"),
        )
        _check_plain_name(f, "name", entry.name)
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "samples": self.samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "unit": self.unit,
            "source": self.source,
            "bucket": None if self.bucket is None else list(self.bucket),
            "latent_shape": list(self.latent_shape),
        }


@dataclass(frozen=True)
class InputLineage:
    """What became of one input shard: a line of ``inputs.jsonl``."""

    unit: int
    url: str
    fingerprint: dict  # size plus etag/mtime/... as the store reported it when it was encoded
    rows: int  # tar sample groups read
    samples: int  # latents stored
    rejects: int
    shards: list[str]  # names of the latent shards it became

    @classmethod
    def from_dict(cls, data: Any, where: str) -> InputLineage:
        f = Fields(data, where, CorpusError)
        return cls(
            unit=f.int("unit", minimum=0),
            url=f.str("url"),
            fingerprint=f.dict("fingerprint"),
            rows=f.int("rows", minimum=0),
            samples=f.int("samples", minimum=0),
            rejects=f.int("rejects", minimum=0),
            shards=f.strs("shards"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "url": self.url,
            "fingerprint": dict(self.fingerprint),
            "rows": self.rows,
            "samples": self.samples,
            "rejects": self.rejects,
            "shards": list(self.shards),
        }


# ----------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class LatentSpec:
    """The manifest's ``latent`` block: what each sample stores, and how to read it."""

    kind: str  # posterior_mean | posterior_sample | vq_indices
    field: str  # the shard member holding it: latent.npy | indices.npy
    dtype: str  # float16 | bfloat16 | float32 (KL); uint16 | int32 (VQ)
    storage_dtype: str  # the .npy dtype (bfloat16 is stored as its uint16 bits)
    channels: int  # of the latents statistics are taken on (VQ: the codebook lookup)
    shape: list[int] | None  # the one stored shape, None when buckets give several
    shapes: list[list[int]]
    std_field: str | None
    sizes_field: str
    sample_seed: int | None = None  # posterior_sample only
    num_codes: int | None = None  # VQ only, from here on
    code_dim: int | None = None
    lookup_shape: list[int] | None = None
    codebook_file: str | None = None
    codebook_sha256: str | None = None

    @property
    def is_vq(self) -> bool:
        return self.kind == VQ_KIND

    @classmethod
    def from_dict(cls, f: Fields) -> LatentSpec:
        kind = f.str("kind", choices=LATENT_KINDS)
        vq = kind == VQ_KIND
        field = f.str("field", choices=(INDICES_FIELD,) if vq else (LATENT_FIELD,))
        dtype = f.str("dtype", choices=INDEX_DTYPES if vq else STORED_DTYPES)
        stored = f.str("storage_dtype", choices=(dtype if vq else storage_dtype(dtype),))
        common = {
            "kind": kind,
            "field": field,
            "dtype": dtype,
            "storage_dtype": stored,
            "channels": f.int("channels", minimum=1),
            "shape": f.ints("shape") if f.raw("shape") is not None else None,
            "shapes": _shape_list(f, "shapes"),
            "std_field": f.str("std_field", optional=True),
            "sizes_field": f.str("sizes_field"),
        }
        if not vq:
            return cls(**common, sample_seed=f.int("sample_seed", optional=True))
        spec = cls(
            **common,
            num_codes=f.int("num_codes", minimum=1),
            code_dim=f.int("code_dim", minimum=1),
            lookup_shape=f.ints("lookup_shape", optional=True),
            codebook_file=f.str("codebook_file"),
            codebook_sha256=f.str("codebook_sha256"),
        )
        _check_plain_name(f, "codebook_file", spec.codebook_file)
        return spec

    def to_dict(self) -> dict[str, Any]:
        data = {
            "kind": self.kind,
            "field": self.field,
            "dtype": self.dtype,
            "storage_dtype": self.storage_dtype,
            "channels": self.channels,
            "shape": None if self.shape is None else list(self.shape),
            "shapes": [list(s) for s in self.shapes],
            "std_field": self.std_field,
            "sizes_field": self.sizes_field,
        }
        if not self.is_vq:
            return {**data, "sample_seed": self.sample_seed}
        return {
            **data,
            "num_codes": self.num_codes,
            "code_dim": self.code_dim,
            "lookup_shape": None if self.lookup_shape is None else list(self.lookup_shape),
            "codebook_file": self.codebook_file,
            "codebook_sha256": self.codebook_sha256,
        }


@dataclass(frozen=True)
class EncoderRef:
    """The encoder a corpus was made with: its path, ONNX sha256 and its whole sidecar."""

    path: str
    sha256: str
    sidecar: Sidecar

    @classmethod
    def from_dict(cls, f: Fields) -> EncoderRef:
        try:
            sidecar = Sidecar.from_dict(f.raw("sidecar"), f"{f.where}: encoder.sidecar")
        except SidecarError as e:
            raise CorpusError(str(e)) from None
        return cls(path=f.str("path"), sha256=f.str("sha256"), sidecar=sidecar)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "sidecar": self.sidecar.to_dict()}


# Integer counters of the summary, in the order manifest.json lists them.
_COUNTS_BEFORE = ("input_samples", "empty_inputs", "samples", "rejects")
_COUNTS_AFTER = (
    "merged_keys",
    "replaced_fields",
    "nonfinite_rejects",
    "overflow_rejects",
    "duplicate_rejects",
    "fp16_retries",
)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a finished corpus (v3): a summary, never O(keys) or O(shards)."""

    encoder: EncoderRef
    job: dict  # the job's identity (encode owns its fields; inputs as inputs_count/_sha256)
    preprocess: dict  # the resolved preprocessing (pipeline.encode.preprocess.PreprocessConfig)
    storage: dict  # the storage options (pipeline.encode.config)
    latent: LatentSpec
    scaling_factor: float
    shift_factor: float
    scaling_source: str
    measured_mean: float | None
    measured_std: float | None
    channel_mean: list[float]
    channel_std: list[float]
    values_per_channel: int
    shards_sha256: str
    shard_count: int
    inputs_sha256: str
    input_count: int
    input_samples: int  # tar sample groups read from the inputs
    empty_inputs: int  # input shards that held no sample at all
    samples: int  # latents stored
    rejects: int
    merged_keys: int
    replaced_fields: int
    nonfinite_rejects: int
    overflow_rejects: int
    duplicate_rejects: int
    fp16_retries: int
    wall_time_s: float
    images_per_s: float | None
    runs: int
    code_usage: dict | None = None  # VQ: codes used, usage, perplexity over the stored indices
    shards_file: str = SHARDS_FILE
    inputs_file: str = INPUTS_FILE
    rejects_file: str = REJECTS_FILE
    extra: dict = dataclasses.field(default_factory=dict)  # unknown keys, kept verbatim

    @property
    def is_vq(self) -> bool:
        return self.latent.is_vq

    @property
    def sidecar(self) -> Sidecar:
        return self.encoder.sidecar

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "encoder": self.encoder.to_dict(),
            "job": dict(self.job),
            "preprocess": dict(self.preprocess),
            "storage": dict(self.storage),
            "latent": self.latent.to_dict(),
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "scaling_source": self.scaling_source,
            "measured_mean": self.measured_mean,
            "measured_std": self.measured_std,
            "channel_mean": list(self.channel_mean),
            "channel_std": list(self.channel_std),
            "values_per_channel": self.values_per_channel,
        }
        if self.code_usage is not None:
            data["code_usage"] = dict(self.code_usage)
        data.update(
            {
                "shards_file": self.shards_file,
                "shards_sha256": self.shards_sha256,
                "shard_count": self.shard_count,
                "inputs_file": self.inputs_file,
                "inputs_sha256": self.inputs_sha256,
                "input_count": self.input_count,
                **{name: getattr(self, name) for name in _COUNTS_BEFORE},
                "rejects_file": self.rejects_file,
                **{name: getattr(self, name) for name in _COUNTS_AFTER},
                "wall_time_s": self.wall_time_s,
                "images_per_s": self.images_per_s,
                "runs": self.runs,
            }
        )
        return {**data, **{k: v for k, v in self.extra.items() if k not in data}}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Manifest:
        """Validate a parsed manifest; raises CorpusError naming the field and ``where``."""
        f = Fields(data, where, CorpusError)
        _check_version(data, where)
        for name in ("scaling_factor", "shift_factor"):
            value = data.get(name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise CorpusError(f"{where}: missing or non-numeric {name!r}; cannot scale latents")
        counts = {name: f.int(name, minimum=0) for name in (*_COUNTS_BEFORE, *_COUNTS_AFTER)}
        manifest = cls(
            encoder=EncoderRef.from_dict(f.sub("encoder")),
            job=f.dict("job"),
            preprocess=f.dict("preprocess"),
            storage=f.dict("storage"),
            latent=LatentSpec.from_dict(f.sub("latent")),
            scaling_factor=f.float("scaling_factor"),
            shift_factor=f.float("shift_factor"),
            scaling_source=f.str("scaling_source"),
            measured_mean=f.float("measured_mean", optional=True),
            measured_std=f.float("measured_std", optional=True),
            channel_mean=_floats(f, "channel_mean"),
            channel_std=_floats(f, "channel_std"),
            values_per_channel=f.int("values_per_channel", minimum=0),
            shards_sha256=f.str("shards_sha256"),
            shard_count=f.int("shard_count", minimum=0),
            inputs_sha256=f.str("inputs_sha256"),
            input_count=f.int("input_count", minimum=0),
            **counts,
            wall_time_s=f.float("wall_time_s"),
            images_per_s=f.float("images_per_s", optional=True),
            runs=f.int("runs", minimum=0),
            code_usage=f.dict("code_usage", optional=True),
            shards_file=f.str("shards_file"),
            inputs_file=f.str("inputs_file"),
            rejects_file=f.str("rejects_file"),
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )
        for name in ("shards_file", "inputs_file", "rejects_file"):
            _check_plain_name(f, name, getattr(manifest, name))
        return manifest


_KNOWN = {
    "format",
    "format_version",
    *(f.name for f in dataclasses.fields(Manifest) if f.name != "extra"),
}


def _check_version(data: dict[str, Any], where: str) -> None:
    if data.get("format") != MANIFEST_FORMAT:
        raise CorpusError(
            f"{where}: not a latentpipe latent manifest (format != {MANIFEST_FORMAT!r})"
        )
    version = data.get("format_version")
    if version != MANIFEST_VERSION:
        raise CorpusError(
            f"{where}: format_version {version!r}, this latentpipe reads {MANIFEST_VERSION}; "
            "re-encode the corpus with this version"
        )


def _check_plain_name(f: Fields, key: str, name: str) -> None:
    """Names inside a corpus are file names in its directory, never paths that leave it."""
    if not name or posixpath.basename(name) != name or name in (".", ".."):
        raise f.fail(key, "a plain file name in the corpus directory")


def _shape_list(f: Fields, key: str) -> list[list[int]]:
    shapes = f.list(key)
    ok = all(
        isinstance(s, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in s)
        for s in shapes
    )
    if not ok:
        raise f.fail(key, "a list of shapes (lists of integers)")
    return [list(s) for s in shapes]


def _floats(f: Fields, key: str) -> list[float]:
    values = f.list(key)
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in values):
        raise f.fail(key, "a list of numbers")
    return [float(x) for x in values]


# ----------------------------------------------------------------------------- reading


def load_manifest(directory: str, expected_encoder_sha256: str | None = None) -> Manifest:
    """Read and validate ``{directory}/manifest.json`` of a finished encode run.

    Raises FileNotFoundError for an unfinished corpus (naming how many units are committed),
    CorpusError for an unusable one: wrong format/version, no scaling factor, a missing or
    mistyped field, an encoder other than ``expected_encoder_sha256``.
    """
    path = join_url(directory, MANIFEST_FILE)
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a finished latent corpus"
            f"{_progress_hint(directory)}"
        ) from None
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path} is not valid JSON: {e}") from None
    except ValueError as e:  # valid JSON, but not an object
        raise CorpusError(str(e)) from None
    manifest = Manifest.from_dict(data, path)
    check_encoder(manifest, expected_encoder_sha256, path)
    return manifest


def check_encoder(manifest: Manifest, expected_sha256: str | None, where: str) -> None:
    """Refuse a corpus made by another encoder than the one the caller trains against."""
    actual = manifest.encoder.sha256
    if expected_sha256 is not None and actual != expected_sha256:
        raise CorpusError(
            f"{where}: latents were made by encoder sha256 {actual}, expected {expected_sha256}; "
            "a diffusion model must read latents of the autoencoder it will decode with"
        )


def iter_shard_entries(directory: str, manifest: Manifest) -> Iterator[ShardEntry]:
    """The shard entries of ``shards.jsonl``, streamed; CorpusError at the end (after the last
    entry) when the file is not the one the manifest pins (sha256, line count)."""
    url = join_url(directory, manifest.shards_file)
    lines = _iter_jsonl(url, manifest.shards_sha256, manifest.shard_count)
    for number, data in lines:
        yield ShardEntry.from_dict(data, f"{url} line {number}")


def iter_inputs(directory: str, manifest: Manifest) -> Iterator[InputLineage]:
    """The lineage records of ``inputs.jsonl``, streamed and checked like
    :func:`iter_shard_entries`."""
    url = join_url(directory, manifest.inputs_file)
    for number, data in _iter_jsonl(url, manifest.inputs_sha256, manifest.input_count):
        yield InputLineage.from_dict(data, f"{url} line {number}")


def manifest_shards(directory: str, manifest: Manifest) -> list[ShardEntry]:
    """Every shard entry, in order, checked against the manifest before it is returned."""
    return list(iter_shard_entries(directory, manifest))


def _iter_jsonl(url: str, sha256: str, count: int) -> Iterator[tuple[int, dict[str, Any]]]:
    digest, seen = hashlib.sha256(), 0
    try:
        with fsspec.open(url, "rb") as f:
            for number, line in enumerate(f, start=1):
                digest.update(line)
                if not line.strip():
                    continue
                seen += 1
                yield number, _parse_line(line, url, number)
    except FileNotFoundError:
        raise CorpusError(f"{url} is pinned by the manifest but does not exist") from None
    actual = digest.hexdigest()
    if actual != sha256:
        raise CorpusError(
            f"sha256 of {url} is {actual}, the manifest records {sha256}: the file was "
            "changed, truncated or replaced after the corpus was finished"
        )
    if seen != count:
        raise CorpusError(f"{url} holds {seen} records, the manifest says {count}")


def _parse_line(line: bytes, url: str, number: int) -> dict[str, Any]:
    try:
        return json.loads(line)
    except ValueError as e:
        raise CorpusError(f"{url} line {number} is not valid JSON: {e}") from None


def _progress_hint(directory: str) -> str:
    try:
        fs, path = fsspec.core.url_to_fs(commits_url(directory))
        names = sorted(posixpath.basename(p) for p in fs.glob(posixpath.join(path, "u*.json")))
    except (OSError, ValueError):
        return ""
    if not names:
        return " (no unit committed yet)"
    # Name the units so a user can see how far the run got (and which one it stopped after).
    units = ", ".join(n.removesuffix(".json") for n in names[:8])
    units += ", ..." if len(names) > 8 else ""
    return (
        f" ({len(names)} unit(s) committed: {units}; re-run the same encode command to finish it)"
    )


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class JsonlDigest:
    """What the manifest records of a written .jsonl file."""

    sha256: str
    count: int


def write_jsonl(url: str, records: Iterable[Any]) -> JsonlDigest:
    """Stream ``records`` (dicts, or contract objects with ``to_dict``) to ``url``, one JSON
    object a line, hashing as it writes; the file appears whole (temporary name + rename on
    local disk; one upload, applied at close, on object stores)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    local = is_local(url)
    target = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp")
    digest, count = hashlib.sha256(), 0
    with fs.open(target if local else path, "wb") as f:
        for record in records:
            data = record.to_dict() if hasattr(record, "to_dict") else record
            line = (json.dumps(data) + "\n").encode("utf-8")
            digest.update(line)
            f.write(line)
            count += 1
    if local:
        fs.mv(target, path)
    return JsonlDigest(digest.hexdigest(), count)
