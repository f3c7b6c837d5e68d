"""Two gloo ranks feed different data to the vector quantizer; codebooks must stay identical.

Covers the k-means initialisation (rank 0 computes, broadcast), EMA statistics (all-reduced) and
dead-code re-seeding (rank 0 picks replacements, broadcast), for l2 and cosine distance, plus a
DDP-wrapped VQ autoencoder with ``broadcast_buffers=False`` so that only the quantizer's own
collectives keep its buffers in step.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.models import ModelConfig, build_model
from pipeline.models.quantizer import VectorQuantizer, VQConfig

WORLD = 2
STEPS = 6
RANK_LOCAL = ("recent", "recent_filled", "recent_ptr")  # ring buffer of each rank's own inputs


def _rank_data(rank: int) -> torch.Tensor:
    """Three repeated points that differ per rank, as a [4, 3, 8, 8] latent map.

    With 16 codes k-means leaves duplicate centroids; ties go to the lowest index, so the
    duplicates stay unused and are re-seeded after the window.
    """
    gen = torch.Generator().manual_seed(100 + rank)
    centres = torch.randn(3, 3, generator=gen) * 2 + (4.0 if rank else -4.0)
    rows = centres[torch.randint(3, (256,), generator=gen)]
    return rows.reshape(4, 8, 8, 3).permute(0, 3, 1, 2).contiguous()


def _quantizer_run(rank: int, distance: str) -> dict:
    torch.manual_seed(0)  # identical initial codebook on every rank
    cfg = VQConfig(
        num_codes=16,
        code_dim=3,
        ema_decay=0.8,
        dead_code_window=2,
        kmeans_init=True,
        distance=distance,
        reseed_buffer=64,
    )
    q = VectorQuantizer(cfg).train()
    initial = q.codebook.clone()
    torch.manual_seed(1000 + rank)  # rank-local randomness must not matter
    z = _rank_data(rank)
    for step in range(STEPS):
        q(z + 0.01 * step)
    return {"initial": initial, "state": q.state_dict()}


def _model_run(rank: int) -> dict:
    torch.manual_seed(0)
    vq = VQConfig(num_codes=16, code_dim=4, dead_code_window=2, kmeans_init=True)
    cfg = ModelConfig(kind="vq", ch=8, ch_mult=[1, 2], num_res_blocks=1, groups=4, vq=vq)
    ddp = torch.nn.parallel.DistributedDataParallel(build_model(cfg), broadcast_buffers=False)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    torch.manual_seed(2000 + rank)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for _ in range(3):
        recon, info = ddp(x)
        loss = (recon - x).abs().mean() + info["vq_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"state": ddp.module.state_dict()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # DDP's broadcast_buffers is deprecated in favour of forward_sync_buffers, which would still
    # sync buffers at init; the test needs none of DDP's buffer syncing at all.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        result = {d: _quantizer_run(rank, d) for d in ("l2", "cosine")}
        result["model"] = _model_run(rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _assert_same(a: dict, b: dict, prefix: str = "") -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key.rsplit(".", 1)[-1] in RANK_LOCAL:
            continue
        assert torch.equal(a[key], b[key]), f"{prefix}{key} differs across ranks"


def test_codebooks_identical_across_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for distance in ("l2", "cosine"):
        s0, s1 = r0[distance]["state"], r1[distance]["state"]
        _assert_same(s0, s1, f"{distance}: ")
        assert int(s0["initialised"]) == 1
        assert int(s0["reseed_total"]) > 0  # the dead-code path ran under distribution
        assert not torch.allclose(s0["codebook"], r0[distance]["initial"])
        assert torch.equal(r0[distance]["initial"], r1[distance]["initial"])
        assert not torch.equal(s0["recent"], s1["recent"])  # the ranks really saw different data
    m0, m1 = r0["model"]["state"], r1["model"]["state"]
    _assert_same(m0, m1, "model: ")
    assert int(m0["quantize.initialised"]) == 1
