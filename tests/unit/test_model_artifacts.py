"""Model artifacts: diffusers loads what we write (KL as AutoencoderKL, l2 VQ as VQModel) and
computes what our models compute; every kind round-trips; the card and content hash pin the
files. Tiny random models (channels [8, 16], 16x16 inputs)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.artifacts import (
    ArtifactError,
    ImageSpec,
    LatentScale,
    Provenance,
    artifact_sha256,
    load_model_artifact,
    read_card,
    resolve_model_dir,
    save_model_artifact,
    update_model_artifact,
)
from pipeline.artifacts.diffusers_keys import (
    key_rules,
    map_state_dict,
    rename,
    to_diffusers_state_dict,
)
from pipeline.artifacts.store import inference_state
from pipeline.models import ModelConfig, VQConfig, build_model, training_buffers
from pipeline.models.textbook import ClassicVAEConfig

RES = 16
KL = ModelConfig(
    kind="kl",
    ch=8,
    ch_mult=[1, 2],
    num_res_blocks=1,
    groups=4,
    attention=True,
    attn_resolutions=[RES // 2],  # attention on level 1 too: the Attn*Block2D mapping
    resolution=RES,
)
VQ = ModelConfig(kind="vq", ch=8, ch_mult=[1, 2], groups=4, vq=VQConfig(num_codes=16, code_dim=4))
VQ_COSINE = ModelConfig(
    kind="vq", ch=8, ch_mult=[1, 2], groups=4, vq=VQConfig(num_codes=16, distance="cosine")
)
CLASSIC = ModelConfig(
    kind="cvae", classic=ClassicVAEConfig(hidden_dims=[32], latent_dim=2, num_classes=3)
)
IMAGE = ImageSpec(channels=3, value_range="signed", resolution=RES)
PROVENANCE = Provenance(run="runs/x", step=7, data={"shards": "s", "val_shards": "v"})


def perturbed(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A model whose GroupNorms are not at (1, 0), so a mis-mapped norm shows in the outputs."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1


def save(model, cfg, directory, **kw):
    return save_model_artifact(str(directory), model, cfg, image=IMAGE, provenance=PROVENANCE, **kw)


def test_kl_artifact_is_an_autoencoder_kl_directory(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = perturbed(KL)
    scale = LatentScale(0.7, 0.2, "measured", samples=12, data="v")
    card = save(model, KL, tmp_path, latent_scale=scale)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "latentpipe.json",
    ]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and "kind" not in config
    assert (config["scaling_factor"], config["shift_factor"]) == (0.7, 0.2)
    assert card.layout == "diffusers.AutoencoderKL" and card.provenance.step == 7

    vae, info = diffusers.AutoencoderKL.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert vae.config.scaling_factor == 0.7 and vae.config.shift_factor == 0.2
    x = images()
    z = torch.randn(2, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model.encode(x), vae.eval().encode(x).latent_dist
        torch.testing.assert_close(theirs.mean, ours.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.logvar, ours.logvar, atol=1e-5, rtol=0)
        torch.testing.assert_close(vae.decode(z).sample, model.decode(z), atol=1e-5, rtol=0)

    # diffusers' own save_pretrained of it is an artifact we load too (its card: config.json).
    resaved = tmp_path / "resaved"
    vae.save_pretrained(str(resaved))
    back, back_cfg, back_card = load_model_artifact(str(resaved))
    assert back_card.latent_scale == LatentScale(0.7, 0.2, "published")
    assert back_cfg.attn_resolutions == KL.attn_resolutions
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x).mean, ours.mean, atol=1e-5, rtol=0)


def test_l2_vq_artifact_is_a_vq_model_directory(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = perturbed(VQ)
    save(model, VQ, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "VQModel" and config["num_vq_embeddings"] == 16
    vq, info = diffusers.VQModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info.values()), info
    x = images()
    with torch.no_grad():
        indices, quantized = model.export_forward(x)
        h = vq.eval().encode(x).latents
        theirs, _, (_, _, their_indices) = vq.quantize(h)
        assert torch.equal(their_indices.reshape(indices.shape), indices)
        torch.testing.assert_close(theirs, quantized, atol=1e-5, rtol=0)
        decoded = vq.decode(quantized, force_not_quantize=True).sample
        torch.testing.assert_close(decoded, model.decode(quantized), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", [KL, VQ, VQ_COSINE, CLASSIC], ids=lambda c: c.kind)
def test_every_kind_round_trips(cfg, tmp_path):
    model = perturbed(cfg)
    card = save(model, cfg, tmp_path / "model", quality={"psnr_db": 20.0})
    loaded, loaded_cfg, loaded_card = load_model_artifact(str(tmp_path))  # a checkpoint dir
    assert loaded_cfg == cfg and loaded_card == card and not loaded.training
    want, got = inference_state(model), loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    native = card.layout == "latentpipe"
    assert native == (cfg is VQ_COSINE or cfg is CLASSIC)
    assert (tmp_path / "model" / "model.safetensors").exists() == native
    # Training-only buffers are left out (a VQ codebook's EMA statistics, its re-seeding pool).
    assert set(want) == set(model.state_dict()) - set(training_buffers(model))
    assert bool(training_buffers(model)) == (cfg.kind == "vq")


def test_key_mapping_round_trips_both_ways():
    for cfg in (KL, VQ, ModelConfig(ch=8, ch_mult=[1, 2, 2, 2], groups=4, num_res_blocks=2)):
        state = inference_state(build_model(cfg))
        theirs = to_diffusers_state_dict(state, len(cfg.ch_mult))
        assert len(theirs) == len(state)
        assert all(rename(k, key_rules(len(cfg.ch_mult))) in state for k in theirs)
        back = map_state_dict(theirs, state, len(cfg.ch_mult))
        assert all(torch.equal(back[k], v) for k, v in state.items())


def test_content_hash_pins_the_files_the_loader_reads(tmp_path):
    model = perturbed(KL)
    save(model, KL, tmp_path)
    first = artifact_sha256(str(tmp_path))
    (tmp_path / "README.md").write_text("not part of the artifact")
    assert artifact_sha256(str(tmp_path)) == first
    update_model_artifact(str(tmp_path), latent_scale=LatentScale(0.5, 0.0, "measured", 3, "v"))
    assert artifact_sha256(str(tmp_path)) != first
    assert json.loads((tmp_path / "config.json").read_text())["scaling_factor"] == 0.5
    assert read_card(str(tmp_path)).latent_scale.samples == 3


def test_damaged_or_foreign_artifacts_are_refused(tmp_path):
    model = perturbed(KL)
    save(model, KL, tmp_path / "a")
    weights = tmp_path / "a" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ArtifactError, match="changed or cut short"):
        load_model_artifact(str(tmp_path / "a"))
    card = json.loads((tmp_path / "a" / "latentpipe.json").read_text())
    card["model"]["no_such_key"] = 1
    (tmp_path / "a" / "latentpipe.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="no_such_key"):
        load_model_artifact(str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="neither latentpipe.json nor config.json"):
        resolve_model_dir(str(tmp_path))


def test_runtime_does_not_import_diffusers(tmp_path):
    import subprocess
    import sys

    save(perturbed(KL), KL, tmp_path)
    code = (
        "import sys; from pipeline.artifacts import load_model_artifact;"
        f"load_model_artifact({str(tmp_path)!r});"
        "assert 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
