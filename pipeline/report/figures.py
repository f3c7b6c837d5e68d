"""The report's pictures, each built from a codec (see `codecs`) and a batch of validation images.

Every builder returns a `Picture`: a file name, a one-line caption and the PNG bytes, or no bytes
when the picture does not apply to this model (the caption then says why). Nothing here reads
or writes files; `job` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.report.pictures import grid, png_bytes, scatter_png, to_uint8, to_unit

PRIOR_ROWS = 4  # rows of prior samples for an unconditional model
INTERPOLATION_STEPS = 10
TRAVERSAL_VALUES = torch.linspace(-3.0, 3.0, 9)  # odd, so the middle column is the unshifted latent
TRAVERSAL_MAX_ROWS = 10
MANIFOLD_SIDE = 15  # Kingma & Welling fig. 4 style grid, MANIFOLD_SIDE x MANIFOLD_SIDE decodes


@dataclass
class ValBatch:
    """Validation images in the model's input range, with integer labels where the data has them."""

    images: torch.Tensor  # [N, C, R, R]
    labels: torch.Tensor | None  # [N] int64
    value_range: str  # of `images`: "signed" or "unit"

    def take(self, index) -> tuple[torch.Tensor, torch.Tensor | None]:
        labels = None if self.labels is None else self.labels[index]
        return self.images[index], labels

    def originals(self, index) -> list[np.ndarray]:
        return to_uint8(to_unit(self.images[index], self.value_range))


@dataclass
class Picture:
    file: str
    caption: str
    png: bytes | None = None  # None: skipped, the caption says why


def _rows(images: torch.Tensor, per_row: int) -> list[list[np.ndarray]]:
    flat = to_uint8(images)
    return [flat[i : i + per_row] for i in range(0, len(flat), per_row)]


_RECON_HOW = {
    "kl": "decoded posterior means",
    "vq": "decoded quantised latents",
    "classic": "decoder means of mu (to_image(decode(mu)))",
}


def reconstructions(codec, batch: ValBatch, n: int) -> Picture:
    x, y = batch.take(slice(0, n))
    decoded = to_uint8(codec.decode(codec.encode(x, y), y))
    png = png_bytes(grid([batch.originals(slice(0, n)), decoded]))
    caption = f"top: {len(decoded)} validation images; bottom: {_RECON_HOW[codec.kind]}"
    return Picture("reconstructions.png", caption, png)


def prior_samples(codec, n: int, generator: torch.Generator) -> Picture:
    name = "prior_samples.png"
    if not codec.has_prior:
        return Picture(name, "a VQ autoencoder has no prior without a learned one")
    if codec.conditional:
        classes = codec.model.cfg.num_classes
        labels = torch.arange(classes).repeat_interleave(n)
        png = png_bytes(grid(_rows(codec.generate(labels, generator), n)))
        return Picture(name, f"z ~ N(0, I) decoded, one row per class 0..{classes - 1}", png)
    png = png_bytes(grid(_rows(codec.prior(PRIOR_ROWS * n, generator), n)))
    caption = f"{PRIOR_ROWS * n} draws z ~ N(0, I) of shape {list(codec.latent_shape)}, decoded"
    if codec.kind == "kl":
        caption += (
            "; not meant to look like images: a KL autoencoder is trained with a tiny KL weight,"
            " so its latents are far from N(0, I)"
        )
    return Picture(name, caption, png)


def _pair(batch: ValBatch, conditional: bool) -> tuple[int, int]:
    """Endpoints: images 0 and 1; a conditional model wants two of the same class."""
    n = batch.images.shape[0]
    if conditional and batch.labels is not None:
        same = [i for i in range(1, n) if batch.labels[i] == batch.labels[0]]
        if same:
            return 0, same[0]
    return 0, min(1, n - 1)


def interpolation(codec, batch: ValBatch) -> Picture:
    a, b = _pair(batch, codec.conditional)
    x, y = batch.take([a, b])
    z = codec.encode(x, y)
    t = torch.linspace(0.0, 1.0, INTERPOLATION_STEPS).view(-1, *[1] * (z.dim() - 1))
    mixed = (1 - t) * z[0] + t * z[1]
    ys = None if y is None else y[:1].repeat(INTERPOLATION_STEPS)
    ends = batch.originals([a, b])
    row = [ends[0], *to_uint8(codec.decode(mixed, ys)), ends[1]]
    how = {
        "vq": "linear mix of pre-quantisation latents, quantised, then decoded",
        "kl": "linear mix of posterior means, decoded",
        "classic": "linear mix of mu, decoded",
    }[codec.kind]
    caption = f"validation images {a} and {b} at the ends; {INTERPOLATION_STEPS} steps: {how}"
    if codec.conditional and y is not None:
        ends_are = "both ends are" if int(y[0]) == int(y[1]) else "the first end is"
        caption += f" with label {int(y[0])} ({ends_are} of that class)"
    return Picture("interpolation.png", caption, png_bytes(grid([row])))


def traversal(codec, batch: ValBatch) -> Picture:
    x, y = batch.take(slice(0, None))
    if codec.spatial:
        latents, caption = _channel_traversal(codec, codec.encode(x, y))
        ys = None
    else:
        latents, caption = _dim_traversal(codec, x, y)
        ys = None if y is None else y[:1].repeat(latents.shape[0])
    decoded = codec.decode(latents, ys)
    return Picture("traversal.png", caption, png_bytes(grid(_rows(decoded, len(TRAVERSAL_VALUES)))))


def _channel_traversal(codec, latents: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Shift one latent channel of image 0 by k * (that channel's std over the batch)."""
    channels = min(latents.shape[1], TRAVERSAL_MAX_ROWS)
    std = latents.std(dim=(0, 2, 3)) if latents.shape[0] > 1 else latents.std(dim=(2, 3))[0]
    rows = latents[:1].repeat(channels * len(TRAVERSAL_VALUES), 1, 1, 1)
    for c in range(channels):
        block = slice(c * len(TRAVERSAL_VALUES), (c + 1) * len(TRAVERSAL_VALUES))
        rows[block, c] += TRAVERSAL_VALUES.view(-1, 1, 1) * std[c]
    which = "pre-quantisation latent (quantised before decoding)" if codec.kind == "vq" else "mean"
    caption = (
        f"row c: channel c of validation image 0's {which} shifted by k * its std, "
        f"k = -3..3 ({len(TRAVERSAL_VALUES)} columns), channels 0..{channels - 1}"
    )
    return rows, caption


def _dim_traversal(codec, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, str]:
    """Set one latent dim of image 0's mu to -3..3; rows are the dims with the largest KL."""
    mu, logvar = codec.posterior(x, y)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean(dim=0)
    dims = torch.argsort(kl, descending=True, stable=True)[:TRAVERSAL_MAX_ROWS].tolist()
    rows = mu[:1].repeat(len(dims) * len(TRAVERSAL_VALUES), 1)
    for r, d in enumerate(dims):
        rows[r * len(TRAVERSAL_VALUES) : (r + 1) * len(TRAVERSAL_VALUES), d] = TRAVERSAL_VALUES
    caption = (
        f"rows: latent dims {dims} (largest mean KL first), each set to -3..3 "
        f"({len(TRAVERSAL_VALUES)} columns) in validation image 0's mu, other dims kept"
    )
    return rows, caption


def latent_scatter(codec, batch: ValBatch) -> Picture:
    name = "latent_scatter.png"
    if codec.latent_shape != (2,):
        return Picture(name, f"only for a 2-D latent (this one is {codec.latent_shape})")
    x, y = batch.take(slice(0, None))
    mu = codec.encode(x, y).numpy()
    labels = None if batch.labels is None else batch.labels.numpy()
    coloured = "coloured by label" if labels is not None else "no labels in the data"
    png = scatter_png(mu, labels, f"mu of {len(mu)} validation images")
    caption = f"posterior means mu of {len(mu)} validation images, {coloured}"
    if codec.conditional:
        caption += "; the label is an input, so mu need not separate the classes"
    return Picture(name, caption, png)


def manifold(codec, batch: ValBatch) -> Picture:
    name = "manifold.png"
    if codec.latent_shape != (2,):
        return Picture(name, f"only for a 2-D latent (this one is {codec.latent_shape})")
    # Inverse-normal-CDF spacing: equal prior mass per cell (Kingma & Welling 2014, fig. 4).
    q = torch.linspace(0.05, 0.95, MANIFOLD_SIDE, dtype=torch.float64)
    values = torch.special.ndtri(q).float()
    z2, z1 = torch.meshgrid(values.flip(0), values, indexing="ij")  # top row = largest z2
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1)
    label = None
    if codec.conditional:
        label = int(batch.labels[0]) if batch.labels is not None else 0
    ys = None if label is None else torch.full((z.shape[0],), label, dtype=torch.long)
    png = png_bytes(grid(_rows(codec.decode(z, ys), MANIFOLD_SIDE)))
    caption = (
        f"{MANIFOLD_SIDE}x{MANIFOLD_SIDE} decodes of z = (Phi^-1(u1), Phi^-1(u2)), "
        "u in [0.05, 0.95]; z1 grows to the right, z2 upwards"
    )
    if label is not None:
        caption += f"; decoded with label {label}"
    return Picture(name, caption, png)
