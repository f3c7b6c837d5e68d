"""Which weights an artifact or encoder holds (``weights.kind`` in latentpipe.json, ``weights`` in
the sidecar: raw, ema, published): export takes a checkpoint's EMA weights unless told otherwise,
and cards and sidecars written before the fields still load."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.artifacts.card import ImageSpec, ModelCard, Provenance, read_card, resolve_model_dir
from pipeline.artifacts.store import save_model_artifact
from pipeline.contracts.sidecar import Sidecar, SidecarError, load_sidecar
from pipeline.export import ExportConfig, export_from_artifact
from pipeline.models import ModelConfig, build_model

TINY = ModelConfig(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, groups=4)


def _checkpoint(tmp_path):
    """checkpoint_00000003/ with model/ (raw) and model_ema/ (other weights), as training writes."""
    directory = tmp_path / "checkpoint_00000003"
    image, provenance = ImageSpec(3, "signed", 16), Provenance(run=str(tmp_path), step=3)
    for name, kind, seed in (("model", "raw", 0), ("model_ema", "ema", 1)):
        torch.manual_seed(seed)
        model = build_model(TINY)
        save_model_artifact(
            str(directory / name),
            model,
            TINY,
            image=image,
            provenance=provenance,
            weights_kind=kind,
        )
    return directory


def test_export_uses_the_ema_weights_unless_told_otherwise(tmp_path):
    directory = _checkpoint(tmp_path)
    run = str(tmp_path)
    assert read_card(str(directory / "model_ema")).weights_kind == "ema"
    assert resolve_model_dir(run, "ema") == str(directory / "model_ema")
    assert resolve_model_dir(run) == resolve_model_dir(run, "raw") == str(directory / "model")
    common = {"scale_samples": 0, "parity_batch": 1}
    ema = export_from_artifact(
        ExportConfig(model=str(directory), output=str(tmp_path / "e"), **common)
    )
    assert ema.weights == "ema" and ema.model.path == str(directory / "model_ema")
    assert load_sidecar(str(tmp_path / "e" / "encoder.onnx")).weights == "ema"
    assert json.loads((tmp_path / "e" / "encoder.json").read_text())["weights"] == "ema"
    raw = ExportConfig(model=run, output=str(tmp_path / "r"), weights="raw", **common)
    sidecar = export_from_artifact(raw)
    assert sidecar.weights == "raw" and sidecar.model.path == str(directory / "model")
    # An artifact named directly is exported as it is, whatever export.weights says.
    named = ExportConfig(model=str(directory / "model"), output=str(tmp_path / "n"), **common)
    assert export_from_artifact(named).weights == "raw"
    with pytest.raises(ValueError, match="'avg' is not a valid Weights"):
        ExportConfig(model=run, output=str(tmp_path / "x"), weights="avg")
    # A checkpoint whose model_ema/ was cut short falls back to model/.
    weights = directory / "model_ema" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert resolve_model_dir(run, "ema") == str(directory / "model")

    # Sidecars from before the field: an import's weights are "published", a run's "raw".
    old = ema.to_dict()
    del old["weights"]
    assert Sidecar.from_dict(old, "old.json").weights == "raw"
    old["model"]["step"] = None
    assert Sidecar.from_dict(old, "old.json").weights == "published"
    with pytest.raises(SidecarError, match="field 'weights' must be one of"):
        Sidecar.from_dict({**old, "weights": "best"}, "bad.json")


def test_cards_say_which_weights_and_older_cards_still_load(tmp_path):
    directory = _checkpoint(tmp_path)
    data = json.loads((directory / "model" / "latentpipe.json").read_text())
    assert data["weights"]["kind"] == "raw"
    del data["weights"]["kind"]
    assert ModelCard.from_dict(data, "old").weights_kind == "raw"
    data["provenance"] = {"source": {"format": "diffusers"}}
    assert ModelCard.from_dict(data, "old").weights_kind == "published"
    with pytest.raises(ValueError, match="field 'weights.kind' must be one of"):
        ModelCard.from_dict({**data, "weights": {**data["weights"], "kind": "x"}}, "bad")
    # An import is "published" unless said otherwise.
    imported = save_model_artifact(
        str(tmp_path / "imp"),
        build_model(TINY),
        TINY,
        image=ImageSpec(3, "signed", 16),
        provenance=Provenance(source={"format": "diffusers"}),
    )
    assert imported.weights_kind == "published"
