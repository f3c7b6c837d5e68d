"""The train step is a plain function; the loop runs in one process without Ray and resumes."""

import json

import fsspec
import pytest
import torch

from pipeline.artifacts import load_model_artifact, read_card
from pipeline.models import ModelConfig, build_model
from pipeline.models.losses import LossConfig
from pipeline.train.checkpoint import latest_checkpoint, read_config, read_state
from pipeline.train.run import train
from pipeline.train.step import MetricMeter, make_optimizer, train_step
from tests.conftest import TINY_TRAIN

TINY = ModelConfig(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, groups=4)


def test_train_step_reduces_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(TINY)
    optimizer = make_optimizer(model, 2e-3, [0.5, 0.9], 0.0)
    batch = _photo_batch()
    first = train_step(model, batch, optimizer, LossConfig(), grad_clip=1.0)
    for _ in range(30):
        last = train_step(model, batch, optimizer, LossConfig(), grad_clip=1.0)
    assert set(first) >= {"loss", "recon", "kl", "grad_norm"}
    assert not first["loss"].requires_grad
    assert last["recon"] < first["recon"] * 0.8


def _photo_batch() -> torch.Tensor:
    """Four 32x32 crops of a real photograph (scikit-image ships it), in [-1, 1]."""
    from skimage import data

    photo = torch.from_numpy(data.astronaut()[::8, ::8].copy()).permute(2, 0, 1).float()
    crops = [photo[:, y : y + 32, x : x + 32] for y, x in ((0, 0), (0, 32), (32, 0), (32, 32))]
    return torch.stack(crops) / 127.5 - 1


def test_metric_meter_means():
    meter = MetricMeter()
    meter.add({"loss": torch.tensor(1.0)}, 4)
    meter.add({"loss": torch.tensor(3.0)}, 4)
    assert meter.means() == {"loss": 2.0} and meter.images == 8


def test_single_process_run_without_ray_resumes(tiny_shards, tmp_path):
    """train.num_workers=0: the same loop in this process; re-running continues the step count."""
    from pipeline.config import load_config
    from pipeline.train.config import TrainRunConfig

    storage = "memory://single-process-runs"
    overrides = [
        f"data.shards={tiny_shards}",
        *TINY_TRAIN,
        f"train.storage_path={storage}",
        "train.run_name=solo",
        "train.num_workers=0",
        "train.log_every=2",
        "train.checkpoint_every=2",
    ]
    first = train(load_config(TrainRunConfig, None, [*overrides, "train.steps=4"]))
    assert read_state(first["checkpoint"])["step"] == 4
    second = train(load_config(TrainRunConfig, None, [*overrides, "train.steps=6"]))
    assert read_state(second["checkpoint"])["step"] == 6
    assert latest_checkpoint(f"{storage}/solo").endswith("checkpoint_00000006")
    fs = fsspec.filesystem("memory")
    lines = fs.cat_file("/single-process-runs/solo/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6]
    assert fs.exists("/single-process-runs/solo/config.yaml")
    # A checkpoint: the model artifact, the training state beside it, the resolved config.
    checkpoint = second["checkpoint"].removeprefix("memory://")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(checkpoint, detail=False)) == [
        "config.yaml",
        "model",
        "training_state.pt",
    ]
    assert read_config(second["checkpoint"]).train.steps == 6
    model, model_cfg, card = load_model_artifact(second["checkpoint"])
    assert model_cfg == read_config(second["checkpoint"]).model and not model.training
    assert (card.provenance.step, card.provenance.run) == (6, f"{storage}/solo")
    assert card.provenance.data["shards"] == tiny_shards and card.image.resolution == 32
    state = read_state(second["checkpoint"])
    # no discriminator in this run; the data stream's position; no GradScaler (fp32)
    assert set(state) == {"model", "optimizer", "step", "data", "scaler"}
    assert state["data"]["consumed"] == 6 and state["scaler"] == {}
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())


def test_vq_model_trains_through_the_same_loop_and_logs_codebook_health(tiny_shards):
    """model.kind=vq uses the same train step; usage and perplexity land in metrics.jsonl."""
    from pipeline.config import load_config
    from pipeline.train.config import TrainRunConfig

    storage = "memory://vq-runs"
    overrides = [
        f"data.shards={tiny_shards}",
        *TINY_TRAIN,
        "model.kind=vq",
        "model.vq.num_codes=32",
        "model.vq.dead_code_window=4",
        "model.vq.kmeans_init=true",
        f"train.storage_path={storage}",
        "train.run_name=vq",
        "train.num_workers=0",
        "train.steps=8",
        "train.log_every=4",
        "train.checkpoint_every=8",
    ]
    result = train(load_config(TrainRunConfig, None, overrides))
    lines = fsspec.filesystem("memory").cat_file("/vq-runs/vq/metrics.jsonl").decode().splitlines()
    last = json.loads(lines[-1])
    assert last["step"] == 8 and {"vq", "usage", "perplexity", "recon"} <= set(last)
    assert 0 < last["usage"] <= 1 and last["perplexity"] >= 1
    # The artifact ships the codebook; its training statistics stay in the training state.
    model, model_cfg, _ = load_model_artifact(result["checkpoint"])
    assert model_cfg.kind == "vq"
    state = read_state(result["checkpoint"])["model"]
    assert torch.equal(state["quantize.codebook"], model.quantize.codebook)
    assert bool(state["quantize.initialised"]) and state["quantize.recent_filled"] > 0


def test_adversarial_training_resumes_with_its_discriminator(tiny_shards):
    """loss.disc_start switches the PatchGAN on mid-run; its weights and optimiser are checkpointed."""
    from pipeline.config import load_config
    from pipeline.train.config import TrainRunConfig

    overrides = [
        f"data.shards={tiny_shards}",
        *TINY_TRAIN,
        "loss.disc_start=2",
        "loss.disc_channels=8",
        "train.storage_path=memory://gan-runs",
        "train.run_name=gan",
        "train.num_workers=0",
        "train.log_every=2",
        "train.checkpoint_every=2",
    ]
    first = train(load_config(TrainRunConfig, None, [*overrides, "train.steps=4"]))
    state = read_state(first["checkpoint"])
    assert {"disc", "disc_optimizer"} <= set(state) and state["disc_optimizer"]["state"]
    second = train(load_config(TrainRunConfig, None, [*overrides, "train.steps=6"]))
    resumed = read_state(second["checkpoint"])
    assert resumed["step"] == 6
    moved = [not torch.equal(state["disc"][k], resumed["disc"][k]) for k in state["disc"]]
    assert any(moved), "the discriminator did not train after the resume"
    lines = (
        fsspec.filesystem("memory").cat_file("/gan-runs/gan/metrics.jsonl").decode().splitlines()
    )
    records = [json.loads(line) for line in lines]
    assert records[0]["d_weight"] == 0 and "d_loss" not in records[0]  # steps 1-2: before start
    assert records[-1]["d_weight"] > 0 and records[-1]["d_loss"] > 0


def test_adversarial_loss_is_refused_for_textbook_vaes(mnist_shards):
    from pipeline.config import load_config
    from pipeline.train.config import TrainRunConfig

    cfg = load_config(
        TrainRunConfig,
        "configs/train/mnist-mlp-vae.yaml",
        [
            f"data.shards={mnist_shards['train']}",
            "loss.disc_start=0",
            "train.num_workers=0",
            "train.storage_path=memory://refused",
            "train.steps=1",
        ],
    )
    with pytest.raises(ValueError, match="loss.disc_start"):
        train(cfg)


@pytest.mark.parametrize("config", ["mlp-vae", "conv-vae", "beta-vae", "cvae"])
def test_textbook_vaes_train_from_their_configs(mnist_shards, config):
    """The classic VAE family: configs for the same trainer; the negative ELBO goes down."""
    from pipeline.config import load_config
    from pipeline.train.config import TrainRunConfig

    storage = f"memory://classic-{config}"
    cfg = load_config(
        TrainRunConfig,
        f"configs/train/mnist-{config}.yaml",
        [
            f"data.shards={mnist_shards['train']}",
            "train.num_workers=0",
            f"train.storage_path={storage}",
            "train.steps=40",
            "train.log_every=10",
            "train.checkpoint_every=40",
            "data.batch_size=64",
        ],
    )
    result = train(cfg)
    path = f"/classic-{config}/mnist-{config}/metrics.jsonl"
    records = [
        json.loads(x) for x in fsspec.filesystem("memory").cat_file(path).decode().splitlines()
    ]
    assert records[-1]["nelbo"] < records[0]["nelbo"] - 50  # nats per image
    model, loaded, _ = load_model_artifact(result["checkpoint"])
    if loaded.classic.num_classes:
        digits = model.generate(torch.arange(10))
        assert digits.shape == (10, 1, 28, 28) and 0 <= digits.min() and digits.max() <= 1


def test_latest_checkpoint_skips_a_copy_cut_short(tmp_path, caplog):
    """A checkpoint whose training state was cut off mid-write is not resumed from; Ray Train's
    checkpoint_manager_snapshot.json beside the checkpoints is not one (and not warned about)."""
    model = build_model(TINY)
    optimizer = make_optimizer(model, 1e-3, [0.5, 0.9], 0.0)
    from pipeline.train.checkpoint import write_checkpoint
    from pipeline.train.config import TrainRunConfig

    for step in (2, 4):
        directory = tmp_path / f"checkpoint_{step:08d}"
        directory.mkdir()
        write_checkpoint(str(directory), model, optimizer, step, TrainRunConfig(model=TINY))
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    state = tmp_path / "checkpoint_00000004" / "training_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="latentpipe.train"):
        assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_00000002")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"skipping incomplete checkpoint {tmp_path / 'checkpoint_00000004'}"
    ]
    assert latest_checkpoint(str(tmp_path / "absent")) is None
    # Weights cut short (the artifact's card pins their sha256) are incomplete too.
    weights = tmp_path / "checkpoint_00000002" / "model" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    assert latest_checkpoint(str(tmp_path)) is None
    assert read_card(str(tmp_path / "checkpoint_00000002" / "model")).provenance.step == 2
