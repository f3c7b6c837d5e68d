"""LPIPS perceptual distance (Zhang et al. 2018), the VGG16 variant LDM's autoencoders train with.

The network is the 13 convolutions of torchvision's VGG16 ``features`` (five stages, tapped after
each stage's last ReLU), frozen; each tap is unit-normalised over channels, the squared
difference of the two images' taps goes through a learned 1x1 convolution ("linear head",
non-negative weights), is averaged over space, and the five are summed. Inputs are images in
[-1, 1]; LPIPS's scaling layer maps them to VGG's ImageNet normalisation.

Weights are never downloaded: the user supplies two local files (see README, "Perceptual
loss"), both plain state dicts read with ``torch.load(weights_only=True)``:

* ``vgg``: torchvision's ImageNet VGG16, e.g. ``vgg16-397923af.pth`` (keys ``features.N.*``;
  the classifier's keys are ignored);
* ``lin``: the LPIPS v0.1 linear heads, ``vgg.pth`` of the ``lpips`` package
  (``lpips/weights/v0.1/vgg.pth``; keys ``lin0.model.1.weight`` .. ``lin4.model.1.weight``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

# torchvision's VGG16 "D" configuration; "M" = 2x2 max-pool.
VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in features
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS v0.1's ScalingLayer: [-1, 1] images to (x - ImageNet mean) / std, in its own constants.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional part with torchvision's module indices (so its keys load as-is)."""
    layers: list[nn.Module] = []
    channels = 3
    for spec in VGG16_LAYERS:
        if spec == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(spec), 3, padding=1), nn.ReLU(inplace=False)]
            channels = int(spec)
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Perceptual distance per image: ``lpips(x, y)`` -> [B] (0 for identical images)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features[: TAPS[-1] + 1]):
            h = layer(h)
            if i in TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:  # grayscale data: VGG sees the grey level in all three channels
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        total = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, self.taps(x), self.taps(y), strict=True):
            diff = (_unit(fx) - _unit(fy)) ** 2
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total


def _unit(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length over channels, as LPIPS's normalize_tensor (same eps)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def load_lpips(vgg_path: str, lin_path: str) -> LPIPS:
    """A frozen, eval-mode LPIPS from the two local weight files (see the module docstring)."""
    missing = [p for p in (vgg_path, lin_path) if not p or not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            "the perceptual loss needs two local weight files, nothing is downloaded: "
            f"loss.lpips_vgg = torchvision's ImageNet VGG16 state dict (vgg16-397923af.pth) and "
            f"loss.lpips_lin = LPIPS v0.1's linear heads (lpips/weights/v0.1/vgg.pth of the "
            f"'lpips' package); not found: {', '.join(repr(p) for p in missing)}"
        )
    model = LPIPS()
    vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
    features = {k[len("features.") :]: v for k, v in vgg.items() if k.startswith("features.")}
    _load(model.features, features, vgg_path)
    lin = torch.load(lin_path, map_location="cpu", weights_only=True)
    heads = {f"{i}.weight": lin.get(f"lin{i}.model.1.weight") for i in range(len(TAPS))}
    _load(model.lins, {k: v for k, v in heads.items() if v is not None}, lin_path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load(module: nn.Module, state: dict, path: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(
            f"{path}: not the expected LPIPS/VGG16 weights ({' '.join(first[:2])})"
        ) from None
