"""Config merge order, strict errors naming key and source, resolved config round trip."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import MISSING

from pipeline.config import ConfigError, load_config, save_resolved_config, split_cli_args

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class Inner:
    size: int = 1
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    name: str = MISSING


@dataclass
class Root:
    inner: Inner = field(default_factory=Inner)
    rate: float = 0.5


def test_defaults_then_yaml_then_overrides(tmp_path):
    yaml = tmp_path / "a.yaml"
    yaml.write_text("inner:\n  size: 3\n  name: from-yaml\nrate: 0.1\n")
    cfg = load_config(Root, str(yaml), ["inner.size=5", "inner.sizes=[7,8]"])
    assert cfg == Root(inner=Inner(size=5, sizes=[7, 8], name="from-yaml"), rate=0.1)


def test_later_yaml_wins(tmp_path):
    (tmp_path / "a.yaml").write_text("inner: {size: 3, name: a}\n")
    (tmp_path / "b.yaml").write_text("inner: {size: 4}\n")
    cfg = load_config(Root, [str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")], [])
    assert (cfg.inner.size, cfg.inner.name) == (4, "a")


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("inner:\n  name: x\n  colour: red\n")
    with pytest.raises(ConfigError) as err:
        load_config(Root, str(yaml), [])
    message = str(err.value)
    assert "inner.colour" in message and str(yaml) in message and "\n" not in message


def test_unknown_key_in_override_names_override():
    with pytest.raises(
        ConfigError, match=r"override 'inner\.colour=red': unknown key 'inner\.colour'"
    ):
        load_config(Root, None, ["inner.name=x", "inner.colour=red"])


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_config(Root, None, ["nope.deep=1"])


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'inner\.size'.*'abc'"):
        load_config(Root, None, ["inner.name=x", "inner.size=abc"])
    yaml = tmp_path / "t.yaml"
    yaml.write_text("rate: fast\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: key 'rate'"):
        load_config(Root, str(yaml), ["inner.name=x"])


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match=r"missing required key\(s\): inner\.name"):
        load_config(Root, None, [])


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Root, str(tmp_path / "absent.yaml"), [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Root, str(bad), [])


def test_split_cli_args():
    assert split_cli_args(["a.yaml", "b.yml", "x=1"]) == (["a.yaml", "b.yml"], ["x=1"])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        split_cli_args(["stray"])


@pytest.mark.parametrize("directory", ["memory://cfgtest/run", "local"])
def test_resolved_config_round_trip(tmp_path, directory):
    import fsspec

    directory = str(tmp_path / "run") if directory == "local" else directory
    cfg = load_config(Root, None, ["inner.name=x", "rate=0.25"])
    path = save_resolved_config(cfg, directory)
    fs, _ = fsspec.core.url_to_fs(directory)
    with fs.open(path) as f:
        text = f.read().decode()
    assert "rate: 0.25" in text and "name: x" in text


def _schema_for(path: Path):
    from pipeline.data.shards import ShardsConfig
    from pipeline.demo import DemoConfig
    from pipeline.encode.job import EncodeConfig
    from pipeline.export import ExportConfig
    from pipeline.train.config import TrainRunConfig
    from pipeline.verify import VerifyConfig

    return {
        "train": TrainRunConfig,
        "model": TrainRunConfig,
        "encode": EncodeConfig,
        "export": ExportConfig,
        "shards": ShardsConfig,
        "verify": VerifyConfig,
        "configs": DemoConfig,
    }[path.parent.name]


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_matches_its_schema(path):
    """configs/ mirrors the dataclasses: each file merges strictly (required keys may stay ???)."""
    from omegaconf import OmegaConf

    schema = _schema_for(path)
    merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))
    assert merged is not None


@pytest.mark.parametrize(
    "path", sorted(CONFIGS.glob("*/default.yaml")), ids=lambda p: p.parent.name
)
def test_default_yaml_equals_the_dataclass_defaults(path):
    """A default.yaml is the dataclass's defaults written out: every value, not just every key
    (required fields stay ``???``)."""
    from omegaconf import OmegaConf

    schema = _schema_for(path)
    defaults = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
    shipped = OmegaConf.to_container(OmegaConf.load(path))
    assert shipped == defaults


@pytest.mark.parametrize("override", ["device=tpu", "weights=best"])
def test_export_choices_fail_at_load_naming_the_key(override):
    from pipeline.config import ConfigError, load_config
    from pipeline.export import ExportConfig

    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(ExportConfig, [], ["model=m", "output=o", override])
