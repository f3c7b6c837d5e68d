"""Adversarial option: PatchGAN shapes, hinge and adaptive-weight values, the disc_start switch,
and a short KL + discriminator run on real photo crops.

    python -m pytest -q tests/unit/test_adversarial.py   # CPU, a few seconds
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import ModelConfig, VQConfig, build_model
from pipeline.models.adversarial import (
    adaptive_weight,
    discriminator_loss,
    discriminator_lr,
    generator_adversarial_terms,
    hinge_d_loss,
    hinge_g_loss,
    last_layer,
)
from pipeline.models.discriminator import NLayerDiscriminator, build_discriminator, patch_grid
from pipeline.models.losses import LossConfig, autoencoder_loss
from pipeline.train.loss_schedule import adversarial_active

TINY = ModelConfig(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, groups=4)


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
@pytest.mark.parametrize("size, grid", [(32, 2), (64, 6)])
def test_patch_logit_grid(norm, size, grid):
    disc = NLayerDiscriminator(3, channels=8, n_layers=3, norm=norm)
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, grid, grid)
    assert patch_grid(size, 3) == grid
    assert patch_grid(256, 3) == 30  # pix2pix's 30x30 patch map


def test_layer_widths_double_and_cap_at_8x_and_init():
    disc = NLayerDiscriminator(3, channels=4, n_layers=5, norm="batch")
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 32, 32, 32, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 2, 1, 1]
    assert all(c.bias is None for c in convs[1:-1])  # the norm's shift makes a bias redundant
    big = NLayerDiscriminator(3, channels=64, norm="batch")
    weights = torch.cat([m.weight.flatten() for m in big.modules() if isinstance(m, nn.Conv2d)])
    assert abs(weights.std().item() - 0.02) < 1e-3 and abs(weights.mean().item()) < 1e-3
    scales = torch.cat([m.weight for m in big.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(scales.mean().item() - 1.0) < 5e-3 and 0.01 < scales.std().item() < 0.03


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="not a valid DiscNorm"):  # an Enum: refused at load too
        build_discriminator(LossConfig(disc_start=0, disc_norm="layer"))
    with pytest.raises(ValueError, match="loss.disc_weight"):
        build_discriminator(LossConfig(disc_start=0, disc_weight=-1.0))
    with pytest.raises(ValueError, match="at least 24 px"):
        NLayerDiscriminator(channels=4)(torch.randn(1, 3, 16, 16))
    assert discriminator_lr(LossConfig(), 1e-3) == 1e-3
    assert discriminator_lr(LossConfig(disc_lr=2e-4), 1e-3) == 2e-4


def test_hinge_golden_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2] -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2]   -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0
    assert hinge_g_loss(torch.tensor([1.0, 2.0, -6.0])).item() == pytest.approx(1.0)


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    nll, g = (a * w).sum(), (b * w).sum() ** 2  # d nll/dw = a (norm 5); d g/dw = 2*(b.w)*b = 4b
    weight = adaptive_weight(nll, g, w, disc_weight=0.5)
    assert weight.item() == pytest.approx(0.5 * 5.0 / (4.0 + 1e-4))
    assert not weight.requires_grad
    (nll + g).backward()  # the graph is retained for the full backward
    assert torch.allclose(w.grad, a + 4 * b)
    flat = adaptive_weight((a * w).sum(), (0 * w).sum(), w, disc_weight=1.0)
    assert flat.item() == 1e4  # 5 / 1e-4 = 5e4, clamped


class _Wrapper(nn.Module):
    """Stands in for DDP: the real model sits under ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_last_layer_is_decoder_conv_out_for_kl_and_vq_and_through_wrappers():
    kl = build_model(TINY)
    vq = build_model(
        ModelConfig(kind="vq", ch=8, ch_mult=[1, 2], groups=4, vq=VQConfig(num_codes=8))
    )
    assert last_layer(kl) is kl.decoder.conv_out.weight
    assert last_layer(vq) is vq.decoder.conv_out.weight
    assert last_layer(_Wrapper(kl)) is kl.decoder.conv_out.weight
    with pytest.raises(ValueError, match="decoder.conv_out"):
        last_layer(nn.Linear(2, 2))


def _setup(disc_start: int):
    torch.manual_seed(0)
    cfg = LossConfig(disc_start=disc_start, disc_channels=8)
    model, disc = build_model(TINY), build_discriminator(cfg)
    calls = []
    disc.register_forward_hook(lambda *_: calls.append(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.9))  # taming's betas
    disc_opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
    return cfg, model, opt, disc, disc_opt, calls


def _adv_step(model, opt, disc, disc_opt, x, cfg, step):
    """The documented order: generator forward, loss + adv, generator update, then D's update."""
    recon, posterior = model(x)
    terms = autoencoder_loss(x, recon, posterior, cfg)
    adv = generator_adversarial_terms(
        model, recon, terms["recon"], disc, cfg, adversarial_active(cfg, step)
    )
    opt.zero_grad(set_to_none=True)
    (terms["loss"] + adv["adv"]).backward()
    opt.step()
    return adv, _d_step(disc, disc_opt, x, recon, cfg, step)


def _d_step(disc, disc_opt, x, recon, cfg, step):
    """D's update as the trainer does it (its loss from the models layer, the step here)."""
    terms = discriminator_loss(disc, x, recon, cfg, adversarial_active(cfg, step))
    if not terms:
        return {}
    disc_opt.zero_grad(set_to_none=True)
    terms["d_loss"].backward()
    disc_opt.step()
    return {name: value.detach() for name, value in terms.items()}


def test_nothing_happens_before_disc_start():
    cfg, model, opt, disc, disc_opt, calls = _setup(disc_start=5)
    before = [p.clone() for p in disc.parameters()]
    adv, d = _adv_step(model, opt, disc, disc_opt, torch.rand(2, 3, 32, 32) * 2 - 1, cfg, step=4)
    assert calls == [] and d == {}
    assert all(v.item() == 0.0 for v in adv.values()) and not adv["adv"].requires_grad
    assert all(torch.equal(p, q) for p, q in zip(before, disc.parameters(), strict=True))
    off = LossConfig()  # disc_start=-1: never
    assert not adversarial_active(off, 10**9)  # the trainer's schedule: never on
    assert generator_adversarial_terms(model, torch.zeros(1), None, disc, off, False)["adv"] == 0


def test_after_disc_start_d_learns_and_the_generator_gets_an_adversarial_gradient():
    cfg, model, opt, disc, disc_opt, calls = _setup(disc_start=5)
    before = [p.clone() for p in disc.parameters()]
    adv, d = _adv_step(model, opt, disc, disc_opt, torch.rand(2, 3, 32, 32) * 2 - 1, cfg, step=5)
    assert len(calls) == 2  # one frozen pass for the generator, one real+fake pass for D
    assert set(d) == {"d_loss", "logits_real", "logits_fake"}
    assert adv["adv"].requires_grad and adv["adv"].item() != 0.0
    assert 0 < adv["d_weight"].item() < 1e4
    assert any(not torch.equal(p, q) for p, q in zip(before, disc.parameters(), strict=True))
    # The generator's adversarial term alone reaches the decoder's weights and none of D's.
    model.zero_grad()
    disc.zero_grad(set_to_none=True)
    recon, _ = model(torch.rand(2, 3, 32, 32))
    g = generator_adversarial_terms(model, recon, recon.abs().mean(), disc, cfg, True)
    g["adv"].backward()
    assert last_layer(model).grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())


def _photo_crops() -> torch.Tensor:
    """Four 32x32 crops of skimage's astronaut downsampled 4x, in [-1, 1]."""
    data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    img = F.avg_pool2d(img, 4)[0]  # 128x128
    return torch.stack(
        [img[:, r : r + 32, c : c + 32] for r, c in [(0, 0), (0, 96), (48, 48), (96, 0)]]
    )


def test_short_kl_plus_discriminator_run_stays_finite():
    x = _photo_crops()
    cfg, model, opt, disc, disc_opt, _ = _setup(disc_start=5)
    history = []
    for step in range(20):
        adv, d = _adv_step(model, opt, disc, disc_opt, x, cfg, step)
        history.append({k: v.item() for k, v in {**adv, **d}.items()})
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert all(0 < h["d_weight"] < 1e4 for h in history[5:])
    assert all("d_loss" in h for h in history[5:]) and not any("d_loss" in h for h in history[:5])


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Generator and D both DDP-wrapped, different data per rank: replicas must stay identical."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg, model, _, disc, _, _ = _setup(disc_start=1)  # same seed: same initial weights
        model, disc = DDP(model), DDP(disc)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
        torch.manual_seed(10 + rank)
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        stats = [_adv_step(model, opt, disc, disc_opt, x, cfg, step) for step in range(3)]
        result = {"model": model.module.state_dict(), "disc": disc.module.state_dict()}
        result["d_weight"] = stats[-1][0]["d_weight"].item()
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_generator_and_discriminator_stay_in_step(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for part in ("model", "disc"):
        for key, value in r0[part].items():
            assert torch.equal(value, r1[part][key]), f"{part}.{key} differs across ranks"
    assert 0 < r0["d_weight"] < 1e4 and 0 < r1["d_weight"] < 1e4
