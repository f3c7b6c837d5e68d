"""LPIPS (pipeline.models.lpips) with locally made random weights: the wiring, the weight-file
formats of torchvision's VGG16 and the lpips package, shapes, gradients and clear errors."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.lpips import LPIPS, TAP_CHANNELS, load_lpips, vgg16_features


def _weight_files(tmp_path, seed: int = 0) -> tuple[str, str]:
    """Random weights saved in the two real files' formats (key names and shapes)."""
    torch.manual_seed(seed)
    vgg = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's file has a classifier too
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "lin.pth")
    return str(tmp_path / "vgg16.pth"), str(tmp_path / "lin.pth")


def test_distance_is_zero_for_identical_images_and_grows_with_noise(tmp_path):
    lpips = load_lpips(*_weight_files(tmp_path))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).shape == (2,)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    slight = lpips(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1))
    strong = lpips(x, (x + 0.5 * torch.randn_like(x)).clamp(-1, 1))
    assert (slight > 0).all() and (strong > slight).all()


def test_frozen_but_gradients_reach_the_reconstruction(tmp_path):
    lpips = load_lpips(*_weight_files(tmp_path))
    assert not any(p.requires_grad for p in lpips.parameters()) and not lpips.training
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    recon = torch.zeros_like(x, requires_grad=True)
    lpips(x, recon).sum().backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0


def test_grayscale_inputs(tmp_path):
    lpips = load_lpips(*_weight_files(tmp_path))
    x = torch.rand(2, 1, 16, 16)
    assert lpips(x, 1 - x).shape == (2,)


def test_lin_heads_weight_each_tap(tmp_path):
    """Zero heads give zero distance: the heads are applied, not bypassed."""
    vgg, lin = _weight_files(tmp_path)
    lpips = load_lpips(vgg, lin)
    for head in lpips.lins:
        head.weight.data.zero_()
    x = torch.rand(1, 3, 16, 16)
    assert lpips(x, -x).item() == 0.0
    assert isinstance(lpips, LPIPS)


def test_missing_files_name_what_is_expected(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"vgg16-397923af\.pth.*lpips/weights/v0\.1/vgg\.pth"
    ):
        load_lpips(str(tmp_path / "nope.pth"), "")


def test_wrong_file_is_named(tmp_path):
    vgg, lin = _weight_files(tmp_path)
    with pytest.raises(ValueError, match="not the expected LPIPS/VGG16 weights"):
        load_lpips(lin, lin)  # heads where the VGG should be
