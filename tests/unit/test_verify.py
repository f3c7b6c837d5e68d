"""`latentpipe verify` on hand-built corpora encoded by a tiny real autoencoder."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import shutil
import uuid

import numpy as np
import pytest
import torch

from pipeline.artifacts import artifact_sha256
from pipeline.cli import main
from pipeline.data.images import normalize
from pipeline.encode.preprocess import PreprocessConfig, prepare_image
from pipeline.latents.format import join_url, write_bytes_atomic
from pipeline.models import ModelConfig, build_model
from pipeline.verify import VerifyConfig, psnr_db, verify_corpus
from tests.latent_corpus import (
    Sample,
    encode_images,
    kl_sidecar,
    png_bytes,
    random_samples,
    rewrite_shard,
    smooth_image,
    tamper,
    write_corpus,
    write_model_artifact,
    write_tar,
)

IMAGES = [png_bytes(smooth_image(20, 24, seed)) for seed in range(5)]  # resized and cropped
TRAIN_STEPS = 80  # enough for latents to decode clearly better than noise (~1-3 s on CPU)


def overfit(model, images: list[bytes], steps: int) -> None:
    """A few Adam steps of L1 reconstruction on ``images`` (preprocessed as the job does), so
    the decoder is no longer blind to its latents the way an untrained one is."""
    preprocess = PreprocessConfig(mode="center_crop", resolution=16)
    preprocess.bucket_area = 16**2  # resolved, as encode_images resolves it
    x = torch.from_numpy(np.stack([normalize(prepare_image(i, preprocess).pixels) for i in images]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = (model.decode(model.encode(x).mean) - x).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    """(model, model artifact dir, the sidecar's record of it) of a tiny f2 KL model fitted to
    the test images in a few dozen steps."""
    torch.manual_seed(0)
    cfg = ModelConfig(ch=8, ch_mult=[1, 2], z_channels=4, groups=4, num_res_blocks=1)
    model = build_model(cfg)
    overfit(model, IMAGES, TRAIN_STEPS)
    model.eval()
    directory = write_model_artifact(str(tmp_path_factory.mktemp("model")), model, cfg)
    record = {"path": directory, "sha256": artifact_sha256(directory), "step": 0}
    return model, directory, record


@pytest.fixture(scope="module")
def encoded(autoencoder, tmp_path_factory):
    """Two input shards (3 + 2 images, 20x24 so preprocessing resizes and crops) + encodings."""
    model, _, _ = autoencoder
    shards = [
        [(f"img{i}", IMAGES[i], f"caption {i}") for i in range(3)],
        [(f"img{i}", IMAGES[i], f"caption {i}") for i in range(3, 5)],
    ]
    inputs, units, preprocess = encode_images(str(tmp_path_factory.mktemp("input")), model, shards)
    return inputs, units, preprocess


def build(directory: str, encoded, model_ref: dict, edit=None, quality=None, **options):
    """Write the encoded corpus into ``directory``; ``edit(units, rejects)`` may break it.
    ``quality`` is what the encoder's sidecar records of the autoencoder's held-out figures."""
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
        sidecar=kl_sidecar(model_ref, quality=quality),
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
    assert 0 < report["psnr_db_min"] < 60  # a barely trained decoder: poor, but not noise
    assert report["inputs"] == 2 and report["changed_inputs"] == 0
    assert any("records no held-out PSNR" in w for w in report["warnings"])
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
    corpus = build(str(tmp_path), encoded, autoencoder[2])
    tamper(join_url(str(tmp_path), corpus.shards[0].name))
    report = verify_corpus(VerifyConfig(output=str(tmp_path), samples=2))
    assert not report["ok"]
    assert any("sha256 of" in e and corpus.shards[0].name in e for e in report["errors"])
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


def test_decoder_must_be_the_encoders_model(tmp_path, encoded, autoencoder):
    record = dict(autoencoder[2], sha256="0" * 64)
    build(str(tmp_path / "a"), encoded, record)
    report = verify_corpus(VerifyConfig(output=str(tmp_path / "a"), samples=2))
    assert not report["ok"] and report["decoded"] == 0
    assert any("not the model the encoder was exported from" in e for e in report["errors"])
    build(str(tmp_path / "b"), encoded, dict(autoencoder[2], path=str(tmp_path / "gone")))
    report = verify_corpus(VerifyConfig(output=str(tmp_path / "b"), samples=2))
    assert any("decoder:" in e and "is not a model artifact" in e for e in report["errors"])


def test_explicit_decoder_and_skipped_input_check(tmp_path, encoded, autoencoder):
    _, model_dir, _ = autoencoder
    build(str(tmp_path), encoded, {"path": "", "sha256": None, "step": 0})
    report = verify_corpus(
        VerifyConfig(output=str(tmp_path), decoder=model_dir, samples=10, check_input=False)
    )
    assert report["ok"], report["errors"]
    assert report["decoded"] == 5 and report["input_keys"] is None


def test_psnr_db():
    a = np.zeros((2, 2, 3), np.uint8)
    assert psnr_db(a, a) == 100.0
    assert psnr_db(a, a + 255) == pytest.approx(0.0)


def test_cli_exits_1_when_a_check_fails(tmp_path, encoded, autoencoder, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    build(str(good), encoded, autoencoder[2])
    corpus = build(str(bad), encoded, autoencoder[2])
    tamper(join_url(str(bad), corpus.shards[1].name))
    assert main(["verify", f"output={good}", "samples=1"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["verify", f"output={bad}", "samples=0"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


# ----------------------------------------------------------------------------- stored values


def quick(directory: str, **options) -> dict:
    """verify without the input (these corpora's inputs are made up) and without decoding."""
    cfg = VerifyConfig(
        output=directory, samples=0, check_input=False, check_fingerprints=False, **options
    )
    return verify_corpus(cfg)


@pytest.mark.parametrize(
    ("value", "dtype", "what"),
    [
        (np.nan, "float32", "1 NaN, 0 inf"),
        (np.inf, "bfloat16", "0 NaN, 1 inf"),
        (70000.0, "float16", "0 NaN, 1 inf"),  # past float16's 65,504: stored as inf
    ],
)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_non_finite_latent_is_an_error_naming_shard_and_key(tmp_path, value, dtype, what):
    units = [random_samples("a", 3), random_samples("b", 2, seed=1)]
    units[1][1].latent[2, 1, 3] = value
    corpus = write_corpus(str(tmp_path), units, dtype=dtype)
    report = quick(str(tmp_path))
    assert not report["ok"]
    assert report["errors"] == [
        f"{corpus.shards[1].name}: sample 'b001': latent.npy holds 1 non-finite value(s) "
        f"({what}) of 64"
    ]


def test_non_finite_std_is_an_error(tmp_path):
    std = np.full((4, 4, 4), 0.1, np.float32)
    bad = std.copy()
    bad[0, 0, :2] = np.nan
    samples = [Sample("s0", np.zeros((4, 4, 4), np.float32), std=std)]
    samples.append(Sample("s1", np.zeros((4, 4, 4), np.float32), std=bad))
    corpus = write_corpus(str(tmp_path), [samples], dtype="float32")
    (error,) = quick(str(tmp_path))["errors"]
    assert error.startswith(f"{corpus.shards[0].name}: sample 's1': std.npy holds 2 non-finite")


def test_vq_index_outside_the_codebook_is_an_error(tmp_path):
    codebook = np.arange(12, dtype=np.float32).reshape(4, 3)  # 4 codes
    good = np.array([[0, 1], [2, 3]], np.uint16)
    bad = np.array([[0, 9], [4, 3]], np.uint16)
    units = [[Sample("v0", good), Sample("v1", bad)]]
    corpus = write_corpus(str(tmp_path), units, dtype="uint16", codebook=codebook)
    assert quick(str(tmp_path))["errors"] == [
        f"{corpus.shards[0].name}: sample 'v1': 2 code index(es) outside the codebook's "
        "[0, 4) (they span [0, 9])"
    ]


def test_damaged_shard_list_is_an_error(tmp_path):
    write_corpus(str(tmp_path), [random_samples("a", 3), random_samples("b", 2, seed=1)])
    path = tmp_path / "shards.jsonl"
    path.write_text(path.read_text().replace('"samples": 2', '"samples": 3'))
    report = quick(str(tmp_path))
    assert any("sha256 of" in e and "shards.jsonl" in e for e in report["errors"])


# ----------------------------------------------------------------------------- decoded quality


def test_latents_replaced_by_noise_fail_the_psnr_check(tmp_path, encoded, autoencoder):
    """Noise with the latents' own scale, hashes and counts fixed up: every checksum passes and
    only the decoded PSNR, against the sidecar's recorded quality, can tell."""
    record = autoencoder[2]
    build(str(tmp_path / "probe"), encoded, record)
    clean = verify_corpus(VerifyConfig(output=str(tmp_path / "probe"), samples=5))
    recorded = round(clean["psnr_db"], 1)  # as if training had measured the same figure
    quality = {"psnr_db": recorded, "ssim": 0.5, "images": 5}
    build(str(tmp_path / "good"), encoded, record, quality=quality)
    report = verify_corpus(VerifyConfig(output=str(tmp_path / "good"), samples=5))
    assert report["ok"], report["errors"]
    assert report["psnr_db_recorded"] == recorded

    noisy = build(str(tmp_path / "noisy"), encoded, record, quality=quality)
    rng = np.random.default_rng(0)
    for position, unit in enumerate(encoded[1]):
        noise = [
            Sample(
                s.key,
                rng.normal(size=s.latent.shape).astype(np.float32) * s.latent.std(),
                caption=s.caption,
                sizes=s.sizes,
            )
            for s in unit
        ]
        noisy = rewrite_shard(str(tmp_path / "noisy"), noisy, position, noise)
    report = verify_corpus(VerifyConfig(output=str(tmp_path / "noisy"), samples=5))
    assert not report["ok"] and len(report["errors"]) == 1, report["errors"]
    decoded = report["psnr_db"]
    assert decoded < recorded - 3
    assert report["errors"][0] == (
        f"decoded PSNR {decoded:.1f} dB is {recorded - decoded:.1f} dB below the "
        f"{recorded:.1f} dB the encoder's sidecar records (margin 3.0 dB): the latents do not "
        "decode to their images"
    )
    # A margin wider than the gap lets it pass (with the figures still in the report).
    margin = math.ceil(recorded - decoded) + 1
    relaxed = verify_corpus(
        VerifyConfig(output=str(tmp_path / "noisy"), samples=5, psnr_margin_db=margin)
    )
    assert relaxed["ok"], relaxed["errors"]


# ----------------------------------------------------------------------------- input fingerprints


def copied_inputs(encoded, directory) -> tuple:
    """``encoded`` with its input shards copied into ``directory`` (the fixture's stay intact)."""
    inputs, units, preprocess = encoded
    directory.mkdir()
    copies = [str(directory / f"images-{i:06d}.tar") for i in range(len(inputs))]
    for source, target in zip(inputs, copies, strict=True):
        shutil.copyfile(source, target)
    return copies, units, preprocess


def test_changed_input_shard_is_an_error_naming_it(tmp_path, encoded, autoencoder):
    mine = copied_inputs(encoded, tmp_path / "input")
    build(str(tmp_path / "corpus"), mine, autoencoder[2])
    assert verify_corpus(VerifyConfig(output=str(tmp_path / "corpus"), samples=0))["ok"]
    changed = mine[0][1]
    # Same name, same keys, one image replaced: what a re-crawl under the same URL does.
    swapped = [(f"img{i}", {"png": IMAGES[0], "txt": b"x"}) for i in range(3, 5)]
    write_tar(changed, swapped)
    report = verify_corpus(
        VerifyConfig(output=str(tmp_path / "corpus"), samples=0, check_input=False)
    )
    assert not report["ok"] and report["changed_inputs"] == 1
    (error,) = report["errors"]
    # Tar padding keeps the size here; the fingerprint still moves (local disk: mtime, inode).
    assert error.startswith(f"input shard {changed} changed after it was encoded: ")
    assert "mtime" in error and "re-run the encode command" in error


def test_removed_input_shard_is_an_error(tmp_path, encoded, autoencoder):
    mine = copied_inputs(encoded, tmp_path / "input")
    build(str(tmp_path / "corpus"), mine, autoencoder[2])
    (tmp_path / "input" / "images-000000.tar").unlink()
    report = verify_corpus(
        VerifyConfig(output=str(tmp_path / "corpus"), samples=0, check_input=False)
    )
    assert report["errors"] == [
        f"input shard {mine[0][0]} changed after it was encoded: it no longer exists (its "
        "latents may be stale; re-run the encode command to re-encode it)"
    ]
    skipped = VerifyConfig(
        output=str(tmp_path / "corpus"), samples=0, check_input=False, check_fingerprints=False
    )
    assert verify_corpus(skipped)["ok"]


def test_lineage_must_agree_with_the_shards(tmp_path):
    corpus = write_corpus(str(tmp_path), [random_samples("a", 3), random_samples("b", 2, seed=1)])
    lineage = [json.loads(line) for line in (tmp_path / "inputs.jsonl").read_text().splitlines()]
    lineage[1]["samples"] = 5
    text = "".join(json.dumps(record) + "\n" for record in lineage)
    (tmp_path / "inputs.jsonl").write_text(text)
    manifest = dataclasses.replace(
        corpus.manifest, inputs_sha256=hashlib.sha256(text.encode()).hexdigest()
    )
    (tmp_path / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    (error,) = quick(str(tmp_path))["errors"]
    assert re.search(r"1 input\(s\) in inputs.jsonl record another number .*\(5 vs 2\)", error)
