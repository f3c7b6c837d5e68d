"""Tests for pipeline.export and pipeline.encode.session on a tiny untrained autoencoder."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import fsspec
import numpy as np
import pytest
import torch

from pipeline.encode.session import gpu_visible, make_session, providers_for
from pipeline.export import (
    ParityError,
    Sidecar,
    SidecarError,
    check_parity,
    compare_outputs,
    export_encoder_onnx,
    export_model,
    load_sidecar,
    write_sidecar,
)
from pipeline.models import ModelConfig, build_model

RES = 16
# Non-square sizes (multiples of the f4 factor) the one exported graph must serve exactly.
SIZES = [(16, 24), (24, 8), (12, 20)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # Mid-block attention: its reshapes must follow the dynamic height/width.
    cfg = ModelConfig(
        ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, groups=4, attention=True
    )
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc")
    sidecar = export_model(model, str(out), RES, parity_batch=2)
    return out, sidecar


@pytest.mark.parametrize("batch", [1, 3])
def test_parity_dynamic_batch(model, exported, batch):
    onnx_path = str(exported[0] / "encoder.onnx")
    diff = check_parity(onnx_path, model, RES, batch=batch, atol=1e-4, seed=batch)
    assert 0.0 <= diff <= 1e-4
    sess = make_session(onnx_path, device="cpu")
    mean, logvar = sess.run(None, {"image": np.zeros((batch, 3, RES, RES), np.float32)})
    assert mean.shape == logvar.shape == (batch, 4, RES // 4, RES // 4)
    assert [o.name for o in sess.get_outputs()] == ["mean", "logvar"]
    assert sess.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    for output in sess.get_outputs():
        assert output.shape == ["batch", 4, "latent_height", "latent_width"]


def _images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=gen) * 2 - 1


@pytest.mark.parametrize("size", SIZES)
def test_kl_dynamic_spatial_matches_torch(model, exported, size):
    sess = make_session(str(exported[0] / "encoder.onnx"), device="cpu")
    image = _images(2, *size, seed=size[1])
    mean, logvar = sess.run(None, {"image": image.numpy()})
    with torch.no_grad():
        ref = model.encode(image)
    assert mean.shape == (2, 4, size[0] // 4, size[1] // 4)
    np.testing.assert_allclose(mean, ref.mean.numpy(), atol=1e-4)
    np.testing.assert_allclose(logvar, ref.logvar.numpy(), atol=1e-4)


def test_sd_layout_f8_dynamic_spatial(tmp_path):
    """kl-f8's layout (4 levels, mid attention, embed_dim, asymmetric-pad downsampling), tiny."""
    torch.manual_seed(1)
    cfg = ModelConfig(
        ch=8, ch_mult=[1, 2, 2, 2], z_channels=4, groups=4, attention=True, embed_dim=4
    )
    sd = build_model(cfg).eval()
    sidecar = export_model(sd, str(tmp_path), RES, parity_batch=1)
    assert sidecar.parity["non_square"]["width"] == RES + 16
    sess = make_session(str(tmp_path / "encoder.onnx"), device="cpu")
    for height, width in [(16, 40), (32, 8)]:
        image = _images(1, height, width, seed=height)
        (mean,) = sess.run(["mean"], {"image": image.numpy()})
        with torch.no_grad():
            ref = sd.encode(image).mean.numpy()
        assert list(mean.shape[1:]) == sidecar.latent_shape_for(height, width)
        np.testing.assert_allclose(mean, ref, atol=1e-4)


def test_sidecar_contents(exported):
    out, sidecar = exported
    loaded = load_sidecar(str(out / "encoder.onnx"))
    assert loaded == sidecar
    raw = json.loads((out / "encoder.json").read_text())
    assert raw == sidecar.to_dict() and list(raw)[:3] == ["format", "format_version", "model_kind"]
    assert raw["format"] == "latentpipe.encoder" and raw["format_version"] == 2
    spec = loaded.input
    assert spec.shape == [None, 3, None, None] and spec.resolution == RES
    assert spec.spatial == "dynamic" and spec.size_multiple == 4
    assert loaded.dynamic_spatial and not loaded.is_vq and loaded.vq is None
    assert loaded.latent_shape == [4, 4, 4]  # at the native resolution
    assert loaded.outputs["mean"] == loaded.outputs["logvar"] == [None, 4, None, None]
    assert loaded.downsample_factor == 4 and loaded.model_kind == "kl"
    parity = loaded.parity
    assert parity["batch"] == 2 and parity["max_abs_diff"] <= parity["atol"]
    assert parity["non_square"]["height"] == RES and parity["non_square"]["width"] == RES + 8
    assert parity["non_square"]["max_abs_diff"] <= parity["atol"]
    assert loaded.scaling_factor == 1.0 and loaded.latent_stats["samples"] == 0
    assert raw["model"] == {"path": None, "sha256": None, "step": None}  # no artifact named
    assert loaded.quality is None and loaded.quality_psnr_db() is None


def test_latent_shape_for(exported, vq_exported):
    kl, vq = exported[1], vq_exported[1]
    assert kl.latent_shape_for(RES, RES) == kl.latent_shape == [4, 4, 4]
    assert kl.latent_shape_for(192, 320) == [4, 48, 80]
    # VQ: the quantized latents' shape; the indices are the same without the channel axis.
    assert vq.latent_shape_for(8, 20) == [4, 2, 5]
    for height, width in [(18, 16), (16, 18), (0, 16), (16, -4)]:
        with pytest.raises(ValueError, match="multiples of the encoder's downsample factor 4"):
            kl.latent_shape_for(height, width)


def test_older_sidecar_is_fixed_size(exported):
    old = exported[1].to_dict()
    # Exports before dynamic spatial axes had no input.spatial/size_multiple, and exports before
    # imports no scaling_source: such encoder.json files still load, as fixed-size encoders.
    for key in ("spatial", "size_multiple"):
        del old["input"][key]
    del old["scaling_source"]
    old["input"]["shape"] = [None, 3, RES, RES]
    loaded = Sidecar.from_dict(old, "old/encoder.json")
    assert not loaded.dynamic_spatial and loaded.input.size_multiple == 4
    assert loaded.scaling_source == "data"
    assert loaded.latent_shape_for(RES, RES) == [4, 4, 4]
    with pytest.raises(ValueError, match="fixed input size 16x16"):
        loaded.latent_shape_for(RES, RES + 4)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("onnx_sha256"), "old/encoder.json: missing required field 'onnx_sha256'"),
        (lambda d: d.update(opset="17"), "field 'opset' must be an integer, got '17'"),
        (lambda d: d["input"].pop("resolution"), "missing required field 'input.resolution'"),
        (
            lambda d: d["input"]["normalization"].update(scale=None),
            "field 'input.normalization.scale' must be a number, got None",
        ),
        (lambda d: d.update(latent_shape=[4, 4]), "'latent_shape' must be a list of 3 integers"),
        (lambda d: d.update(model_kind="gan"), "'model_kind' must be one of ['kl', 'vq']"),
        (lambda d: d.update(quality=[1]), "field 'quality' must be a JSON object"),
        (lambda d: d.update(format_version=3), "unsupported 'format_version' 3"),
        (lambda d: d["model"].update(step=-1), "field 'model.step' must be an integer >= 0"),
        (lambda d: d.pop("model"), "missing required field 'model'"),
    ],
)
def test_sidecar_fields_are_validated_on_load(exported, edit, message):
    data = exported[1].to_dict()
    edit(data)
    with pytest.raises(SidecarError, match=re.escape(message)):
        Sidecar.from_dict(data, "old/encoder.json")


def test_sidecar_records_quality(exported):
    from pipeline.contracts.sidecar import with_quality

    sidecar = with_quality(exported[1], {"psnr_db": 21.4, "ssim": 0.6, "images": 8})
    assert sidecar.quality_psnr_db() == 21.4
    again = Sidecar.from_dict(json.loads(json.dumps(sidecar.to_dict())), "x")
    assert again == sidecar and list(sidecar.to_dict())[-1] == "quality"
    assert with_quality(sidecar, {"nelbo_nats": 3.0}).quality_psnr_db() is None


def test_export_rejects_classic_vae(tmp_path):
    from pipeline.models import ClassicVAEConfig

    mlp = build_model(ModelConfig(kind="mlp_vae", classic=ClassicVAEConfig(in_channels=3)))
    with pytest.raises(ValueError, match="supports model kinds 'kl' and 'vq'"):
        export_encoder_onnx(mlp, 28, str(tmp_path / "x.onnx"))


def test_sidecar_tamper_detected(exported, tmp_path):
    out, sidecar = exported
    onnx_path = tmp_path / "encoder.onnx"
    onnx_path.write_bytes((out / "encoder.onnx").read_bytes())
    with pytest.raises(SidecarError, match="not found"):
        load_sidecar(str(onnx_path))
    write_sidecar(str(onnx_path), sidecar)  # an .onnx path writes the .json beside it
    assert load_sidecar(str(onnx_path)).onnx_sha256 == sidecar.onnx_sha256
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    with pytest.raises(SidecarError, match="sha256"):
        load_sidecar(str(onnx_path))
    other = {**sidecar.to_dict(), "format": "other"}
    (tmp_path / "encoder.json").write_text(json.dumps(other))
    with pytest.raises(SidecarError, match="format"):
        load_sidecar(str(onnx_path))


def test_export_to_fsspec_url(model):
    url = "memory://export-test/enc"
    sidecar = export_model(model, url, RES, parity_batch=1)
    assert load_sidecar(f"{url}/encoder.onnx").onnx_sha256 == sidecar.onnx_sha256
    fs = fsspec.filesystem("memory")
    fs.rm("/export-test", recursive=True)


def test_parity_error(model, tmp_path):
    ref = {"mean": np.zeros((1, 2), np.float32)}
    assert compare_outputs(ref, {"mean": np.full((1, 2), 1e-5, np.float32)}, atol=1e-4) > 0
    with pytest.raises(ParityError, match="exceeds atol") as err:
        compare_outputs(ref, {"mean": np.full((1, 2), 0.5, np.float32)}, atol=1e-4)
    assert err.value.max_abs_diff == pytest.approx(0.5)
    with pytest.raises(ParityError):
        compare_outputs(ref, {"mean": np.full((1, 2), np.nan, np.float32)}, atol=1.0)
    # A model that drifted from the exported graph must fail the check.
    path = str(tmp_path / "e.onnx")
    export_encoder_onnx(model, RES, path)
    drifted = build_model(model.config).eval()
    drifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        drifted.quant_conv.bias.add_(0.1)
    with pytest.raises(ParityError):
        check_parity(path, drifted, RES, batch=1, atol=1e-4)


def test_export_rejects_bad_resolution(model, tmp_path):
    with pytest.raises(ValueError, match="multiple of the downsample factor 4"):
        export_encoder_onnx(model, 18, str(tmp_path / "x.onnx"))


def test_session_providers_cpu_box(exported, monkeypatch):
    if gpu_visible():
        pytest.skip("GPU visible: CPU-only expectations do not apply")
    assert providers_for("auto") == ["CPUExecutionProvider"]
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="device='cuda'"):
        providers_for("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        providers_for("tpu")
    onnx_path = str(exported[0] / "encoder.onnx")
    assert make_session(onnx_path, threads=1).get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="device='cuda'"):
        make_session(onnx_path, device="cuda")
    with pytest.raises(FileNotFoundError):
        make_session(str(exported[0] / "missing.onnx"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpu_visible() is False


def test_session_is_quiet(exported):
    """Creating an "auto" session on a GPU-less box must not print CUDA errors."""
    code = (
        "import sys; from pipeline.encode.session import make_session;"
        "s = make_session(sys.argv[1]); print(s.get_providers())"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(exported[0] / "encoder.onnx")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    if not gpu_visible():
        assert "CUDA" not in proc.stderr and "cuda" not in proc.stderr.lower(), proc.stderr


def test_latent_moments_from_images(model):
    pytest.importorskip("pipeline.data.images")
    from pipeline.export.stats import latent_moments

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8) for _ in range(5)]
    mean, std, n = latent_moments(model, images)
    assert n == 5 and std > 0 and np.isfinite(mean)
    with torch.no_grad():
        x = torch.from_numpy(np.stack([im.transpose(2, 0, 1) for im in images])).float()
        ref = model.encode(x / 127.5 - 1.0).mean.double()
    assert mean == pytest.approx(ref.mean().item(), abs=1e-5)
    assert std == pytest.approx(ref.std(unbiased=False).item(), rel=1e-4)


def _png(rng: np.random.Generator, size: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _trained_artifact(model, directory, step: int, data: dict):
    """``model`` saved as training saves one (its run's data config in the card)."""
    from pipeline.artifacts import ImageSpec, Provenance, save_model_artifact

    image = ImageSpec(channels=3, value_range="signed", resolution=RES)
    provenance = Provenance(run="runs/r", step=step, data=data)
    return save_model_artifact(
        str(directory), model, model.config, image=image, provenance=provenance
    )


def test_export_from_a_checkpoints_model_artifact(model, tmp_path):
    """Full path: checkpoint dir -> its model/ -> encoder.onnx + encoder.json with stats from the
    shards the card names; the sidecar names the artifact by path and content hash."""
    from pipeline.artifacts import artifact_sha256
    from pipeline.data.tario import TarShardWriter
    from pipeline.export import ExportConfig, export_from_artifact

    rng = np.random.default_rng(0)
    shard_dir = str(tmp_path / "val")
    with TarShardWriter(shard_dir, prefix="val", max_samples=3) as writer:
        for i in range(5):
            writer.write(f"img{i}", {"png": _png(rng, 24)})
    ckpt_dir = tmp_path / "ckpt"
    _trained_artifact(model, ckpt_dir / "model", 7, {"shards": shard_dir, "val_shards": ""})

    out = tmp_path / "export"
    cfg = ExportConfig(model=str(ckpt_dir), output=str(out), parity_batch=2, scale_samples=4)
    sidecar = export_from_artifact(cfg)
    assert sorted(os.listdir(out)) == ["encoder.json", "encoder.onnx", "export-config.yaml"]
    assert "parity_batch: 2" in (out / "export-config.yaml").read_text()
    assert load_sidecar(str(out / "encoder.onnx")) == sidecar
    model_dir = str(ckpt_dir / "model")
    assert sidecar.model.to_dict() == {
        "path": model_dir,
        "sha256": artifact_sha256(model_dir),
        "step": 7,
    }
    stats = sidecar.latent_stats
    assert stats["samples"] == 4 and stats["source"] == shard_dir
    assert sidecar.scaling_factor == pytest.approx(1.0 / stats["std"])
    assert sidecar.shift_factor == pytest.approx(stats["mean"])
    assert export_from_artifact(dataclasses.replace(cfg, model=model_dir)).model == sidecar.model


def test_export_from_a_run_directory_takes_its_newest_checkpoint(model, tmp_path):
    """model=RUN_DIR (what a job chain knows before training ends) exports the newest
    complete checkpoint_*; one cut short is passed over; a directory without any is refused,
    naming it."""
    from pipeline.export import ExportConfig, export_from_artifact

    run = tmp_path / "run"
    for step in (3, 7, 9):
        _trained_artifact(model, run / f"checkpoint_{step:08d}" / "model", step, {"shards": ""})
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's, not a checkpoint
    weights = run / "checkpoint_00000009" / "model" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # an upload cut short

    cfg = ExportConfig(model=str(run), output=str(tmp_path / "out"), scale_samples=0)
    sidecar = export_from_artifact(cfg)
    assert sidecar.model.path == str(run / "checkpoint_00000007" / "model")
    assert sidecar.model.step == 7
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        export_from_artifact(ExportConfig(model=str(empty), output=str(tmp_path / "o2")))


def test_export_config_is_structured():
    from omegaconf import OmegaConf

    from pipeline.export import ExportConfig

    cfg = OmegaConf.merge(OmegaConf.structured(ExportConfig), {"model": "c", "output": "o"})
    assert OmegaConf.to_object(cfg).opset == 17


# ---- VQ encoders: indices + quantized, codebook.npy pinned by the sidecar ------------------


def _tiny_vq(distance: str = "l2"):
    from pipeline.models import VQConfig

    torch.manual_seed(0)
    vq = VQConfig(num_codes=32, code_dim=4, distance=distance)
    cfg = ModelConfig(
        kind="vq", ch=8, ch_mult=[1, 2, 2], z_channels=4, groups=4, attention=True, vq=vq
    )
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def vq_model():
    return _tiny_vq()


@pytest.fixture(scope="module")
def vq_exported(vq_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("vq_enc")
    return out, export_model(vq_model, str(out), RES, parity_batch=2)


@pytest.mark.parametrize("batch", [1, 3])
def test_vq_onnx_indices_equal_torch(vq_model, vq_exported, batch):
    sess = make_session(str(vq_exported[0] / "encoder.onnx"), device="cpu")
    assert [o.name for o in sess.get_outputs()] == ["indices", "quantized"]
    # 3-D indices output pinned, with the same symbols as the quantized latents
    assert sess.get_outputs()[0].shape == ["batch", "latent_height", "latent_width"]
    assert sess.get_outputs()[1].shape == ["batch", 4, "latent_height", "latent_width"]
    image = torch.rand(batch, 3, RES, RES, generator=torch.Generator().manual_seed(batch)) * 2 - 1
    with torch.no_grad():
        ref_idx, ref_q = vq_model.export_forward(image)
    idx, quantized = sess.run(None, {"image": image.numpy()})
    assert idx.dtype == np.int64 and idx.shape == (batch, 4, 4)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_allclose(quantized, ref_q.numpy(), atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
def test_vq_dynamic_spatial_indices_exact(vq_model, vq_exported, size):
    sess = make_session(str(vq_exported[0] / "encoder.onnx"), device="cpu")
    image = _images(2, *size, seed=size[0])
    idx, quantized = sess.run(None, {"image": image.numpy()})
    with torch.no_grad():
        ref_idx, ref_q = vq_model.export_forward(image)
    assert list(quantized.shape[1:]) == vq_exported[1].latent_shape_for(*size)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_allclose(quantized, ref_q.numpy(), atol=1e-6)


def test_vq_sidecar_and_codebook(vq_model, vq_exported):
    from pipeline.export import file_sha256

    out, sidecar = vq_exported
    assert sorted(os.listdir(out)) == ["codebook.npy", "encoder.json", "encoder.onnx"]
    loaded = load_sidecar(str(out / "encoder.onnx"))
    assert loaded == sidecar and loaded.is_vq
    raw = json.loads((out / "encoder.json").read_text())
    assert raw == sidecar.to_dict()  # the VQ fields stay flat top-level keys, as before
    assert (raw["num_codes"], raw["index_shape"], raw["codebook_file"]) == (
        32,
        [4, 4],
        "codebook.npy",
    )
    vq = loaded.vq
    assert loaded.model_kind == "vq" and vq.distance == "l2"
    assert (vq.num_codes, vq.code_dim, vq.index_dtype) == (32, 4, "uint16")
    assert loaded.outputs == {
        "indices": [None, None, None],
        "quantized": [None, 4, None, None],
    }
    assert loaded.output_dtypes == {"indices": "int64", "quantized": "float32"}
    assert loaded.latent_shape == [4, 4, 4] and vq.index_shape == [4, 4]
    assert vq.codebook_file == "codebook.npy"
    assert loaded.codebook_url(str(out / "encoder.onnx")) == str(out / "codebook.npy")
    assert vq.codebook_sha256 == file_sha256(str(out / "codebook.npy"))
    codebook = np.load(out / "codebook.npy")
    assert codebook.dtype == np.float32
    np.testing.assert_array_equal(codebook, vq_model.quantize.codes().numpy())
    parity = loaded.parity
    assert parity["index_mismatches"] == 0 and parity["indices_compared"] == 2 * 16
    assert parity["max_abs_diff"] <= parity["atol"]
    other = parity["non_square"]  # 16x24 images: 4x6 codes each
    assert (other["height"], other["width"], other["indices_compared"]) == (RES, RES + 8, 2 * 24)
    assert other["index_mismatches"] == 0


def test_vq_codebook_tamper_detected(vq_exported, tmp_path):
    out, _ = vq_exported
    for name in ("encoder.onnx", "encoder.json", "codebook.npy"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    onnx_path = str(tmp_path / "encoder.onnx")
    assert load_sidecar(onnx_path).model_kind == "vq"
    codebook = np.load(tmp_path / "codebook.npy")
    codebook[0, 0] += 1e-3
    np.save(tmp_path / "codebook.npy", codebook)
    with pytest.raises(SidecarError, match="codebook file was changed"):
        load_sidecar(onnx_path)
    (tmp_path / "codebook.npy").unlink()
    with pytest.raises(SidecarError, match="codebook file not found"):
        load_sidecar(onnx_path)
    assert load_sidecar(onnx_path, verify_hash=False).vq.num_codes == 32


def test_vq_index_dtype_boundary():
    from pipeline.export import index_dtype

    assert index_dtype(256) == index_dtype(65536) == "uint16"
    assert index_dtype(65537) == "int32"


def test_vq_parity_ties_and_real_mismatches():
    from pipeline.export import IndexParityError
    from pipeline.export.parity import compare_vq_outputs, torch_reference

    model = _tiny_vq()
    with torch.no_grad():  # code 31 duplicates code 0: every latent is equidistant from both
        model.quantize.codebook[31] = model.quantize.codebook[0]
    images = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = torch_reference(model, images)
    ref["indices"].reshape(-1)[0] = 0  # say torch chose code 0 here ...
    ref["quantized"][0, :, 0, 0] = model.quantize.codes()[0].numpy()
    tie = {k: v.copy() for k, v in ref.items()}
    tie["indices"].reshape(-1)[0] = 31  # ... and ORT its duplicate: an exact tie, accepted
    report = compare_vq_outputs(model, images, ref, tie, atol=1e-4)
    assert (report["index_mismatches"], report["index_ties"]) == (1, 1)
    codes = model.quantize.codes()
    far = {k: v.copy() for k, v in ref.items()}
    first = int(ref["indices"].reshape(-1)[1])
    far["indices"].reshape(-1)[1] = int(((codes - codes[first]) ** 2).sum(1).argmax())
    with pytest.raises(IndexParityError, match="1 of 32 code indices differ"):
        compare_vq_outputs(model, images, ref, far, atol=1e-4)


def test_vq_drifted_model_fails_parity(vq_model, tmp_path):
    path = str(tmp_path / "e.onnx")
    export_encoder_onnx(vq_model, RES, path)
    drifted = build_model(vq_model.config).eval()
    drifted.load_state_dict(vq_model.state_dict())
    with torch.no_grad():
        drifted.quantize.codebook.mul_(-1.0)
    with pytest.raises(ParityError):
        check_parity(path, drifted, RES, batch=2, atol=1e-4)


def test_vq_cosine_export_stores_unit_codes(tmp_path):
    model = _tiny_vq("cosine")
    with torch.no_grad():
        model.quantize.codebook.mul_(3.0)  # stored rows not unit: lookup normalises them
    sidecar = export_model(model, str(tmp_path), RES, parity_batch=2)
    codebook = np.load(tmp_path / "codebook.npy")
    np.testing.assert_allclose(np.linalg.norm(codebook, axis=1), 1.0, rtol=1e-6)
    assert sidecar.vq.distance == "cosine" and sidecar.parity["index_mismatches"] == 0


def test_vq_latent_moments_use_quantized(vq_model):
    from pipeline.export.stats import latent_moments

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8) for _ in range(3)]
    mean, std, n = latent_moments(vq_model, images)
    x = torch.from_numpy(np.stack([im.transpose(2, 0, 1) for im in images])).float()
    with torch.no_grad():
        ref = vq_model.export_forward(x / 127.5 - 1.0)[1].double()
    assert n == 3
    assert mean == pytest.approx(ref.mean().item(), abs=1e-6)
    assert std == pytest.approx(ref.std(unbiased=False).item(), rel=1e-5)
