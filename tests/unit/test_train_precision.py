"""Mixed precision, gradient accumulation, the lr schedule, channels_last and torch.compile.

Accumulation is compared with one batch as large on deterministic models (the KL autoencoder
decoding its posterior mode, VQ learning its codebook by gradient): the KL model's posterior
sample draws other noise for two half batches than for one whole batch, and VQ's EMA codebook
updates once per micro-batch, so neither would be the same step. SGD with lr 1 makes the
parameter change the (clipped) gradient itself, compared tightly.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.distributed as dist

from pipeline.config import ConfigError, load_config
from pipeline.models import KLAutoencoder, ModelConfig, VQConfig, build_model
from pipeline.models.discriminator import build_discriminator
from pipeline.models.losses import LossConfig
from pipeline.train.config import LrSchedule, Precision, TrainConfig, TrainRunConfig
from pipeline.train.loop import check_run_config
from pipeline.train.precision import Amp, make_amp, prepare_module, to_layout
from pipeline.train.schedule import ScheduledLr, lr_multiplier
from pipeline.train.step import Adversary, accumulated_step, make_optimizer, train_step
from tests.conftest import TINY_TRAIN
from tests.unit.test_train_step import _photo_batch

TINY = ModelConfig(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, groups=4)


class ModeKL(KLAutoencoder):
    """The KL autoencoder decoding its posterior mean: no sampling noise."""

    def forward(self, x, sample_posterior: bool = False):
        return super().forward(x, sample_posterior=False)


def _models() -> dict:
    torch.manual_seed(0)
    vq = ModelConfig(**{**vars(TINY), "kind": "vq", "vq": VQConfig(num_codes=32, ema_decay=0)})
    return {"kl": ModeKL(TINY), "vq": build_model(vq)}


def _sgd_deltas(model, step_fn) -> dict[str, torch.Tensor]:
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    step_fn(torch.optim.SGD(model.parameters(), lr=1.0))
    return {k: before[k] - v.detach() for k, v in model.named_parameters()}


def _close(a: dict, b: dict, rtol=1e-5, atol=1e-7) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [("train.precision=fp8", "train.precision"), ("train.lr_schedule=linear", "train.lr_schedule")],
)
def test_a_bad_choice_fails_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(TrainRunConfig, None, ["data.shards=x", override])
    with pytest.raises(ValueError):  # and when the dataclass is built in code
        TrainConfig(**{key.split(".")[1]: "nonsense"})


def test_defaults_are_plain_fp32_without_extras():
    t = TrainConfig()
    assert (t.precision, t.grad_accum_steps, t.lr_schedule, t.warmup_steps) == (
        Precision.fp32,
        1,
        LrSchedule.constant,
        0,
    )
    assert not t.compile and not t.channels_last


def test_fp16_is_refused_off_cuda_with_what_to_do():
    with pytest.raises(ValueError, match="train.precision=fp16 needs a CUDA device.*bf16"):
        make_amp(Precision.fp16, torch.device("cpu"))
    cpu_workers = TrainRunConfig(train=TrainConfig(precision=Precision.fp16, num_workers=2))
    with pytest.raises(ValueError, match="train.use_gpu=false"):
        check_run_config(cpu_workers)
    check_run_config(TrainRunConfig(train=TrainConfig(precision="fp16", use_gpu=True)))
    for bad, key in (
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"warmup_steps": -1}, "warmup"),
    ):
        with pytest.raises(ValueError, match=key):
            check_run_config(TrainRunConfig(train=TrainConfig(**bad)))


# -- lr schedule -----------------------------------------------------------------------------


def test_lr_curve_warms_up_linearly_then_holds_or_follows_a_cosine_to_zero():
    total, warmup = 20, 4
    for kind in LrSchedule:
        curve = [lr_multiplier(kind, s, total, warmup) for s in range(total)]
        assert curve[:warmup] == [(s + 1) / warmup for s in range(warmup)]
        assert curve[warmup] == 1.0
        if kind == LrSchedule.constant:
            assert set(curve[warmup:]) == {1.0}
            continue
        tail = curve[warmup:]
        assert all(a > b for a, b in zip(tail, tail[1:], strict=False))  # strictly decreasing
        middle = warmup + (total - warmup) // 2
        assert curve[middle] == pytest.approx(0.5)
        assert 0 < curve[-1] < 0.01 and lr_multiplier(kind, total, total, warmup) == 0.0
    assert lr_multiplier(LrSchedule.cosine, 0, 10, 0) == 1.0  # no warm-up: starts at the base


def test_schedule_multiplies_each_optimizers_scaled_base_lr():
    t = TrainConfig(steps=10, lr_schedule="cosine", warmup_steps=2)
    model, disc = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    g, d = make_optimizer(model, 1e-3, [0.5, 0.9], 0), make_optimizer(disc, 4e-4, [0.5, 0.9], 0)
    for group in g.param_groups:  # as the loop's elastic lr scaling leaves it (0.5 x lr)
        group["lr"] = 5e-4
    schedule = ScheduledLr(t, [g, d])
    for step in (0, 1, 2, 6, 9):
        factor = lr_multiplier(t.lr_schedule, step, t.steps, t.warmup_steps)
        assert schedule.apply(step) == pytest.approx(5e-4 * factor)
        assert g.param_groups[0]["lr"] == pytest.approx(5e-4 * factor)
        assert d.param_groups[0]["lr"] == pytest.approx(4e-4 * factor)


# -- gradient accumulation -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_accumulated_micro_batches_step_like_one_batch_as_large(kind):
    model = _models()[kind]
    twin = copy.deepcopy(model)
    x = _photo_batch()  # 4 images
    cfg = LossConfig()
    whole: dict = {}
    micro: dict = {}

    def one_batch(opt):
        whole.update(train_step(model, x, opt, cfg, grad_clip=0.05))

    def two_halves(opt):
        halves = [(x[:2], None), (x[2:], None)]
        micro.update(accumulated_step(twin, halves, opt, cfg, grad_clip=0.05))

    _close(_sgd_deltas(model, one_batch), _sgd_deltas(twin, two_halves))
    assert whole["grad_norm"] > 0.05  # the clip acted, on the whole accumulated gradient
    for name in ("loss", "recon", "grad_norm"):
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-5, atol=1e-7)


def test_adversarial_training_accumulates_generator_and_discriminator():
    """Two identical micro-batches are the same step as one of them, for G and D alike (the
    adaptive weight, a ratio of gradient norms, is then the same too)."""
    loss_cfg = LossConfig(disc_start=0, disc_channels=8, disc_layers=2)
    model = _models()["kl"]
    torch.manual_seed(1)
    disc = build_discriminator(loss_cfg, 3)
    twins = copy.deepcopy((model, disc))
    x = _photo_batch()[:2]
    runs = []
    for (g, d), batches in (((model, disc), [(x, None)]), (twins, [(x, None), (x, None)])):
        g_opt, d_opt = (
            make_optimizer(g, 1e-3, [0.5, 0.9], 0),
            make_optimizer(d, 1e-3, [0.5, 0.9], 0),
        )
        d_before = {k: v.clone() for k, v in d.state_dict().items()}
        terms = accumulated_step(g, batches, g_opt, loss_cfg, 1.0, 0, Adversary(d, d_opt))
        assert any(not torch.equal(v, d.state_dict()[k]) for k, v in d_before.items())
        runs.append((terms, g.state_dict(), d.state_dict()))
    (terms_a, g_a, d_a), (terms_b, g_b, d_b) = runs
    _close(g_a, g_b, rtol=1e-4, atol=1e-6)
    _close(d_a, d_b, rtol=1e-4, atol=1e-6)
    for name in ("loss", "g_loss", "d_weight", "d_loss"):
        torch.testing.assert_close(terms_a[name], terms_b[name], rtol=1e-5, atol=1e-6)


def test_ddp_syncs_gradients_on_the_last_micro_batch_only(tmp_path):
    """A comm hook counts DDP's bucket all-reduces (gloo, a world of one process)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ddp = torch.nn.parallel.DistributedDataParallel(ModeKL(TINY))
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        ddp.register_comm_hook(None, counting_allreduce)
        opt = make_optimizer(ddp, 1e-3, [0.5, 0.9], 0)
        x = _photo_batch()
        train_step(ddp, x, opt, LossConfig())  # first step: DDP rebuilds its buckets after it
        calls.clear()
        train_step(ddp, x, opt, LossConfig())
        per_step = len(calls)
        calls.clear()
        accumulated_step(ddp, [(x[:1], None), (x[1:2], None), (x[2:], None)], opt, LossConfig())
        assert per_step >= 1 and len(calls) == per_step
    finally:
        dist.destroy_process_group()


# -- precision -------------------------------------------------------------------------------


def test_bf16_autocasts_the_forward_and_stays_close_to_fp32():
    model = _models()["kl"]
    twin = copy.deepcopy(model)
    x = _photo_batch()
    amp = make_amp(Precision.bf16, torch.device("cpu"))
    with amp.autocast():
        assert model.encoder.conv_in(x).dtype == torch.bfloat16
    losses = {}
    for name, m, a in (("fp32", model, None), ("bf16", twin, amp)):
        opt = make_optimizer(m, 1e-3, [0.5, 0.9], 0)
        losses[name] = [train_step(m, x, opt, LossConfig(), 1.0, amp=a)["loss"] for _ in range(3)]
        assert all(p.dtype == torch.float32 for p in m.parameters())  # weights stay fp32
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=3e-2, atol=0)
    assert losses["bf16"] != losses["fp32"]  # it did run in another precision


def test_grad_scaler_skips_overflowing_steps_and_round_trips():
    """The fp16 path's scaler logic on CPU (CPU float16 autocast exists; the trainer allows
    fp16 on CUDA only, for speed)."""
    x = _photo_batch()
    model = _models()["kl"]
    overflowing = Amp(torch.float16, "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**60))
    opt = make_optimizer(model, 1e-3, [0.5, 0.9], 0)
    before = copy.deepcopy(model.state_dict())
    terms = train_step(model, x, opt, LossConfig(), 1.0, amp=overflowing)
    assert not math.isfinite(terms["grad_norm"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # skipped
    assert overflowing.state_dict()["scale"] == 2.0**59  # backed off
    resumed = Amp(torch.float16, "cpu", torch.amp.GradScaler("cpu"))
    resumed.load_state_dict(overflowing.state_dict())
    assert resumed.state_dict() == overflowing.state_dict()
    assert Amp().state_dict() == {}
    # A sane scale: the step is taken and matches fp32 within float16 precision.
    twin = copy.deepcopy(model)
    scaled = Amp(torch.float16, "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))
    a = _sgd_deltas(model, lambda o: train_step(model, x, o, LossConfig(), 1.0, amp=scaled))
    b = _sgd_deltas(twin, lambda o: train_step(twin, x, o, LossConfig(), 1.0))
    assert scaled.state_dict()["scale"] == 2.0**10
    _close(a, b, rtol=5e-2, atol=2e-3)


# -- layout and compilation ------------------------------------------------------------------


def test_channels_last_trains_to_the_same_losses():
    model = _models()["kl"]
    twin = prepare_module(copy.deepcopy(model), TrainConfig(channels_last=True))
    assert twin.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x = _photo_batch()
    nhwc = to_layout(x, TrainConfig(channels_last=True))
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc, x)
    losses = []
    for m, images in ((model, x), (twin, nhwc)):
        opt = make_optimizer(m, 1e-3, [0.5, 0.9], 0)
        losses.append([train_step(m, images, opt, LossConfig(), 1.0)["loss"] for _ in range(3)])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)


def _run_losses(shards, tmp_path, name: str, *extra: str) -> list[float]:
    from pipeline.train.run import train

    overrides = [
        f"data.shards={shards}",
        *TINY_TRAIN,
        "model.ch_mult=[1,2]",
        "data.resolution=16",
        f"train.storage_path={tmp_path}",
        f"train.run_name={name}",
        "train.steps=3",
        "train.num_workers=0",
        "train.log_every=1",
        "train.eval_images=0",
        *extra,
    ]
    train(load_config(TrainRunConfig, None, overrides))
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.slow  # inductor compiles C++ kernels: ~1-2 min on 2 busy cores when its cache is cold
def test_compiled_training_logs_the_same_losses(tiny_shards, tmp_path):
    plain = _run_losses(tiny_shards, tmp_path, "plain")
    compiled = _run_losses(tiny_shards, tmp_path, "compiled", "train.compile=true")
    assert compiled == pytest.approx(plain, rel=1e-4) and len(plain) == 3
