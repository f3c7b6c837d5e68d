"""`make_report`: every picture exists, has its grid geometry, is listed and is reproducible.

Tiny checkpoints are trained in-process (train.num_workers=0, 2 steps): a KL autoencoder and a
VQ autoencoder on the sample corpus (the VQ run on memory:// storage, to cover fsspec output)
and a conditional MLP VAE with a 2-D latent on the MNIST shards.
"""

from __future__ import annotations

import io
import json

import fsspec
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.report import ReportConfig, make_report
from pipeline.report.figures import MANIFOLD_SIDE, PRIOR_ROWS, TRAVERSAL_VALUES
from pipeline.report.pictures import GAP
from pipeline.train.config import TrainRunConfig
from pipeline.train.run import train
from tests.conftest import TINY_TRAIN

IMAGES = 4  # grid columns; fewer than the default 8 keeps the test quick
TINY_STEPS = ["train.num_workers=0", "train.steps=2", "train.log_every=1"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convs: on a busy 2-core box OpenMP's spinning threads made a report ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _span(n: int, size: int) -> int:
    """Pixels taken by n cells of `size` px with GAP px between them."""
    return n * size + (n - 1) * GAP


def _train(yaml: str | None, overrides: list[str]) -> str:
    return train(load_config(TrainRunConfig, yaml, [*overrides, *TINY_STEPS]))["run_dir"]


@pytest.fixture(scope="module")
def kl_run(tiny_shards, tmp_path_factory) -> str:
    storage = tmp_path_factory.mktemp("report-kl")
    return _train(
        None, [f"data.shards={tiny_shards}", *TINY_TRAIN, f"train.storage_path={storage}"]
    )


@pytest.fixture(scope="module")
def vq_run(tiny_shards) -> str:
    overrides = [f"data.shards={tiny_shards}", *TINY_TRAIN, "model.kind=vq"]
    storage = "train.storage_path=memory://report-tests"
    return _train(None, [*overrides, "model.vq.num_codes=16", storage, "train.run_name=vq"])


@pytest.fixture(scope="module")
def cvae_run(mnist_shards, tmp_path_factory) -> str:
    overrides = [
        f"data.shards={mnist_shards['train']}",
        f"data.val_shards={mnist_shards['test']}",
        "data.shuffle_buffer=0",
        "data.batch_size=16",
        "model.classic.latent_dim=2",
        f"train.storage_path={tmp_path_factory.mktemp('report-cvae')}",
    ]
    return _train("configs/train/mnist-cvae.yaml", overrides)


def _read(run: str, name: str) -> bytes:
    return fsspec.open(f"{run}/report/{name}", "rb").open().read()


def _image(run: str, name: str) -> Image.Image:
    image = Image.open(io.BytesIO(_read(run, name)))
    image.load()
    return image


def _check_listed_and_reproducible(run: str, report: dict, expected: set[str], **kw) -> None:
    assert {p["file"] for p in report["pictures"]} == expected
    assert all(p["caption"] for p in report["pictures"])
    assert json.loads(_read(run, "report.json")) == report
    before = {name: _read(run, name) for name in [*expected, "report.json"]}
    make_report(ReportConfig(run=run, images=IMAGES, **kw))
    assert {name: _read(run, name) for name in before} == before


def test_kl_report(kl_run):
    report = make_report(ReportConfig(run=kl_run, images=IMAGES))
    assert report["checkpoint"].endswith("checkpoint_00000002") and report["step"] == 2
    assert report["model_kind"] == "kl"
    size, cols = 32, len(TRAVERSAL_VALUES)
    geometry = {
        "reconstructions.png": (_span(IMAGES, size), _span(2, size)),
        "prior_samples.png": (_span(IMAGES, size), _span(PRIOR_ROWS, size)),
        "interpolation.png": (_span(12, size), size),  # 2 originals + 10 steps
        "traversal.png": (_span(cols, size), _span(4, size)),  # one row per latent channel
    }
    for name, wh in geometry.items():
        image = _image(kl_run, name)
        assert (image.size, image.mode) == (wh, "RGB"), name
    assert "tiny KL weight" in report["pictures"][1]["caption"]
    assert {s["file"] for s in report["skipped"]} == {"latent_scatter.png", "manifold.png"}
    _check_listed_and_reproducible(kl_run, report, set(geometry))
    seed0 = _read(kl_run, "prior_samples.png")
    make_report(ReportConfig(run=kl_run, images=IMAGES, seed=1))
    assert _read(kl_run, "prior_samples.png") != seed0  # the seed picks the prior draws


def test_vq_report_on_fsspec_storage_skips_the_prior(vq_run):
    report = make_report(ReportConfig(run=vq_run, images=IMAGES))
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert "no prior" in skipped["prior_samples.png"]
    assert "quantised" in report["pictures"][1]["caption"]  # interpolation says how
    assert _image(vq_run, "reconstructions.png").size == (_span(IMAGES, 32), _span(2, 32))
    expected = {"reconstructions.png", "interpolation.png", "traversal.png"}
    _check_listed_and_reproducible(vq_run, report, expected)


def test_conditional_2d_vae_report(cvae_run):
    report = make_report(ReportConfig(run=cvae_run, images=IMAGES))
    assert report["model_kind"] == "ConditionalVAE" and report["skipped"] == []
    size, side = 28, MANIFOLD_SIDE
    geometry = {
        "reconstructions.png": (_span(IMAGES, size), _span(2, size)),
        "prior_samples.png": (_span(IMAGES, size), _span(10, size)),  # one row per class
        "interpolation.png": (_span(12, size), size),
        "traversal.png": (_span(len(TRAVERSAL_VALUES), size), _span(2, size)),  # 2 dims
        "manifold.png": (_span(side, size), _span(side, size)),
    }
    for name, wh in geometry.items():
        image = _image(cvae_run, name)
        assert (image.size, image.mode) == (wh, "L"), name  # greyscale digits
    assert _image(cvae_run, "latent_scatter.png").size == (500, 500)
    assert "coloured by label" in report["pictures"][4]["caption"]
    _check_listed_and_reproducible(cvae_run, report, {*geometry, "latent_scatter.png"})


def test_explicit_model_and_missing_run(kl_run, tmp_path):
    checkpoint = f"{kl_run}/checkpoint_00000002"
    report = make_report(ReportConfig(run=kl_run, model=checkpoint, images=2))
    assert report["step"] == 2 and report["model"] == f"{checkpoint}/model"
    assert make_report(ReportConfig(run=kl_run, model=f"{checkpoint}/model", images=2)) == report
    with pytest.raises(FileNotFoundError, match="nor a complete checkpoint"):
        make_report(ReportConfig(run=str(tmp_path)))


def test_greyscale_signed_images_become_an_exact_greyscale_grid():
    from pipeline.report.pictures import grid, png_bytes, to_uint8, to_unit

    signed = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(4, 1, 1, 1).expand(4, 1, 5, 5)
    cells = to_uint8(to_unit(signed, "signed"))
    assert [int(c[0, 0, 0]) for c in cells] == [0, 128, 255, 255]  # clamped above 1
    image = Image.open(io.BytesIO(png_bytes(grid([cells[:3], cells[3:]]))))
    assert (image.mode, image.size) == ("L", (_span(3, 5), _span(2, 5)))
    assert image.getpixel((5, 0)) == 255  # the gap is white
