"""Typed, frozen configuration: defaults in code, merged with a YAML file and ``key=value``
overrides, unknown keys rejected.

A config is a tree of frozen dataclasses. :func:`merge` returns a new tree; nothing is ever
mutated in place, so no tool can flip a setting under another's feet.

Example::

    cfg = load_config(PipelineConfig, "my.yaml", ["features.scales=[480,688]", "svm.C=0.001"])
    save_config(cfg, out_dir / "config.yaml")
"""
from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import DetectionError
from .io.files import atomic_write_text

__all__ = ["ConfigError", "merge", "load_config", "read_yaml_mapping", "parse_overrides", "to_dict", "save_config", "from_dict"]

T = TypeVar("T")


class ConfigError(DetectionError):
    """An unknown key, a value of the wrong type, or an unreadable config file."""


#: Values in error messages are shown with reprlib: a YAML alias bomb (a few lines that expand
#: to a list of 9**9 items when printed) gives a short message instead of hanging the tool.
_REPR = reprlib.Repr()   # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 6, 6, 6
_REPR.maxstring = _REPR.maxother = 80


def _short(value: Any) -> str:
    return _REPR.repr(value)


def _key(k: Any) -> str:
    return k[:80] if isinstance(k, str) else _short(k)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON/YAML-able data (tuples become lists)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    return plain(cfg)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` (the subset of types configs use)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {_short(value)} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {_short(value)} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_short(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {_short(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_short(value)}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {_short(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_short(value)}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build a config dataclass from a mapping; unknown keys are errors, missing keys keep defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)   # YAML keys may be ints, None, ...
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join((where + '.' if where else '') + _key(k) for k in unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def merge(cfg: T, updates: dict[str, Any]) -> T:
    """A copy of ``cfg`` with nested ``updates`` applied (validated, unknown keys rejected)."""
    base = to_dict(cfg)

    def deep(dst: dict, src: dict, where: str) -> None:
        for k, v in src.items():
            if k not in dst:
                raise ConfigError(f"unknown config key {where}{_key(k)}")
            if isinstance(dst[k], dict) and isinstance(v, dict):
                deep(dst[k], v, f"{where}{k}.")
            else:
                dst[k] = v

    deep(base, updates, "")
    return from_dict(type(cfg), base)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError, ValueError) as e:
            raise ConfigError(f"override {item!r}: cannot parse value ({' '.join(str(e).split())})") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (an empty file is an empty mapping)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    # A file that is not UTF-8 (UnicodeDecodeError) or nests thousands of levels deep
    # (RecursionError in PyYAML's composer) is a config error, not a traceback (tests/test_fuzz.py).
    # ValueError: PyYAML's scanner calls chr() on an escape such as "\U00110000" (past Unicode).
    except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError, ValueError) as e:
        reason = " ".join(str(e).split())   # PyYAML's messages span lines
        raise ConfigError(f"cannot read config file {path}: {type(e).__name__}: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} does not hold a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``key=value`` overrides."""
    cfg = cls()
    if path is not None:
        cfg = merge(cfg, read_yaml_mapping(path))
    if overrides:
        cfg = merge(cfg, parse_overrides(overrides))
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
