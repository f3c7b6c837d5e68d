"""EMA of the weights (pipeline/train/ema.py): the average is the closed form, and checkpoints
hold it as model_ema/ and resume it exactly."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipeline.artifacts import load_model_artifact, read_card
from pipeline.models import ModelConfig, build_model
from pipeline.train.checkpoint import read_state, write_checkpoint
from pipeline.train.config import TrainConfig, TrainRunConfig
from pipeline.train.ema import ModelEMA, decay_at, make_ema
from pipeline.train.loop import check_run_config
from pipeline.train.step import make_optimizer

TINY = ModelConfig(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, groups=4)


class _Wrapper(nn.Module):
    """Stands for DDP: the trained model is ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _perturb(model: nn.Module, generator: torch.Generator, scale: float = 0.02) -> None:
    """What an optimiser step and a forward pass do: new weights, new running statistics."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(scale * torch.randn(b.shape, generator=generator))


def test_average_after_k_updates_is_the_closed_form():
    """e_k = prod(d_i) theta_0 + sum_i (1 - d_i) prod_{j>i} d_j theta_{i+1}, d_i the warmed-up
    decay; buffers are the model's own; a DDP-style wrapper is unwrapped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEMA(_Wrapper(model), decay=0.5)
    generator = torch.Generator().manual_seed(1)
    thetas = [[p.detach().double().clone() for p in model.parameters()]]
    k = 12  # the warm-up (1 + i) / (10 + i) reaches the decay 0.5 at i = 8
    for _ in range(k):
        _perturb(model, generator)
        thetas.append([p.detach().double().clone() for p in model.parameters()])
        ema.update(_Wrapper(model))
    decays = [decay_at(0.5, i) for i in range(k)]
    assert decays[0] == pytest.approx(0.1) and decays[8:] == [0.5] * 4 and len(set(decays)) > 2
    for index, averaged in enumerate(ema.module.parameters()):
        expected = torch.prod(torch.tensor(decays, dtype=torch.float64)) * thetas[0][index]
        for i in range(k):
            later = torch.prod(torch.tensor(decays[i + 1 :], dtype=torch.float64))
            expected = expected + (1 - decays[i]) * later * thetas[i + 1][index]
        torch.testing.assert_close(averaged.double(), expected, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(ema.module.buffers(), model.buffers(), strict=True):
        assert torch.equal(mine, theirs)
    assert ema.updates == k and not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the trained model is untouched


def test_decay_zero_is_off_and_bad_decays_are_refused():
    assert make_ema(nn.Linear(2, 2), 0.0) is None
    for bad in (1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=f"train.ema_decay={bad}: expected 0"):
            ModelEMA(nn.Linear(2, 2), bad)
    with pytest.raises(ValueError, match=r"train.ema_decay=1.0: expected 0 \(off\)"):
        check_run_config(TrainRunConfig(train=TrainConfig(ema_decay=1.0)))  # before any worker


def _checkpoint(tmp_path, steps: int = 3):
    """A checkpoint of a tiny KL model whose EMA differs from its raw weights."""
    torch.manual_seed(0)
    model = build_model(TINY)
    optimizer = make_optimizer(model, 1e-3, [0.5, 0.9], 0.0)
    ema = ModelEMA(model, decay=0.9)
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        _perturb(model, generator)
        ema.update(model)
    cfg = TrainRunConfig(model=TINY, train=TrainConfig(ema_decay=0.9))
    cfg.data.resolution = 16
    directory = tmp_path / "checkpoint_00000003"
    directory.mkdir()
    write_checkpoint(str(directory), model, optimizer, steps, cfg, ema=ema)
    return directory, model, ema


def test_checkpoint_holds_the_ema_as_an_artifact_and_resumes_it_exactly(tmp_path):
    directory, model, ema = _checkpoint(tmp_path)
    raw_card, ema_card = (
        read_card(str(directory / "model")),
        read_card(str(directory / "model_ema")),
    )
    assert (raw_card.weights_kind, ema_card.weights_kind) == ("raw", "ema")
    assert json.loads((directory / "model_ema" / "latentpipe.json").read_text())["weights"][
        "kind"
    ] == ("ema")
    # model_ema/ is a diffusers AutoencoderKL directory like model/, with the averaged weights.
    assert (directory / "model_ema" / "config.json").exists()
    loaded, _, _ = load_model_artifact(str(directory / "model_ema"))
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, ema.module.state_dict()[name])
    raw, _, _ = load_model_artifact(str(directory))
    assert not torch.equal(raw.decoder.conv_out.weight, loaded.decoder.conv_out.weight)
    assert torch.equal(raw.decoder.conv_out.weight, model.decoder.conv_out.weight)

    state = read_state(str(directory))
    assert state["ema"]["updates"] == 3 and state["ema"]["decay"] == 0.9
    resumed = ModelEMA(build_model(TINY), decay=0.9)
    resumed.load_state_dict(state["ema"])
    assert resumed.updates == ema.updates
    for name, value in ema.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], value)
    # Both go on identically: the resumed average is the uninterrupted one.
    ema.update(model)
    resumed.update(model)
    for a, b in zip(ema.module.parameters(), resumed.module.parameters(), strict=True):
        assert torch.equal(a, b)
