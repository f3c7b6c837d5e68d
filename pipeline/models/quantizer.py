"""Vector quantizer for VQ autoencoders: nearest-code lookup, EMA codebook, dead-code re-seeding.

``VectorQuantizer(cfg)`` maps a latent map [N, C, H, W] (C = ``code_dim``) to its nearest codebook
entries with a straight-through gradient. In training mode it also updates the codebook by
exponential moving averages (unless ``ema_decay == 0``, where the codebook is a parameter learned
from a codebook loss), re-seeds codes left unused for ``dead_code_window`` steps from recent encoder
outputs, and optionally initialises the codebook by k-means on the first training batch.

Every piece of state is a registered buffer (or the codebook parameter), so a checkpoint resumes the
codebook, its EMA statistics, usage counters and the k-means flag exactly.

Distribution: when a ``torch.distributed`` process group is initialised, the per-batch code counts and
embedding sums are all-reduced before the EMA update, and k-means centroids / re-seeded codes are
computed on rank 0 and broadcast, so every rank holds a bit-identical codebook after every step.
This is the only place in ``models/`` that touches distribution.

    python -m pytest -q tests/unit/test_quantizer.py tests/unit/test_vq_ddp.py   # CPU, ~20 s
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Distance(StrEnum):
    l2 = "l2"  # LDM's (and diffusers' VQModel's) nearest code
    cosine = "cosine"  # unit-normalised latents and codes (ViT-VQGAN)


DISTANCES = tuple(Distance)
LAPLACE_EPS = 1e-5  # smoothing of EMA cluster sizes so rarely used codes never divide by ~0


@dataclass
class VQConfig:
    """Codebook settings (`model.vq.*`); used when `model.kind` is `vq`."""

    num_codes: int = 1024  # LDM's vq-f8 uses 16384
    code_dim: int = 4  # LDM's vq-f8: 4 (the embed_dim of the quant conv)
    commitment: float = 0.25  # beta in ||sg[z_q] - z||^2 (VQ-VAE paper default)
    ema_decay: float = 0.99  # EMA codebook updates; 0 = learn the codebook by gradient instead
    dead_code_window: int = 200  # steps a code may go unused before it is re-seeded; 0 = never
    kmeans_init: bool = False  # initialise the codebook by k-means on the first batch(es)
    distance: Distance = Distance.l2
    kmeans_iters: int = 10  # Lloyd iterations of the one-off k-means initialisation
    reseed_buffer: int = 1024  # recent encoder outputs kept to re-seed dead codes from

    def __post_init__(self) -> None:
        # Choices are Enums: a bad value fails at config load (OmegaConf names the key) or here.
        self.distance = Distance(self.distance)


def validate_vq_config(cfg: VQConfig) -> None:
    """Raise ValueError naming the offending ``model.vq.*`` key."""
    for name in ("num_codes", "code_dim", "reseed_buffer"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"model.vq.{name} must be positive, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"model.vq.ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.commitment < 0:
        raise ValueError(f"model.vq.commitment must be >= 0, got {cfg.commitment}")
    if cfg.dead_code_window < 0 or cfg.kmeans_iters < 0:
        raise ValueError("model.vq.dead_code_window and model.vq.kmeans_iters must be >= 0")


def _world() -> int:
    """World size of the default process group, 1 when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _is_rank0() -> bool:
    return _world() == 1 or dist.get_rank() == 0


def _all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (no-op when not distributed)."""
    if _world() > 1:
        dist.all_reduce(tensor)
    return tensor


def _broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank 0's copy (no-op when not distributed)."""
    if _world() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook quantizer with EMA updates and dead-code re-seeding."""

    # Buffers only training reads: EMA statistics, usage counters, the re-seeding pool and the
    # k-means flag. A model artifact ships the codebook alone; training checkpoints keep these.
    TRAINING_BUFFERS = (
        "ema_cluster_size",
        "ema_embed_sum",
        "steps_unused",
        "initialised",
        "reseed_total",
        "recent",
        "recent_filled",
        "recent_ptr",
    )

    def __init__(self, cfg: VQConfig):
        super().__init__()
        validate_vq_config(cfg)
        self.config = cfg
        k, d = cfg.num_codes, cfg.code_dim
        init = torch.randn(k, d)
        if cfg.distance == "cosine":
            init = F.normalize(init, dim=1)
        if cfg.ema_decay > 0:
            self.register_buffer("codebook", init)
        else:
            self.codebook = nn.Parameter(init)
        # EMA statistics start as "each code saw itself once", so codebook == sum / size holds.
        self.register_buffer("ema_cluster_size", torch.ones(k))
        self.register_buffer("ema_embed_sum", init.clone())
        self.register_buffer("steps_unused", torch.zeros(k, dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(int(not cfg.kmeans_init)))
        self.register_buffer("reseed_total", torch.tensor(0))  # codes re-seeded so far
        # Ring buffer of recent (rank-local) encoder outputs to draw dead-code replacements from.
        self.register_buffer("recent", torch.zeros(cfg.reseed_buffer, d))
        self.register_buffer("recent_filled", torch.tensor(0))
        self.register_buffer("recent_ptr", torch.tensor(0))

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    @property
    def code_dim(self) -> int:
        return self.config.code_dim

    # ---- pure lookup (traceable, no state change) ------------------------------------------

    def codes(self) -> torch.Tensor:
        """The codebook as used for lookup: unit rows for cosine distance."""
        if self.config.distance == "cosine":
            return F.normalize(self.codebook, dim=1)
        return self.codebook

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N*H*W, C] in float32, l2-normalised for cosine distance."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        return F.normalize(flat, dim=1) if self.config.distance == "cosine" else flat

    def _nearest(self, flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` (float32 even under autocast)."""
        with torch.autocast(flat.device.type, enabled=False):
            sim = flat @ codes.detach().t()
            if self.config.distance == "cosine":
                return sim.argmax(dim=1)
            # ||x||^2 is constant per row, so argmin ||c||^2 - 2 x.c is the l2 nearest code.
            return (codes.detach().pow(2).sum(1) - 2 * sim).argmin(dim=1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook lookup: int indices [N, H, W] -> quantised latents [N, C, H, W]."""
        return F.embedding(indices, self.codes()).permute(0, 3, 1, 2)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_q [N, C, H, W], indices [N, H, W] int64) with no gradient trick and no updates."""
        n, _, h, w = z.shape
        indices = self._nearest(self._flatten(z), self.codes()).reshape(n, h, w)
        return self.lookup(indices), indices

    # ---- training forward ------------------------------------------------------------------

    def forward(
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantise ``z``; returns (straight-through z_q, indices, {vq_loss, usage, perplexity}).

        z_q is looked up from the codebook as it was *before* this step's EMA update/re-seeding.
        """
        n, c, h, w = z.shape
        flat = self._flatten(z)
        if self.training and self.config.kmeans_init and not bool(self.initialised):
            self._kmeans_init(flat.detach())
        codes = self.codes()
        idx = self._nearest(flat, codes)
        zq = F.embedding(idx, codes)  # carries the codebook gradient when it is a parameter
        loss = self.config.commitment * F.mse_loss(flat, zq.detach())
        if self.config.ema_decay == 0:
            loss = loss + F.mse_loss(zq, flat.detach())
        counts = torch.bincount(idx, minlength=self.num_codes).float()
        if self.training:
            counts, usage = self._train_update(flat.detach(), idx, counts)
        else:
            usage = (counts > 0).float().mean()
        probs = counts / counts.sum().clamp_min(1.0)
        info = {
            "vq_loss": loss,
            "usage": usage,
            "perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
        }
        out = flat + (zq - flat).detach()  # straight-through: value of z_q, gradient of z
        out = out.to(z.dtype).reshape(n, h, w, c).permute(0, 3, 1, 2)
        return out, idx.reshape(n, h, w), info

    @torch.no_grad()
    def _train_update(
        self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce batch statistics, update EMA, counters and dead codes.

        Returns the global code counts and the usage: the fraction of codes used within the last
        ``dead_code_window`` steps (this batch included; just the batch when the window is 0),
        measured before dead codes are re-seeded.
        """
        if self.config.ema_decay > 0:
            sums = torch.zeros(self.num_codes, self.code_dim, device=flat.device)
            sums.index_add_(0, idx, flat)
            # One collective for both: counts are small integers, exact in float32.
            packed = _all_reduce_(torch.cat([counts[:, None], sums], dim=1))
            counts = packed[:, 0].contiguous()
            self._ema_update(counts, packed[:, 1:])
        else:
            counts = _all_reduce_(counts)  # the codebook's gradients are DDP's business
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        self._remember(flat)
        window = self.config.dead_code_window
        if window == 0:
            return counts, (counts > 0).float().mean()
        dead = self.steps_unused >= window
        usage = 1.0 - dead.float().mean()
        # Counters derive from all-reduced counts, so every rank takes the same branch here.
        if bool(dead.any()):
            self._reseed(dead)
        return counts, usage

    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        decay = self.config.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_cluster_size.sum()
        k = self.num_codes
        smoothed = (self.ema_cluster_size + LAPLACE_EPS) / (total + k * LAPLACE_EPS) * total
        self.codebook.copy_(self.ema_embed_sum / smoothed[:, None])

    def _remember(self, flat: torch.Tensor) -> None:
        """Write a random sample of this batch's inputs into the ring buffer ``recent``.

        Pointer arithmetic stays on the device so that no step waits on a host sync here.
        """
        size = self.recent.shape[0]
        take = min(flat.shape[0], size)
        sample = flat[torch.randperm(flat.shape[0], device=flat.device)[:take]]
        rows = (torch.arange(take, device=flat.device) + self.recent_ptr) % size
        self.recent[rows] = sample
        self.recent_ptr.add_(take).remainder_(size)
        self.recent_filled.add_(take).clamp_(max=size)

    def _set_codes(self, mask: torch.Tensor, new: torch.Tensor) -> None:
        """Replace the codes selected by ``mask`` and restart their EMA stats and counters."""
        self.codebook.data[mask] = new
        self.ema_embed_sum[mask] = new
        self.ema_cluster_size[mask] = 1.0
        self.steps_unused[mask] = 0

    def _reseed(self, dead: torch.Tensor) -> None:
        """Re-seed dead codes from recent encoder outputs chosen on rank 0 and broadcast."""
        num = int(dead.sum())
        new = torch.empty(num, self.code_dim, device=self.recent.device)
        if _is_rank0():
            pool = self.recent[: max(int(self.recent_filled), 1)]
            pick = (
                torch.randperm(pool.shape[0], device=pool.device)[:num]
                if pool.shape[0] >= num
                else torch.randint(pool.shape[0], (num,), device=pool.device)
            )
            new.copy_(pool[pick])
        self._set_codes(dead, _broadcast_(new))
        self.reseed_total.add_(num)

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        """Initialise the codebook with a few Lloyd iterations on rank 0's first batch, once."""
        k = self.num_codes
        centroids = torch.empty(k, self.code_dim, device=flat.device)
        if _is_rank0():
            centroids.copy_(self._kmeans(flat, k))
        self._set_codes(torch.ones(k, dtype=torch.bool, device=flat.device), _broadcast_(centroids))
        self.initialised.fill_(1)

    def _kmeans(self, data: torch.Tensor, k: int) -> torch.Tensor:
        """Plain Lloyd's algorithm (spherical for cosine); empty clusters keep their centroid."""
        n = data.shape[0]
        pick = torch.randperm(n)[:k] if n >= k else torch.randint(n, (k,))
        centroids = data[pick.to(data.device)].clone()
        for _ in range(self.config.kmeans_iters):
            assign = self._nearest(data, centroids)
            size = torch.bincount(assign, minlength=k).float()
            sums = torch.zeros_like(centroids).index_add_(0, assign, data)
            filled = size > 0
            centroids[filled] = sums[filled] / size[filled, None]
            if self.config.distance == "cosine":
                centroids = F.normalize(centroids, dim=1)
        return centroids
