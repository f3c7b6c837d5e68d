"""diffusers AutoencoderKL -> latentpipe: outputs match diffusers, the export chain works, bad
inputs fail with messages that name the problem. Tiny random models (channels [32, 64], 32x32)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from pipeline.artifacts import artifact_sha256, load_model_artifact, read_card  # noqa: E402
from pipeline.artifacts.diffusers_format import model_config_from_diffusers  # noqa: E402
from pipeline.encode.finalize import manifest_scale  # noqa: E402
from pipeline.encode.session import make_session  # noqa: E402
from pipeline.export import ExportConfig, export_from_artifact, load_sidecar  # noqa: E402
from pipeline.importers.diffusers import (  # noqa: E402
    ImportConfig,
    import_diffusers,
    load_diffusers_autoencoder,
)

RES = 32
BASE = dict(
    block_out_channels=[32, 64],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=RES,
    scaling_factor=0.5,
    shift_factor=0.1,
)
VARIANTS = {
    "plain": {},
    "attn-level": dict(
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    ),
    "no-quant-conv": dict(
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False
    ),
}


def make_vae(**overrides):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**{**BASE, **overrides}).eval()
    with torch.no_grad():  # GroupNorm starts at (1, 0): perturb so a mis-mapped norm shows
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    vae = make_vae()
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(str(path))
    return vae, path


def assert_same_outputs(vae, model, atol=1e-5):
    x = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, post = vae.encode(x).latent_dist, model.encode(x)
        torch.testing.assert_close(post.mean, ref.mean, atol=atol, rtol=0)
        torch.testing.assert_close(post.logvar, ref.logvar, atol=atol, rtol=0)
        torch.testing.assert_close(model.decode(z), vae.decode(z).sample, atol=atol, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_outputs_match_diffusers(variant, tmp_path):
    vae = make_vae(**VARIANTS[variant])
    vae.save_pretrained(str(tmp_path))
    model, _, info = load_diffusers_autoencoder(str(tmp_path))
    assert info["weights"] == "diffusion_pytorch_model.safetensors"
    assert_same_outputs(vae, model)


def test_config_translation(saved):
    config = json.loads((saved[1] / "config.json").read_text())
    cfg = model_config_from_diffusers(config)
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.groups) == (
        32,
        [1, 2],
        1,
        4,
        8,
    )
    assert cfg.attention and cfg.double_z and cfg.resolution == RES
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.5, 0.1)
    unscaled = {k: v for k, v in config.items() if k not in ("scaling_factor", "shift_factor")}
    assert model_config_from_diffusers(unscaled).scaling_factor == 0.0  # measured at export
    attn = {**config, **VARIANTS["attn-level"]}
    assert model_config_from_diffusers(attn).attn_resolutions == [RES // 2]


def _old_format(state: dict) -> dict:
    """Pre-0.14 diffusers attention names, with 1x1-conv-shaped projection weights."""
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state.items():
        for new, old in names.items():
            if f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[..., None, None] if value.ndim == 2 else value
        out[key] = value
    return out


def test_old_attention_names_from_weights_only_bin(saved, tmp_path):
    vae, src = saved
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    torch.save(_old_format(vae.state_dict()), tmp_path / "diffusion_pytorch_model.bin")
    model, _, info = load_diffusers_autoencoder(str(tmp_path))
    assert info["weights"] == "diffusion_pytorch_model.bin"
    assert_same_outputs(vae, model)


def test_import_export_ort_chain(saved, tmp_path):
    vae, src = saved
    artifact = tmp_path / "sd-vae"
    summary = import_diffusers(ImportConfig(source=str(src), output=str(artifact), resolution=RES))
    assert summary["scaling_factor"] == 0.5 and summary["parameters"] > 0
    assert summary["model_sha256"] == artifact_sha256(str(artifact))
    # A model artifact, not a training checkpoint: no optimiser, no training state.
    assert sorted(p.name for p in artifact.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "latentpipe.json",
    ]
    card = read_card(str(artifact))
    assert card.image.resolution == RES and card.provenance.source["weights_sha256"]
    assert card.provenance.run is None and card.provenance.step is None
    model, model_cfg, _ = load_model_artifact(str(artifact))
    assert model_cfg.scaling_factor == 0.5
    assert_same_outputs(vae, model)
    reloaded = diffusers.AutoencoderKL.from_pretrained(str(artifact))  # still diffusers'
    assert reloaded.config.scaling_factor == 0.5 and reloaded.config.shift_factor == 0.1

    out = tmp_path / "enc"
    sidecar = export_from_artifact(ExportConfig(model=str(artifact), output=str(out)))
    assert sidecar.scaling_factor == 0.5 and sidecar.shift_factor == 0.1
    assert sidecar.scaling_source == "checkpoint" and sidecar.model.step is None
    assert sidecar.model.sha256 == summary["model_sha256"]
    assert load_sidecar(str(out / "encoder.onnx")).latent_shape == [4, RES // 2, RES // 2]
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, RES, RES)).astype(np.float32)
    mean, logvar = make_session(str(out / "encoder.onnx"), device="cpu").run(None, {"image": x})
    with torch.no_grad():
        ref = vae.encode(torch.from_numpy(x)).latent_dist
    np.testing.assert_allclose(mean, ref.mean.numpy(), atol=1e-4)
    np.testing.assert_allclose(logvar, ref.logvar.numpy(), atol=1e-4)
    # encode's manifest keeps the published factors rather than the corpus's own.
    measured = {"std": 2.0, "mean": 0.3}
    published = {"scaling_factor": 0.5, "shift_factor": 0.1, "scaling_source": "checkpoint"}
    assert manifest_scale(measured, sidecar) == published
    data_sidecar = dataclasses.replace(sidecar, scaling_source="data")
    corpus = {"scaling_factor": 0.5, "shift_factor": 0.3, "scaling_source": "corpus"}
    assert manifest_scale(measured, data_sidecar) == corpus
    with pytest.raises(ValueError, match="already holds a model artifact"):
        import_diffusers(ImportConfig(source=str(src), output=str(artifact)))


def test_export_reads_a_directory_diffusers_saved(saved, tmp_path):
    """export model=DIR of AutoencoderKL.save_pretrained: published factors, pinned by hash."""
    vae, src = saved
    sidecar = export_from_artifact(ExportConfig(model=str(src), output=str(tmp_path)))
    assert (sidecar.scaling_factor, sidecar.scaling_source) == (0.5, "checkpoint")
    assert sidecar.model.path == str(src) and sidecar.model.sha256 == artifact_sha256(str(src))
    assert sidecar.input.resolution == RES  # the config's sample_size


def _copy_with(src, dst, state: dict) -> None:
    (dst / "config.json").write_text((src / "config.json").read_text())
    safetensors_torch.save_file(state, str(dst / "diffusion_pytorch_model.safetensors"))


def test_missing_key_named(saved, tmp_path):
    vae, src = saved
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    del state["decoder.up_blocks.0.resnets.1.conv2.bias"]
    _copy_with(src, tmp_path, state)
    with pytest.raises(ValueError, match=r"missing from the weights: decoder\.up\.1\.block\.1"):
        load_diffusers_autoencoder(str(tmp_path))


def test_unexpected_key_named(saved, tmp_path):
    vae, src = saved
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    state["encoder.extra_head.weight"] = torch.zeros(2)
    _copy_with(src, tmp_path, state)
    with pytest.raises(ValueError, match=r"unexpected keys in the weights: encoder\.extra_head"):
        load_diffusers_autoencoder(str(tmp_path))


def test_shape_mismatch_named(saved, tmp_path):
    vae, src = saved
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    state["encoder.conv_in.bias"] = torch.zeros(7)
    _copy_with(src, tmp_path, state)
    with pytest.raises(ValueError, match=r"shape mismatch for encoder\.conv_in\.bias"):
        load_diffusers_autoencoder(str(tmp_path))


class Payload:  # any pickled object: weights_only loading must refuse it
    pass


def test_wrong_or_unsafe_files_refused(saved, tmp_path):
    src = saved[1]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model\.safetensors"):
        load_diffusers_autoencoder(str(tmp_path))
    torch.save({"x": Payload()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="refused"):
        load_diffusers_autoencoder(str(tmp_path))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_diffusers_autoencoder(str(tmp_path))


def test_unsupported_configs_refused(saved, tmp_path):
    config = json.loads((saved[1] / "config.json").read_text())
    with pytest.raises(ValueError, match="only AutoencoderKL"):
        model_config_from_diffusers({**config, "_class_name": "VQModel"})
    with pytest.raises(ValueError, match="act_fn"):
        model_config_from_diffusers({**config, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="encoder levels"):
        model_config_from_diffusers(
            {**config, **VARIANTS["attn-level"], "up_block_types": BASE["up_block_types"]}
        )
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_autoencoder(str(tmp_path))
    with pytest.raises(ValueError, match="local directory"):
        load_diffusers_autoencoder("s3://bucket/vae")
