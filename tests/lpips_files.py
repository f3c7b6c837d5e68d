"""LPIPS weight files made locally with random values, in the two real files' formats
(torchvision's VGG16 state dict, the lpips package's linear heads): nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.models.lpips import TAP_CHANNELS, vgg16_features


def lpips_files(directory: Path, seed: int = 0) -> tuple[str, str]:
    """(vgg16-397923af.pth, vgg.pth) written into ``directory``."""
    torch.manual_seed(seed)
    vgg = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}
    torch.save(vgg, directory / "vgg16-397923af.pth")
    torch.save(lin, directory / "vgg.pth")
    return str(directory / "vgg16-397923af.pth"), str(directory / "vgg.pth")
