"""A tiny single-process run with every option of this file on: EMA of the weights, the
perceptual loss (random local LPIPS weights) and TensorBoard, on an object store (memory://,
so the event files take the upload path). What a person watching or using the run sees:
progress lines, metrics, TensorBoard scalars and images, both weights evaluated."""

from __future__ import annotations

import json
import logging
import re

import fsspec
import pytest
import torch

from pipeline.artifacts import load_model_artifact, read_card
from pipeline.config import load_config
from pipeline.train.config import TrainConfig, TrainRunConfig
from pipeline.train.run import train
from tests.conftest import TINY_TRAIN
from tests.lpips_files import lpips_files


def _event_files(run: str, local_dir) -> str:
    """Copy a run's TensorBoard files from the object store to read them with TensorBoard."""
    local_dir.mkdir(exist_ok=True)
    fs, root = fsspec.core.url_to_fs(run)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    events = sorted(n for n in names if n.startswith("events.out.tfevents."))
    for name in events:
        fs.get_file(f"{root}/{name}", str(local_dir / name))
    return str(local_dir)


def test_ema_lpips_and_tensorboard_in_one_run(sample_corpus, tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    vgg, lin = lpips_files(tmp_path)
    run = "memory://watch-runs/watch"
    overrides = [
        f"data.shards={sample_corpus['train']}",
        f"data.val_shards={sample_corpus['val']}",
        *TINY_TRAIN,
        "data.resolution=16",  # LPIPS's VGG16 dominates a step: 16 px keeps it cheap
        "data.batch_size=2",
        "train.storage_path=memory://watch-runs",
        "train.run_name=watch",
        "train.num_workers=0",
        "train.steps=4",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "train.image_every=2",
        "train.ema_decay=0.9",
        "train.eval_images=8",
        "loss.perceptual_weight=1.0",
        f"loss.lpips_vgg={vgg}",
        f"loss.lpips_lin={lin}",
    ]
    with caplog.at_level(logging.INFO, logger="latentpipe.train"):
        result = train(load_config(TrainRunConfig, None, overrides))

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2, lines
    pattern = r"step (\d)/4  grad_norm \S+  kl \S+  loss \S+  lpips \S+  recon \S+  [\d.]+ img/s  ETA \d+s"
    assert [re.fullmatch(pattern, line).group(1) for line in lines] == ["2", "4"]
    assert lines[-1].endswith("ETA 0s")

    fs = fsspec.filesystem("memory")
    records = [json.loads(x) for x in fs.cat_file("/watch-runs/watch/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records] == [2, 4, 4]
    assert records[0]["lpips"] > 0 and records[0]["recon"] > records[0]["lpips"]
    # Both weights evaluated on the same held-out images, each artifact with its own figures.
    figures = result["eval"]
    assert records[-1]["eval"] == figures and figures["images"] == figures["ema"]["images"] == 8
    assert figures["psnr_db"] != figures["ema"]["psnr_db"]
    checkpoint = result["checkpoint"]
    raw, ema = read_card(f"{checkpoint}/model"), read_card(f"{checkpoint}/model_ema")
    assert (raw.weights_kind, ema.weights_kind) == ("raw", "ema")
    assert ema.quality == figures["ema"] and raw.quality == {
        k: v for k, v in figures.items() if k != "ema"
    }
    assert ema.latent_scale.source == raw.latent_scale.source == "measured"

    accumulator = EventAccumulator(_event_files(run, tmp_path), size_guidance={"images": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    train_tags = {"train/loss", "train/recon", "train/kl", "train/lpips", "train/images_per_s"}
    assert train_tags | {"train/lr", "eval/psnr_db", "eval/ema/psnr_db"} <= scalars
    assert [e.step for e in accumulator.Scalars("train/loss")] == [2, 4]
    # TensorBoard stores float32
    assert accumulator.Scalars("train/lpips")[0].value == pytest.approx(records[0]["lpips"])
    assert accumulator.Scalars("eval/ema/ssim")[0].value == pytest.approx(figures["ema"]["ssim"])
    images = accumulator.Images("reconstructions")
    assert [e.step for e in images] == [2, 4]
    # originals, raw reconstructions, EMA reconstructions: three rows of 16 px images
    assert images[0].height == 3 * 16 and images[0].width % 16 == 0 and images[0].width >= 16

    # Resumed to step 6, the average goes on exactly as in a run never interrupted.
    more = ["train.steps=6", "train.eval_images=0"]  # the weights are compared, not figures
    train(load_config(TrainRunConfig, None, [*overrides, *more]))
    straight = [o.replace("run_name=watch", "run_name=straight") for o in overrides]
    train(load_config(TrainRunConfig, None, [*straight, *more]))
    resumed = load_model_artifact(f"{run}/checkpoint_00000006/model_ema")[0].state_dict()
    uninterrupted = load_model_artifact(
        "memory://watch-runs/straight/checkpoint_00000006/model_ema"
    )
    for name, value in uninterrupted[0].state_dict().items():
        assert torch.equal(resumed[name], value), name
    accumulator = EventAccumulator(
        _event_files(run, tmp_path / "after"), size_guidance={"images": 0}
    )
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == [2, 4, 6]


def test_negative_image_interval_is_refused_before_training():
    from pipeline.train.loop import check_run_config

    with pytest.raises(ValueError, match="train.image_every=-1: expected >= 0"):
        check_run_config(TrainRunConfig(train=TrainConfig(image_every=-1)))
