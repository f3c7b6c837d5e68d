"""Fixtures for integration tests: one embedded Ray for the whole session and a tiny encoder."""

from __future__ import annotations

import logging
import os

import pytest


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """Embedded Ray on 2 CPUs, quiet (no dashboard, no progress bars), shut down at the end.

    Started after the moto S3 server, so its workers inherit the endpoint and test credentials:
    encode's workers read and write s3:// themselves."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if ray.is_initialized():  # another fixture or the code under test got there first
        yield ray
        return
    ray.init(
        address="local",  # always our own: never join a cluster another process started
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """Export an untrained f2, 4-channel KL autoencoder at 16 px; returns the encoder.onnx path."""
    import torch

    from pipeline.export import export_model
    from pipeline.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(ch=8, ch_mult=[1, 2], z_channels=4, groups=4))
    out = tmp_path_factory.mktemp("encoder")
    export_model(model, str(out), resolution=16, scale_samples=0)
    return str(out / "encoder.onnx")


@pytest.fixture(scope="session")
def tiny_vq_encoder(tmp_path_factory) -> str:
    """Export an untrained f2 VQ autoencoder (64 codes of dim 4) at 16 px; returns encoder.onnx."""
    import torch

    from pipeline.export import export_model
    from pipeline.models import ModelConfig, VQConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        kind="vq", ch=8, ch_mult=[1, 2], z_channels=4, groups=4, vq=VQConfig(num_codes=64)
    )
    out = tmp_path_factory.mktemp("vq_encoder")
    export_model(build_model(cfg), str(out), resolution=16, scale_samples=0)
    return str(out / "encoder.onnx")


def run_short_demo(workdir, *config_files: str, overrides: tuple[str, ...] = ()) -> dict:
    """`latentpipe demo` on a short schedule at 32 px, as a user runs it; its summary.json."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "demo",
            *config_files,
            f"workdir={workdir}",
            "train.steps=30",
            "train.log_every=10",
            "train.checkpoint_every=30",
            "data.resolution=32",
            "shards.tile_size=48",
            "shards.tile_stride=48",
            "export.scale_samples=64",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((workdir / "summary.json").read_text())
