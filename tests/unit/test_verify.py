"""`latentpipe verify` on hand-built corpora encoded by a tiny real (untrained) autoencoder."""

from __future__ import annotations

import copy
import json
import math
import uuid

import pytest
import torch

from pipeline.cli import main
from pipeline.export.sidecar import file_sha256
from pipeline.latents.format import join_url, write_bytes_atomic
from pipeline.latents.verify import VerifyConfig, psnr_db, verify_corpus
from pipeline.models import ModelConfig, build_model
from pipeline.train.checkpoint import STATE_FILE
from tests.latent_corpus import (
    encode_images,
    kl_sidecar,
    png_bytes,
    smooth_image,
    tamper,
    write_checkpoint_dir,
    write_corpus,
)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    """(model, checkpoint dir, sidecar checkpoint record) of an untrained f2 KL model."""
    torch.manual_seed(0)
    cfg = ModelConfig(ch=8, ch_mult=[1, 2], z_channels=4, groups=4)
    model = build_model(cfg).eval()
    directory = write_checkpoint_dir(str(tmp_path_factory.mktemp("ckpt")), model, cfg)
    record = {"path": directory, "step": 0, "sha256": file_sha256(join_url(directory, STATE_FILE))}
    return model, directory, record


@pytest.fixture(scope="module")
def encoded(autoencoder, tmp_path_factory):
    """Two input shards (3 + 2 images, 20x24 so preprocessing resizes and crops) + encodings."""
    model, _, _ = autoencoder
    images = [png_bytes(smooth_image(20, 24, seed)) for seed in range(5)]
    shards = [
        [(f"img{i}", images[i], f"caption {i}") for i in range(3)],
        [(f"img{i}", images[i], f"caption {i}") for i in range(3, 5)],
    ]
    inputs, units, preprocess = encode_images(str(tmp_path_factory.mktemp("input")), model, shards)
    return inputs, units, preprocess


def build(directory: str, encoded, checkpoint: dict, edit=None, **options) -> dict:
    """Write the encoded corpus into ``directory``; ``edit(units, rejects)`` may break it."""
    inputs, units, preprocess = encoded
    units = copy.deepcopy(units)
    rejects = options.pop("rejects", [])
    if edit is not None:
        edit(units, rejects, inputs)
    return write_corpus(
        directory,
        units,
        dtype="float32",
        inputs=inputs,
        rejects=rejects,
        sidecar=kl_sidecar(checkpoint),
        preprocess=preprocess,
        **options,
    )


def reject_img1(units, rejects, inputs):
    """img1 rejected by the job (as a bad image) instead of encoded: a legitimate decision."""
    units[0].pop(1)
    rejects.append({"key": "img1", "shard": inputs[0], "reason": "bad image: test"})


def test_clean_corpus_passes_with_a_finite_psnr(tmp_path, encoded, autoencoder):
    _, _, record = autoencoder
    directory = f"memory://verify-{uuid.uuid4().hex}"
    build(directory, encoded, record, edit=reject_img1)
    report = verify_corpus(VerifyConfig(output=directory, samples=3, seed=1))
    assert report["ok"], report["errors"]
    assert report["errors"] == [] and report["uncommitted_files"] == []
    assert (report["shards"], report["samples"], report["rejects"]) == (2, 4, 1)
    assert report["input_keys"] == 5 and report["decoded"] == 3
    assert math.isfinite(report["psnr_db"]) and report["psnr_db_min"] <= report["psnr_db"]
    assert 0 < report["psnr_db_min"] < 60  # an untrained decoder reconstructs poorly, not exactly
    with __import__("fsspec").open(join_url(directory, "verify.json"), "rt") as f:
        assert json.load(f) == report


def test_missing_key_is_an_error(tmp_path, encoded, autoencoder):
    def drop_img4(units, rejects, inputs):
        units[1].pop()  # img4: neither a latent nor a reject

    build(str(tmp_path), encoded, autoencoder[2], edit=drop_img4)
    report = verify_corpus(VerifyConfig(output=str(tmp_path), samples=0))
    assert not report["ok"]
    assert any(
        "neither in a latent shard nor in rejects" in e and "'img4'" in e for e in report["errors"]
    )


def test_duplicated_key_is_an_error(tmp_path, encoded, autoencoder):
    def duplicate_img0(units, rejects, inputs):
        units[1].append(copy.deepcopy(units[0][0]))

    build(str(tmp_path), encoded, autoencoder[2], edit=duplicate_img0)
    report = verify_corpus(VerifyConfig(output=str(tmp_path), samples=0))
    assert not report["ok"]
    assert any("more than once in the latent shards: 'img0'" in e for e in report["errors"])
    assert any("whose source input does not hold their key" in e for e in report["errors"])


def test_checksum_mismatch_is_an_error(tmp_path, encoded, autoencoder):
    manifest = build(str(tmp_path), encoded, autoencoder[2])
    tamper(join_url(str(tmp_path), manifest["shards"][0]["name"]))
    report = verify_corpus(VerifyConfig(output=str(tmp_path), samples=2))
    assert not report["ok"]
    assert any("sha256 of" in e and manifest["shards"][0]["name"] in e for e in report["errors"])
    # The damaged shard's keys count as absent too: the job's decisions cannot be trusted.
    assert any("neither in a latent shard" in e for e in report["errors"])


def test_uncommitted_file_is_a_warning_only(tmp_path, encoded, autoencoder):
    build(str(tmp_path), encoded, autoencoder[2])
    write_bytes_atomic(join_url(str(tmp_path), "latents-000042.tar"), b"left over")
    report = verify_corpus(VerifyConfig(output=str(tmp_path), samples=1))
    assert report["ok"], report["errors"]
    assert report["uncommitted_files"] == ["latents-000042.tar"]
    assert any("latents-000042.tar" in w for w in report["warnings"])


def test_keyless_reject_needs_a_damaged_shard(tmp_path, encoded, autoencoder):
    def keyless(units, rejects, inputs):
        rejects.append({"key": None, "shard": inputs[1], "reason": "truncated shard: x"})
        rejects.append({"key": None, "shard": inputs[1], "reason": "bad image: ?"})

    build(str(tmp_path), encoded, autoencoder[2], edit=keyless)
    report = verify_corpus(VerifyConfig(output=str(tmp_path), samples=0, check_input=True))
    assert [e for e in report["errors"] if "without a key" in e] == [
        f"reject without a key for a sound shard: "
        f"{{'key': None, 'shard': '{encoded[0][1]}', 'reason': 'bad image: ?'}}"
    ]
    assert len(report["errors"]) == 1


def test_decoder_must_be_the_encoders_checkpoint(tmp_path, encoded, autoencoder):
    record = dict(autoencoder[2], sha256="0" * 64)
    build(str(tmp_path), encoded, record)
    report = verify_corpus(VerifyConfig(output=str(tmp_path), samples=2))
    assert not report["ok"] and report["decoded"] == 0
    assert any("not the checkpoint the encoder was exported from" in e for e in report["errors"])


def test_explicit_decoder_and_skipped_input_check(tmp_path, encoded, autoencoder):
    _, checkpoint, _ = autoencoder
    build(str(tmp_path), encoded, {"path": "", "step": 0, "sha256": None})
    report = verify_corpus(
        VerifyConfig(output=str(tmp_path), decoder=checkpoint, samples=10, check_input=False)
    )
    assert report["ok"], report["errors"]
    assert report["decoded"] == 5 and report["input_keys"] is None


def test_psnr_db():
    import numpy as np

    a = np.zeros((2, 2, 3), np.uint8)
    assert psnr_db(a, a) == 100.0
    assert psnr_db(a, a + 255) == pytest.approx(0.0)


def test_cli_exits_1_when_a_check_fails(tmp_path, encoded, autoencoder, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    build(str(good), encoded, autoencoder[2])
    manifest = build(str(bad), encoded, autoencoder[2])
    tamper(join_url(str(bad), manifest["shards"][1]["name"]))
    assert main(["verify", f"output={good}", "samples=1"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["verify", f"output={bad}", "samples=0"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
