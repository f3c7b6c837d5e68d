"""Tests for the vector quantizer and the VQ autoencoder: lookup invariants, EMA, dead codes,
k-means init, metrics, a short training run on photo crops and the ONNX export of indices."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.export.onnx_export import VQEncoderForExport
from pipeline.models import (
    MODEL_REGISTRY,
    ModelConfig,
    VQAutoencoder,
    build_model,
)
from pipeline.models.losses import LossConfig, vq_autoencoder_loss
from pipeline.models.quantizer import VectorQuantizer, VQConfig


def quantizer(**kw) -> VectorQuantizer:
    base = dict(num_codes=16, code_dim=4, dead_code_window=0)
    base.update(kw)
    return VectorQuantizer(VQConfig(**base))


def set_codebook(q: VectorQuantizer, codes: torch.Tensor) -> None:
    """Install ``codes`` consistently with the EMA statistics (each code 'seen once')."""
    with torch.no_grad():
        q.codebook.copy_(codes)
        q.ema_embed_sum.copy_(codes)
        q.ema_cluster_size.fill_(1.0)


def as_map(vectors: torch.Tensor) -> torch.Tensor:
    """[M, C] -> [1, C, 1, M] so that flattening gives back the rows in order."""
    return vectors.t()[None, :, None, :].contiguous()


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("ema_decay", [0.99, 0.0])
def test_output_is_codebook_lookup_of_nearest(distance, ema_decay):
    torch.manual_seed(0)
    q = quantizer(distance=distance, ema_decay=ema_decay).eval()
    z = torch.randn(2, 4, 5, 6)
    z_q, idx, info = q(z)
    assert idx.shape == (2, 5, 6) and idx.dtype == torch.int64
    assert torch.allclose(z_q, q.lookup(idx), atol=1e-6)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    codes = q.codebook.detach()
    if distance == "cosine":
        brute = (F.normalize(flat, dim=1) @ F.normalize(codes, dim=1).t()).argmax(1)
    else:
        brute = torch.cdist(flat, codes).argmin(1)
    assert torch.equal(idx.flatten(), brute)
    assert set(info) == {"vq_loss", "usage", "perplexity"}
    q_z, q_idx = q.quantize(z)
    assert torch.equal(q_idx, idx) and torch.allclose(q_z, z_q, atol=1e-6)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_training_output_uses_codebook_before_update(distance):
    torch.manual_seed(0)
    q = quantizer(distance=distance).train()
    before = q.codes().clone()
    z_q, idx, _ = q(torch.randn(2, 4, 3, 3))
    assert torch.allclose(z_q, F.embedding(idx, before).permute(0, 3, 1, 2), atol=1e-6)
    assert not torch.allclose(q.codes(), before)  # the EMA step moved the codebook


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_straight_through_gradient(distance):
    torch.manual_seed(0)
    q = quantizer(distance=distance, ema_decay=0.0).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    weight = torch.randn(2, 4, 3, 3)
    z_q, _, info = q(z)
    ((z_q * weight).sum() + info["vq_loss"]).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert q.codebook.grad is not None and q.codebook.grad.abs().sum() > 0  # codebook loss
    if distance == "l2":
        z.grad = None
        z_q, _, _ = q(z)
        (z_q * weight).sum().backward()
        assert torch.allclose(z.grad, weight)  # identity gradient through the quantiser


def test_ema_moves_assigned_code_only():
    q = quantizer(num_codes=4, code_dim=2, ema_decay=0.5).train()
    set_codebook(q, torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]]))
    target = torch.tensor([1.0, 1.0])
    inputs = target + 0.1 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    before = q.codebook.clone()
    for _ in range(3):
        _, idx, _ = q(as_map(inputs))
        assert (idx == 0).all()
    assert (q.codebook[0] - target).norm() < 0.2 * (before[0] - target).norm()
    assert torch.allclose(q.codebook[1:], before[1:], atol=1e-3)
    assert q.ema_cluster_size[0] == pytest.approx(0.125 + 64 * 0.875)  # 1 -> 64 at decay 0.5


def test_dead_codes_reseeded_after_window_live_code_kept():
    window = 3
    q = quantizer(num_codes=4, code_dim=2, ema_decay=0.9, dead_code_window=window).train()
    set_codebook(q, torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]]))
    torch.manual_seed(0)
    inputs = 0.1 * torch.randn(32, 2)
    for step in range(1, window + 1):
        before = q.codebook.clone()
        _, _, info = q(as_map(inputs))
        if step < window:
            assert int(q.reseed_total) == 0
            assert torch.allclose(q.codebook[1:], before[1:], atol=1e-3)
            assert info["usage"].item() == 1.0  # still inside their window
    assert int(q.reseed_total) == 3
    assert info["usage"].item() == pytest.approx(0.25)  # measured before the re-seed
    # Re-seeded codes are recent encoder outputs; the live code was only moved by EMA.
    dists = (q.codebook[1:, None] - inputs[None]).norm(dim=-1)
    assert (dists.min(dim=1).values < 1e-6).all()
    assert (q.codebook[0] - inputs.mean(0)).norm() < 0.1
    assert (q.steps_unused == 0).all()


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_kmeans_init_once_and_survives_state_dict(distance, monkeypatch):
    torch.manual_seed(0)
    calls = []
    original = VectorQuantizer._kmeans

    def spy(self, data, k):
        calls.append(k)
        return original(self, data, k)

    monkeypatch.setattr(VectorQuantizer, "_kmeans", spy)
    centres = torch.randn(8, 4) * 3 + 5  # far from the N(0, 1) initial codebook
    data = (centres[torch.randint(8, (512,))] + 0.05 * torch.randn(512, 4)).t()
    z = data.reshape(1, 4, 16, 32)
    q = quantizer(num_codes=8, kmeans_init=True, distance=distance, ema_decay=0.99)
    q.eval()(z)
    assert calls == [] and int(q.initialised) == 0  # no init outside training
    random_err = F.mse_loss(q.quantize(z)[0], q._flatten(z).t().reshape(z.shape))
    q.train()(z)
    q(z)
    assert calls == [8] and int(q.initialised) == 1
    kmeans_err = F.mse_loss(q.quantize(z)[0], q._flatten(z).t().reshape(z.shape))
    assert kmeans_err < 0.2 * random_err
    fresh = quantizer(num_codes=8, kmeans_init=True, distance=distance, ema_decay=0.99)
    fresh.load_state_dict(q.state_dict())
    fresh.train()(z)
    assert calls == [8]  # the restored flag prevents a second initialisation
    assert torch.allclose(fresh.codebook, q.codebook, atol=1e-2)


def test_usage_and_perplexity_on_constructed_case():
    q = quantizer(num_codes=4, code_dim=2, ema_decay=0.9)
    set_codebook(q, torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    z = as_map(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.9, 0.0], [0.0, 1.0]]))
    expected_ppl = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    _, idx, info = q.eval()(z)
    assert idx.flatten().tolist() == [0, 0, 0, 1]
    assert info["usage"].item() == pytest.approx(0.5)
    assert info["perplexity"].item() == pytest.approx(expected_ppl, rel=1e-5)
    uniform = as_map(q.codebook.clone())
    assert q(uniform)[2]["perplexity"].item() == pytest.approx(4.0, rel=1e-5)
    assert q(uniform)[2]["usage"].item() == 1.0
    q.train()
    q.config.dead_code_window = 1  # window of one step: usage is this batch's usage
    assert q(z)[2]["usage"].item() == pytest.approx(0.5)


def test_config_validation():
    with pytest.raises(ValueError, match="not a valid Distance"):
        quantizer(distance="dot")
    with pytest.raises(ValueError, match="model.vq.ema_decay"):
        quantizer(ema_decay=1.0)
    with pytest.raises(ValueError, match="model.vq.num_codes"):
        quantizer(num_codes=0)
    with pytest.raises(ValueError, match="model.embed_dim"):
        build_model(tiny_vq(embed_dim=3))


def tiny_vq(**kw) -> ModelConfig:
    vq = VQConfig(num_codes=32, code_dim=4, dead_code_window=10, kmeans_init=True)
    base = dict(kind="vq", ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, groups=4, vq=vq)
    base.update(kw)
    return ModelConfig(**base)


def test_vq_autoencoder_shapes_and_registry():
    torch.manual_seed(0)
    assert MODEL_REGISTRY["vq"] is VQAutoencoder
    model = build_model(tiny_vq(ch=8, ch_mult=[1, 2, 2]))
    assert model.downsample_factor == 4 and model.latent_channels == 4 and model.num_codes == 32
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, info = model(x)
    assert recon.shape == x.shape
    z_q, idx, _ = model.eval().encode(x)
    assert z_q.shape == (2, 4, 4, 4) and idx.shape == (2, 4, 4)
    assert torch.allclose(model.decode_indices(idx.to(torch.int32)), model.decode(z_q), atol=1e-5)
    assert "quantize.codebook" in model.state_dict()


def photo_crops() -> torch.Tensor:
    """8 crops of 32x32 from skimage's astronaut, downsampled 4x, in [-1, 1]."""
    data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    img = F.avg_pool2d(img, 4)[0]  # 128x128
    corners = [(0, 0), (0, 48), (0, 96), (48, 0), (48, 48), (48, 96), (96, 0), (96, 96)]
    return torch.stack([img[:, r : r + 32, c : c + 32] for r, c in corners])


def test_tiny_vq_autoencoder_learns_without_collapse():
    torch.manual_seed(0)
    x = photo_crops()
    model = build_model(tiny_vq()).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    cfg = LossConfig(recon="l1")
    history = []
    for _ in range(50):
        recon, info = model(x)
        terms = vq_autoencoder_loss(x, recon, info, cfg)
        assert set(terms) == {"loss", "recon", "vq", "usage", "perplexity"}
        assert not terms["usage"].requires_grad
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in terms.items()})
    first, last = history[0], history[-1]
    assert last["recon"] < 0.6 * first["recon"]
    assert min(h["usage"] for h in history[-10:]) > 0.5  # well above collapse onto a few codes
    assert last["perplexity"] > 8


def test_export_indices_onnx_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_model(tiny_vq(ch=8, ch_mult=[1, 2, 2])).eval()
    wrapper = VQEncoderForExport(model)
    path = str(tmp_path / "vq_encoder.onnx")
    names = ["indices", "quantized"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (torch.zeros(2, 3, 16, 16),),
            path,
            input_names=["image"],
            output_names=names,
            dynamic_axes={n: {0: "batch"} for n in ["image", *names]},
            opset_version=17,
            dynamo=False,
        )
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        image = torch.rand(batch, 3, 16, 16) * 2 - 1
        with torch.no_grad():
            idx, quant = wrapper(image)
        ort_idx, ort_quant = sess.run(None, {"image": image.numpy()})
        assert ort_idx.dtype == np.int64 and ort_idx.shape == (batch, 4, 4)
        np.testing.assert_array_equal(ort_idx, idx.numpy())
        np.testing.assert_allclose(ort_quant, quant.numpy(), atol=1e-6)
