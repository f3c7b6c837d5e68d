"""Guarantees of the distributed encode job on embedded Ray: byte-identical output whatever the
actor count, batch size or completion order; changed inputs encoded again; one job per output;
encoders that overflow the storage dtype stopped before they write a corpus of rejects."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import fsspec
import numpy as np
import pytest

from pipeline.contracts.sidecar import file_sha256, load_sidecar, sidecar_path
from pipeline.encode import EncodeConfig, StorageConfig, encode_corpus
from pipeline.encode.job import EncodeOverflowError
from pipeline.encode.lease import Lease, LeaseHeldError, LeaseOwner
from pipeline.latents.format import commit_url
from tests.latent_corpus import png_bytes, smooth_image, write_tar

# Files whose bytes must not depend on how the job was scheduled.
CORPUS_FILES = ("rejects.jsonl", "shards.jsonl", "inputs.jsonl", "index.json")


def _samples(unit: int, count: int, seed: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (
            f"u{unit}_{i}",
            {
                "png": png_bytes(smooth_image(20, 24, seed * 1000 + unit * 100 + i)),
                "txt": f"caption {unit} {i}".encode(),
            },
        )
        for i in range(count)
    ]


def _write_corpus(root: str, units: int = 4, per_unit: int = 5) -> str:
    os.makedirs(root, exist_ok=True)
    for unit in range(units):
        samples = _samples(unit, per_unit)
        if unit == 2:  # a cross-shard duplicate and a bad image
            samples.append(("u0_1", samples[0][1]))
            samples.append(("broken", {"png": b"\x89PNG\r\n\x1a\n not an image"}))
        write_tar(os.path.join(root, f"shard-{unit:06d}.tar"), samples)
    return root


def _corpus_bytes(out: str) -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(out)
    names = [n for n in fs.ls(path, detail=False) if n.endswith(".tar")]
    files = {os.path.basename(n): fs.cat_file(n) for n in names}
    for name in CORPUS_FILES:
        files[name] = fs.cat_file(f"{path}/{name}")
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return _write_corpus(str(tmp_path_factory.mktemp("images")))


@pytest.fixture(scope="module")
def reference(ray_local, corpus, tiny_encoder, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("reference"))
    cfg = EncodeConfig(input=corpus, output=out, encoder=tiny_encoder, batch_size=4, num_actors=1)
    manifest = encode_corpus(cfg)
    return {"cfg": cfg, "manifest": manifest, "files": _corpus_bytes(out), "dir": out}


def test_reference_decides_every_key_once(reference):
    manifest = reference["manifest"]
    assert manifest.samples == 20 and manifest.rejects == 2 and manifest.duplicate_rejects == 1
    rejects = [json.loads(line) for line in reference["files"]["rejects.jsonl"].splitlines()]
    assert [(r["key"], r["reason"].split(":")[0].split(" (")[0]) for r in rejects] == [
        ("broken", "bad image"),
        ("u0_1", "duplicate key"),
    ]


@pytest.mark.parametrize(
    "change", [{"num_actors": 2, "batch_size": 3}, {"num_actors": 2, "batch_size": 1}]
)
def test_output_is_byte_identical_whatever_the_schedule(ray_local, reference, tmp_path, change):
    """Two actors finish units in whatever order they like; the bytes do not change."""
    cfg = dataclasses.replace(reference["cfg"], output=str(tmp_path / "out"), **change)
    encode_corpus(cfg)
    assert _corpus_bytes(cfg.output) == reference["files"]


def test_resume_after_lost_commits_is_byte_identical(ray_local, reference, tmp_path):
    """Units that lost their commit record (a crash before it) are redone; the duplicate that
    an earlier unit resolved is resolved again the same way."""
    out = str(tmp_path / "out")
    shutil.copytree(reference["dir"], out)
    for unit in (0, 2):
        os.remove(commit_url(out, unit))
    os.remove(os.path.join(out, "manifest.json"))
    cfg = dataclasses.replace(reference["cfg"], output=out, num_actors=2)
    manifest = encode_corpus(cfg)
    assert _corpus_bytes(out) == reference["files"]
    assert manifest.runs == 2


def test_changed_input_is_encoded_again(ray_local, tiny_encoder, tmp_path, caplog):
    """A finished corpus whose input shard was rewritten under the same name is reopened and
    only that shard is encoded again; the lineage records the new fingerprint."""
    images = _write_corpus(str(tmp_path / "images"), units=3, per_unit=4)
    out = str(tmp_path / "out")
    cfg = EncodeConfig(input=images, output=out, encoder=tiny_encoder)
    first = encode_corpus(cfg)
    changed = os.path.join(images, "shard-000001.tar")
    write_tar(changed, _samples(1, 4, seed=7))  # same keys, other pictures
    untouched = os.path.getmtime(os.path.join(out, "latents-000000.tar"))
    with caplog.at_level("WARNING", logger="pipeline.encode.job"):
        second = encode_corpus(cfg)
    assert "shard-000001.tar" in caplog.text and "changed" in caplog.text
    assert os.path.getmtime(os.path.join(out, "latents-000000.tar")) == untouched
    assert second.samples == first.samples and second.inputs_sha256 != first.inputs_sha256
    lineage = [json.loads(line) for line in open(os.path.join(out, "inputs.jsonl"))]
    assert lineage[1]["fingerprint"]["size"] == os.path.getsize(changed)
    record = json.load(open(commit_url(out, 1)))
    assert record["fingerprint"] == lineage[1]["fingerprint"]
    # And in an unfinished corpus: the stale commit is not trusted either.
    os.remove(os.path.join(out, "manifest.json"))
    write_tar(changed, _samples(1, 2, seed=8))
    third = encode_corpus(cfg)
    assert third.samples == first.samples - 2


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_job_on_the_same_output_is_refused(ray_local, corpus, tiny_encoder, tmp_path, where):
    out = str(tmp_path / "out") if where == "local" else f"s3://latentpipe-test/{tmp_path.name}"
    running = LeaseOwner.current("other-run", job="raysubmit_123")
    with Lease.acquire(out, running, ttl_s=60):
        cfg = EncodeConfig(input=corpus, output=out, encoder=tiny_encoder)
        with pytest.raises(LeaseHeldError, match="other-run") as err:
            encode_corpus(cfg)
    assert "raysubmit_123" in str(err.value)
    fs, path = fsspec.core.url_to_fs(out)
    assert not fs.exists(f"{path}/_encode/commits")  # the refused job wrote nothing


def _scaled_encoder(src: str, dst_dir: str, factor: float) -> str:
    """A copy of the encoder whose posterior mean is multiplied by ``factor`` (re-hashed)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(src)
    graph = model.graph
    producer = next(node for node in graph.node if "mean" in node.output)
    producer.output[list(producer.output).index("mean")] = "mean_unscaled"
    graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "mean_factor"))
    graph.node.append(helper.make_node("Mul", ["mean_unscaled", "mean_factor"], ["mean"]))
    os.makedirs(dst_dir, exist_ok=True)
    onnx_path = os.path.join(dst_dir, "encoder.onnx")
    onnx.save(model, onnx_path)
    sidecar = json.load(open(sidecar_path(src)))
    sidecar["onnx_sha256"] = file_sha256(onnx_path)
    json.dump(sidecar, open(sidecar_path(onnx_path), "w"))
    load_sidecar(onnx_path)  # still a valid, hash-consistent sidecar
    return onnx_path


def test_systematic_float16_overflow_stops_before_a_corpus_of_rejects(
    ray_local, tiny_encoder, tmp_path
):
    images = _write_corpus(str(tmp_path / "images"), units=2, per_unit=20)
    encoder = _scaled_encoder(tiny_encoder, str(tmp_path / "enc"), 1e7)
    out = str(tmp_path / "out")
    cfg = EncodeConfig(input=images, output=out, encoder=encoder, overflow_min_samples=8)
    with pytest.raises(EncodeOverflowError, match=r"float16.*(bfloat16|float32)"):
        encode_corpus(cfg)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert not os.path.exists(commit_url(out, 0)) and not os.path.exists(commit_url(out, 1))
    wide = dataclasses.replace(
        cfg, output=str(tmp_path / "wide"), storage=StorageConfig(dtype="bfloat16")
    )
    manifest = encode_corpus(wide)
    assert manifest.samples == 40 and manifest.overflow_rejects == 0
