"""Pixels for the run report: tensors -> uint8 images -> grids -> PNG bytes, and one scatter plot.

Grids are plain numpy on a white canvas with ``GAP`` px between cells (the demo's convention),
so their geometry is exact and testable: ``r`` rows of ``s``-pixel images are
``r * s + (r - 1) * GAP`` pixels tall. Only the latent scatter uses matplotlib, through its Agg
canvas directly (no pyplot, so no global backend or figure state).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

GAP = 2  # px of white between grid cells


def to_unit(x: torch.Tensor, value_range: str) -> torch.Tensor:
    """Model-range images (``signed`` [-1, 1] or ``unit`` [0, 1]) -> [0, 1], clamped."""
    if value_range == "signed":
        x = (x + 1.0) / 2.0
    elif value_range != "unit":
        raise ValueError(f"value_range must be 'signed' or 'unit', got {value_range!r}")
    return x.clamp(0.0, 1.0)


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[N, C, H, W] in [0, 1] (C = 1 or 3) -> N uint8 HWC arrays."""
    hwc = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return list(np.clip(np.rint(hwc * 255.0), 0, 255).astype(np.uint8))


def grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Equal-sized HWC images laid out row by row (rows may be ragged) on white."""
    h, w, c = rows[0][0].shape
    cols = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (h + GAP) - GAP, cols * (w + GAP) - GAP, c), 255, np.uint8)
    for r, row in enumerate(rows):
        for k, image in enumerate(row):
            y, x = r * (h + GAP), k * (w + GAP)
            canvas[y : y + h, x : x + w] = image
    return canvas


def png_bytes(canvas: np.ndarray) -> bytes:
    """Encode an HWC uint8 array (1 channel -> greyscale PNG) without metadata."""
    array = canvas[..., 0] if canvas.shape[-1] == 1 else canvas
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def scatter_png(points: np.ndarray, labels: np.ndarray | None, title: str) -> bytes:
    """2-D points coloured by integer label (tab10), as PNG bytes; deterministic output."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.7)
    else:
        for label in np.unique(labels):
            mask = labels == label
            colour = f"C{int(label) % 10}"
            ax.scatter(points[mask, 0], points[mask, 1], s=4, alpha=0.7, c=colour, label=label)
        ax.legend(markerscale=3, fontsize="small", loc="best")
    ax.set(xlabel="$\\mu_1$", ylabel="$\\mu_2$", title=title)
    buffer = io.BytesIO()
    # Software=None drops matplotlib's version stamp so the bytes only depend on the data.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
