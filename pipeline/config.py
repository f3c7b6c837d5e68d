"""One config tree: structured defaults <- YAML file <- `key=value` overrides, strictly.

Each command has a root dataclass (assembled from the dataclasses that live next to the
code they configure). `load_config` merges, in order, the dataclass defaults, an optional
YAML file and CLI overrides. Any unknown key or wrong type raises `ConfigError` with one
line naming the key and where it came from, before any Ray or training work starts.
"""

from __future__ import annotations

from typing import Any, TypeVar

import fsspec
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

T = TypeVar("T")

RESOLVED_CONFIG_NAME = "config.yaml"


class ConfigError(ValueError):
    """A config problem the user can fix; the message is one line."""


def split_cli_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Split `[a.yaml [b.yaml ...]] key=value ...` into YAML paths and overrides."""
    yaml_paths, overrides = [], []
    for arg in args:
        if "=" in arg:
            overrides.append(arg)
        elif arg.endswith((".yaml", ".yml")) and not overrides:
            yaml_paths.append(arg)
        else:
            raise ConfigError(
                f"unexpected argument {arg!r}: expected .yaml files first, then key=value overrides"
            )
    return yaml_paths, overrides


def load_config(
    schema: type[T], yaml_paths: str | list[str] | None = None, overrides: list[str] = ()
) -> T:
    """Merge defaults, YAML files (in order) and overrides into an instance of `schema`."""
    merged = OmegaConf.structured(schema)
    OmegaConf.set_struct(merged, True)
    if isinstance(yaml_paths, str):
        yaml_paths = [yaml_paths]
    for path in yaml_paths or []:
        merged = _merge(merged, _read_yaml(path), source=path)
    for item in overrides:
        merged = _merge(merged, _parse_override(item), source=f"override {item!r}")
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)} (set them as key=value)")
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # e.g. an interpolation that does not resolve
        raise ConfigError(_one_line(err)) from None


def load_dict_as(schema: type[T], data: dict, source: str) -> T:
    """A dict read from JSON (e.g. a model artifact's ``model``) as `schema`, as strictly as a
    YAML file: unknown keys and wrong types raise ConfigError naming `source`."""
    merged = OmegaConf.structured(schema)
    OmegaConf.set_struct(merged, True)
    try:
        extra = OmegaConf.create(data)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_one_line(err)}") from None
    merged = _merge(merged, extra, source=source)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{source}: missing required key(s): {', '.join(missing)}")
    return OmegaConf.to_object(merged)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_resolved_config(cfg: Any, directory: str, name: str = RESOLVED_CONFIG_NAME) -> str:
    """Write the resolved config into a run directory (local path or fsspec URL)."""
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    path = f"{root.rstrip('/')}/{name}"
    with fs.open(path, "w") as f:
        f.write(to_yaml(cfg))
    return path


def load_yaml_as(schema: type[T], path: str) -> T:
    """Read a config written by `save_resolved_config` back into its dataclass, strictly."""
    return load_config(schema, path, [])


def _read_yaml(path: str) -> DictConfig:
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise ConfigError(f"config file not found: {path}")
    with fs.open(root, "r") as f:
        text = f.read()
    try:
        loaded = OmegaConf.create(text)
    except Exception as err:  # YAML syntax errors come from several libraries
        raise ConfigError(f"{path}: not valid YAML: {_one_line(err)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def _parse_override(item: str) -> DictConfig:
    key, _, value = item.partition("=")
    if not key.strip():
        raise ConfigError(f"override {item!r}: empty key")
    try:
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as err:
        raise ConfigError(f"override {item!r}: {_one_line(err)}") from None


def _merge(base: DictConfig, extra: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, extra)
    except (ConfigKeyError, ConfigAttributeError) as err:
        raise ConfigError(
            f"{source}: unknown key '{_full_key(err)}'{_suggest(base, err)}"
        ) from None
    except ValidationError as err:
        raise ConfigError(f"{source}: key '{_full_key(err)}': {_validation_reason(err)}") from None
    except MissingMandatoryValue as err:
        raise ConfigError(f"{source}: {_one_line(err)}") from None


def _full_key(err: OmegaConfBaseException) -> str:
    return str(getattr(err, "full_key", None) or getattr(err, "key", None) or "?")


def _validation_reason(err: ValidationError) -> str:
    first = str(err.msg if hasattr(err, "msg") else err).splitlines()[0]
    return first


def _suggest(base: DictConfig, err: OmegaConfBaseException) -> str:
    """Name the keys that do exist at the level of the unknown one."""
    parent, _, _ = _full_key(err).rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    if isinstance(node, DictConfig):
        return f" (valid keys{' under ' + parent if parent else ''}: {', '.join(node.keys())})"
    return ""


def _one_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
