"""Finalising an encode job from its commit records, without Ray (pipeline.encode.finalize):
hand-written records (shards written by the writer) on memory://, and AtomicStream on disk."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import fsspec
import numpy as np
import pytest

from pipeline.contracts.manifest import iter_inputs
from pipeline.contracts.sidecar import build_sidecar
from pipeline.encode.config import EncodeConfig
from pipeline.encode.finalize import (
    PREFETCH,
    AtomicStream,
    FinalizeInputs,
    Totals,
    finalize,
    iter_records,
    stream_records,
)
from pipeline.encode.preprocess import PreprocessConfig, resolve_preprocess
from pipeline.encode.writer import (
    FinishedSample,
    ShardLayout,
    group_by_shape,
    unit_statistics,
    write_record,
    write_shards,
)
from pipeline.latents.format import (
    LATENT_FIELD,
    encode_latent,
    join_url,
    load_manifest,
    manifest_shards,
    read_json,
)
from pipeline.latents.stats import ChannelStats

FS = fsspec.filesystem("memory")
CHANNELS = 2


def _layout(output: str) -> ShardLayout:
    return ShardLayout(
        output=output,
        prefix="latents",
        buckets=False,
        channels=CHANNELS,
        factor=2,
        latent_channels=CHANNELS,
        vq=False,
    )


def _unit_record(output: str, unit: int, latents: list[np.ndarray], rejects: int, **extra):
    """A committed unit: its shard written by the writer, then a record like encode_unit's."""
    url = f"memory://finalize-inputs/shard-{unit:06d}.tar"
    samples = [
        FinishedSample(
            f"u{unit}k{i}", (4, 4), {LATENT_FIELD: encode_latent(x, "float32"), "txt": b"c"}, x
        )
        for i, x in enumerate(latents)
    ]
    groups = group_by_shape(samples)
    stats, _ = unit_statistics(_layout(output), None, groups)
    record = {
        "unit": unit,
        "input": url,
        "fingerprint": {"size": 1000 + unit, "etag": f"e{unit}"},
        "rows": len(latents) + rejects,
        "samples": len(latents),
        "shards": write_shards(_layout(output), unit, url, groups),
        "rejects": [
            {"key": f"u{unit}bad{i}", "shard": url, "reason": f"bad image: {i}"}
            for i in range(rejects)
        ],
        "keys": [s.key for s in samples],
        "merged_keys": unit % 2,
        "replaced_fields": 0,
        "stats": stats.state(),
        "code_counts": None,
        "nonfinite_rejects": 0,
        "overflow_rejects": 0,
        "encoded": len(latents),
        "fp16_retries": 0,
        "duplicate_rejects": 0,
        "run": "run1",
        "elapsed_s": 1.0 + unit,
        **extra,
    }
    write_record(output, record)
    return record


def _corpus(output: str) -> tuple[list[dict], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    values = [rng.normal(size=(CHANNELS, 2, 2)).astype(np.float32) for _ in range(7)]
    records = [
        _unit_record(output, 0, values[:3], rejects=1),
        _unit_record(output, 1, [], rejects=0),  # an empty input shard
        _unit_record(output, 2, values[3:5], rejects=2, nonfinite_rejects=1, overflow_rejects=1),
        _unit_record(
            output, 3, values[5:], rejects=1, duplicate_rejects=1, fp16_retries=4, run="run2"
        ),
    ]
    records[1]["rows"] = 0
    write_record(output, records[1])
    return records, values


def _lines(url: str) -> list[dict]:
    return [json.loads(line) for line in FS.cat_file(url).decode().splitlines()]


def _sha256(url: str) -> str:
    return hashlib.sha256(FS.cat_file(url)).hexdigest()


def _inputs(output: str, units: int) -> FinalizeInputs:
    sidecar = build_sidecar(
        onnx_file="encoder.onnx",
        onnx_sha256="e" * 64,
        opset=17,
        model_kind="kl",
        resolution=8,
        downsample_factor=2,
        latent_channels=CHANNELS,
        latent_stats={"mean": 0.0, "std": 1.0, "samples": 0, "source": ""},
        parity={},
        model={},
    )
    cfg = EncodeConfig(
        input="memory://finalize-inputs", output=output, encoder="memory://enc/encoder.onnx"
    )
    return FinalizeInputs(
        cfg=cfg,
        sidecar=sidecar,
        preprocess=resolve_preprocess(PreprocessConfig(), 8, 2, True),
        identity={"inputs_count": units, "inputs_sha256": "0" * 64},
        units=units,
        codebook=None,
        run="run2",
        run_s=10.0,
    )


def test_finalize_streams_the_lists_and_writes_the_manifest_last():
    output = f"memory://finalize-{uuid.uuid4().hex[:8]}"
    records, values = _corpus(output)
    manifest = finalize(_inputs(output, len(records)))

    rejects = _lines(join_url(output, "rejects.jsonl"))
    assert [r["key"] for r in rejects] == ["u0bad0", "u2bad0", "u2bad1", "u3bad0"]  # unit order
    shards = _lines(join_url(output, "shards.jsonl"))
    assert shards == [entry for r in records for entry in r["shards"]]
    assert manifest.shard_count == len(shards) == 3
    assert manifest.shards_sha256 == _sha256(join_url(output, "shards.jsonl"))
    inputs = _lines(join_url(output, "inputs.jsonl"))
    assert manifest.input_count == len(inputs) == 4
    assert manifest.inputs_sha256 == _sha256(join_url(output, "inputs.jsonl"))
    assert inputs[2] == {
        "unit": 2,
        "url": records[2]["input"],
        "fingerprint": {"size": 1002, "etag": "e2"},
        "rows": 4,
        "samples": 2,
        "rejects": 2,
        "shards": ["latents-000002.tar"],
    }
    assert inputs[1]["shards"] == [] and inputs[1]["rows"] == 0

    index = json.loads(FS.cat_file(join_url(output, "index.json")))
    assert index["shards"] == [{k: s[k] for k in ("name", "samples", "bytes")} for s in shards]
    assert index["samples"] == 7 and index["latent_field"] == LATENT_FIELD

    assert (manifest.samples, manifest.rejects, manifest.input_samples) == (7, 4, 11)
    assert manifest.empty_inputs == 1
    assert (manifest.nonfinite_rejects, manifest.overflow_rejects) == (1, 1)
    assert (manifest.duplicate_rejects, manifest.fp16_retries, manifest.merged_keys) == (1, 4, 2)
    assert manifest.runs == 2
    assert manifest.wall_time_s == pytest.approx(3.0 + 10.0)  # run1's longest + run2's own
    whole = ChannelStats(CHANNELS)
    whole.update(np.stack(values))
    summary = whole.summary()
    np.testing.assert_allclose(manifest.channel_mean, summary["channel_mean"], rtol=1e-12)
    np.testing.assert_allclose(manifest.channel_std, summary["channel_std"], rtol=1e-12)
    assert manifest.scaling_factor == pytest.approx(1 / summary["std"])
    assert manifest.scaling_source == "corpus"

    # What readers see: the manifest pins the lists, which read back checked.
    loaded = load_manifest(output)
    assert loaded.to_dict() == manifest.to_dict()
    assert [s.to_dict() for s in manifest_shards(output, loaded)] == shards
    assert [i.to_dict() for i in iter_inputs(output, loaded)] == inputs
    assert read_json(join_url(output, "manifest.json"))["shards_file"] == "shards.jsonl"


def test_stream_records_of_a_corpus_without_latents():
    output = f"memory://finalize-{uuid.uuid4().hex[:8]}"
    _unit_record(output, 0, [], rejects=2)
    totals = Totals(ChannelStats(CHANNELS), None)
    files = stream_records(output, 1, totals, LATENT_FIELD)
    assert files["shard_count"] == 0 and files["input_count"] == 1
    assert files["shards_sha256"] == hashlib.sha256(b"").hexdigest()
    index = json.loads(FS.cat_file(join_url(output, "index.json")))
    assert index["shards"] == [] and index["samples"] == 0
    assert totals.counts["rejects"] == 2 and totals.stats.count == 0


def test_iter_records_in_unit_order_beyond_the_prefetch_window():
    output = f"memory://finalize-{uuid.uuid4().hex[:8]}"
    units = PREFETCH + 5
    for unit in range(units):
        write_record(output, {"unit": unit})
    assert [r["unit"] for r in iter_records(output, units)] == list(range(units))
    assert [r["unit"] for r in iter_records(output, 3)] == [0, 1, 2]
    with pytest.raises(FileNotFoundError):
        list(iter_records(output, units + 1))


def test_atomic_stream_on_local_disk_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "list.jsonl"
    stream = AtomicStream(str(target))
    stream.line({"a": 1})
    stream.write(b"raw\n")
    stream.line({"b": 2})
    assert not target.exists()  # nothing under the final name until it is complete
    digest = stream.close()
    data = target.read_bytes()
    assert data == b'{"a": 1}\nraw\n{"b": 2}\n'
    assert digest == hashlib.sha256(data).hexdigest() and stream.lines == 2
    assert os.listdir(target.parent) == ["list.jsonl"]


def test_atomic_stream_on_memory():
    url = f"memory://finalize-{uuid.uuid4().hex[:8]}/x.jsonl"
    stream = AtomicStream(url)
    stream.line({"a": 1})
    digest = stream.close()
    assert FS.cat_file(url) == b'{"a": 1}\n'
    assert digest == hashlib.sha256(b'{"a": 1}\n').hexdigest()
