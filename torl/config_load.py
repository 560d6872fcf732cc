"""Building a config from text: YAML presets (``defaults:`` chains), dotted ``key=value`` overrides, command lines.

Every value is coerced to its field's declared type (``torl/config.py``) as it is read, so unknown keys and type
mismatches fail before anything starts, naming the key and suggesting close matches. Works for any config dataclass
tree (``load_dataclass``): the run's ``Config``, data preparation's and the base-model recipe's.

Not here: the fields, their defaults and checks (``torl/config.py``), their help (``torl/config_help.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from torl.config import Config, ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        last: ConfigError | None = None
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                last = exc
        raise last or ConfigError(f"{key}: bad value {value!r}")
    if origin is dict:
        if value in ("", None):
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping such as {{name: 1}}, got {value!r}")
        ktype, vtype = typing.get_args(tp)
        return {_coerce(k, ktype, key): _coerce(v, vtype, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    ftypes = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in ftypes:
            raise _unknown_key(prefix + name, list(ftypes))
        kwargs[name] = _coerce(value, ftypes[name], prefix + name)
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_override(item: str) -> dict[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. rollout.n=8)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # Keep digit-only strings for str fields: coercion turns ints back into strings where a string is declared.
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    parent = data.pop("defaults", None)  # a preset may extend another preset (path relative to itself)
    if parent:
        data = _merge(load_yaml(path.parent / parent), data)
    return data


def load_dataclass(cls: type[T], files: Sequence[str] = (), overrides: Sequence[str] = ()) -> T:
    """Build any config dataclass ``cls`` from YAML files (later files win) and dotted ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    for f in files:
        tree = _merge(tree, load_yaml(f))
    for item in overrides:
        tree = _merge(tree, _parse_override(item))
    return _build(cls, tree)


def load_config(files: Sequence[str] = (), overrides: Sequence[str] = ()) -> Config:
    """Build a Config from YAML presets (later files win) and dotted overrides such as ``rollout.n=8``."""
    return load_dataclass(Config, files, overrides)


def split_cli(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split command-line words into YAML files (``*.yaml``/``*.yml``) and ``key=value`` overrides."""
    files, overrides = [], []
    for arg in argv:
        if "=" in arg:
            overrides.append(arg)
        elif arg.endswith((".yaml", ".yml")):
            files.append(arg)
        else:
            raise ConfigError(f"argument {arg!r} is neither a .yaml preset nor a key=value override")
    return files, overrides
