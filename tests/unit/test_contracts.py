"""The v3 manifest contract: validation on load, exact round trips, pinned and streamed .jsonl."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import uuid

import fsspec
import numpy as np
import pytest

from pipeline.contracts.layout import MANIFEST_VERSION, join_url
from pipeline.contracts.manifest import (
    CorpusError,
    InputLineage,
    Manifest,
    ShardEntry,
    iter_inputs,
    iter_shard_entries,
    load_manifest,
    manifest_shards,
    write_jsonl,
)
from tests.latent_corpus import Sample, random_samples, write_corpus

WHERE = "corpus/manifest.json"


def memory_dir() -> str:
    return f"memory://contracts-{uuid.uuid4().hex}"


@pytest.fixture
def corpus():
    directory = memory_dir()
    return directory, write_corpus(directory, [random_samples("a", 3), random_samples("b", 2)])


def stored_manifest(directory: str) -> dict:
    with fsspec.open(join_url(directory, "manifest.json"), "rt") as f:
        return json.load(f)


def test_manifest_round_trips_exactly(corpus):
    directory, written = corpus
    data = stored_manifest(directory)
    manifest = load_manifest(directory)
    assert manifest == written.manifest and manifest.to_dict() == data
    assert data["format_version"] == MANIFEST_VERSION == 3
    # A summary only: neither the shard list nor the input list is in it.
    assert "shards" not in data and "inputs" not in data
    assert (data["shards_file"], data["inputs_file"]) == ("shards.jsonl", "inputs.jsonl")
    assert data["shard_count"] == 2 and data["input_count"] == 2 and data["empty_inputs"] == 0
    assert manifest.sidecar.model_kind == "kl" and not manifest.is_vq


def test_unknown_keys_survive_a_round_trip(corpus):
    data = corpus[1].manifest.to_dict() | {"added_later": {"x": 1}}
    manifest = Manifest.from_dict(data, WHERE)
    assert manifest.extra == {"added_later": {"x": 1}} and manifest.to_dict() == data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=2), "format_version 2, this latentpipe reads 3"),
        (lambda d: d.update(format="other"), "not a latentpipe latent manifest"),
        (lambda d: d.pop("shards_sha256"), f"{WHERE}: missing required field 'shards_sha256'"),
        (lambda d: d.update(samples="5"), "field 'samples' must be an integer, got '5'"),
        (lambda d: d.update(rejects=-1), "field 'rejects' must be an integer >= 0"),
        (lambda d: d.update(fp16_retries=True), "field 'fp16_retries' must be an integer"),
        (lambda d: d.update(shift_factor=None), "non-numeric 'shift_factor'; cannot scale"),
        (
            lambda d: d["latent"].update(kind="pixels"),
            "field 'latent.kind' must be one of ['posterior_mean', 'posterior_sample', "
            "'vq_indices']",
        ),
        (
            lambda d: d["latent"].update(dtype="float64"),
            "field 'latent.dtype' must be one of ['float16', 'bfloat16', 'float32']",
        ),
        (
            lambda d: d["latent"].update(field="indices.npy"),
            "field 'latent.field' must be one of ['latent.npy']",
        ),
        (
            lambda d: d["latent"].update(storage_dtype="float32"),
            "field 'latent.storage_dtype' must be one of ['float16']",
        ),
        (lambda d: d.update(shards_file="../x.jsonl"), "'shards_file' must be a plain file name"),
        (
            lambda d: d["encoder"]["sidecar"].pop("onnx_sha256"),
            f"{WHERE}: encoder.sidecar: missing required field 'onnx_sha256'",
        ),
    ],
)
def test_manifest_fields_are_validated_naming_field_and_file(corpus, edit, message):
    data = corpus[1].manifest.to_dict()
    edit(data)
    with pytest.raises(CorpusError, match=re.escape(message)):
        Manifest.from_dict(data, WHERE)


def test_vq_latent_block_needs_its_codebook_fields(tmp_path):
    codebook = np.zeros((4, 3), np.float32)
    written = write_corpus(
        str(tmp_path),
        [[Sample("v", np.zeros((2, 2), np.uint16))]],
        dtype="uint16",
        codebook=codebook,
    )
    data = written.manifest.to_dict()
    assert Manifest.from_dict(data, WHERE).latent.lookup_shape == [3, 2, 2]
    del data["latent"]["codebook_sha256"]
    with pytest.raises(CorpusError, match="missing required field 'latent.codebook_sha256'"):
        Manifest.from_dict(data, WHERE)


def test_shard_and_input_records_stream_in_order(corpus):
    directory, written = corpus
    manifest = load_manifest(directory)
    assert list(iter_shard_entries(directory, manifest)) == written.shards
    assert manifest_shards(directory, manifest) == written.shards
    lineage = list(iter_inputs(directory, manifest))
    assert lineage == written.inputs and [r.unit for r in lineage] == [0, 1]
    assert lineage[1].shards == [written.shards[1].name] and lineage[1].samples == 2


def rewrite(directory: str, name: str, text: str) -> None:
    with fsspec.open(join_url(directory, name), "wt") as f:
        f.write(text)


def test_a_changed_shard_list_fails_after_the_last_entry(corpus):
    directory, written = corpus
    manifest = load_manifest(directory)
    lines = [json.dumps(e.to_dict()) + "\n" for e in written.shards]
    rewrite(directory, "shards.jsonl", lines[0] + lines[1].replace('"samples": 2', '"samples": 3'))
    seen = []
    with pytest.raises(CorpusError, match="sha256 of .*shards.jsonl is .* the manifest records"):
        for entry in iter_shard_entries(directory, manifest):
            seen.append(entry.name)
    assert len(seen) == 2  # streamed: the check comes at the end
    with pytest.raises(CorpusError, match="sha256"):
        manifest_shards(directory, manifest)  # the list: checked before it is returned


def test_a_truncated_input_list_is_refused(corpus):
    directory, written = corpus
    manifest = load_manifest(directory)
    digest = write_jsonl(join_url(directory, "inputs.jsonl"), written.inputs[:1])
    pinned = dataclasses.replace(manifest, inputs_sha256=digest.sha256)  # even with its hash
    with pytest.raises(CorpusError, match="holds 1 records, the manifest says 2"):
        list(iter_inputs(directory, pinned))


def test_malformed_records_name_file_and_line(corpus):
    directory, written = corpus
    manifest = load_manifest(directory)
    bad = written.shards[0].to_dict() | {"bytes": "many"}
    digest = write_jsonl(join_url(directory, "shards.jsonl"), [written.shards[1], bad])
    pinned = dataclasses.replace(manifest, shards_sha256=digest.sha256)
    with pytest.raises(CorpusError, match=r"shards.jsonl line 2: field 'bytes' must be an integer"):
        manifest_shards(directory, pinned)
    rewrite(directory, "inputs.jsonl", "{not json\n")
    with pytest.raises(CorpusError, match=r"inputs.jsonl line 1 is not valid JSON"):
        list(iter_inputs(directory, manifest))
    fsspec.filesystem("memory").rm(join_url(directory, "inputs.jsonl"))
    with pytest.raises(CorpusError, match="inputs.jsonl is pinned by the manifest but does not"):
        list(iter_inputs(directory, manifest))


def test_records_validate_their_fields():
    entry = {
        "name": "a/b.tar",
        "samples": 1,
        "bytes": 2,
        "sha256": "x",
        "unit": 0,
        "source": "s",
        "bucket": None,
        "latent_shape": [4, 2, 2],
    }
    with pytest.raises(CorpusError, match="'name' must be a plain file name"):
        ShardEntry.from_dict(entry, "shards.jsonl line 1")
    with pytest.raises(CorpusError, match=r"'bucket' must be a list of 2 integers"):
        ShardEntry.from_dict(entry | {"name": "a.tar", "bucket": [8]}, "x")
    record = {
        "unit": 0,
        "url": "u",
        "fingerprint": {"size": 3},
        "rows": 1,
        "samples": 1,
        "rejects": 0,
        "shards": ["a.tar", 7],
    }
    with pytest.raises(CorpusError, match="'shards' must be a list of strings"):
        InputLineage.from_dict(record, "inputs.jsonl line 1")


def test_write_jsonl_hashes_what_it_writes(tmp_path):
    url = str(tmp_path / "sub" / "x.jsonl")
    digest = write_jsonl(url, [{"a": 1}, {"b": [2]}])
    data = (tmp_path / "sub" / "x.jsonl").read_bytes()
    assert data == b'{"a": 1}\n{"b": [2]}\n' and digest.count == 2
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.jsonl"]  # no leftovers


def test_contracts_is_a_leaf_package():
    """stdlib, numpy and fsspec only: nothing of the other pipeline packages, no torch/Ray."""
    code = (
        "import sys, pipeline.contracts;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'onnx') "
        "or (m.startswith('pipeline.') and not m.startswith('pipeline.contracts')));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
