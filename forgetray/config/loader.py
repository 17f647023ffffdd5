"""Typed YAML for any frozen-dataclass root: conversion with errors that name the key, and
`key.sub=value` overrides.

The run config (`forgetray.config.schema`) and the size sweep's config (`forgetray.studies.sizes`)
both load through `load_dataclass`, so a bad key reads the same wherever it is.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

Retired = Mapping[str, Mapping[str, str]]
"""{section: {key: why}}: keys that once meant something, ignored with a warning when met."""
NO_RETIRED: Retired = {}


class ConfigError(ValueError):
    """A config value that cannot be used; the message names where it came from and the key path."""


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def to_plain(value: Any) -> Any:
    """Dataclasses and tuples to dicts and lists: what YAML, JSON and Ray `param_space` accept."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    return value


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, key: str, retired: Retired = NO_RETIRED) -> Any:
    """`value` (from YAML) as type `tp`, or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, key, retired)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
        return tuple(convert(v, item_type, f"{key}.{i}", retired) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, retired)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {key}")


def build(cls: type[T], raw: Any, prefix: str = "", retired: Retired = NO_RETIRED) -> T:
    """`raw` as dataclass `cls`; a ConfigError names the dotted key under `prefix` that is wrong."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or '<top level>'}: expected {type_name(cls)}, got {raw!r}")
    dropped = {k: why for k, why in retired.get(prefix, {}).items() if k in raw}
    for key, why in dropped.items():
        warnings.warn(f"{prefix}.{key}: no longer used, ignored ({why})", stacklevel=2)
    raw = {k: v for k, v in raw.items() if k not in dropped}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    where = f"{prefix}." if prefix else ""
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown key; accepted keys here: {', '.join(fields)}")
    kwargs = {}
    for name in fields:
        if name in raw:
            kwargs[name] = convert(raw[name], hints[name], f"{where}{name}", retired)
        elif (
            fields[name].default is dataclasses.MISSING
            and fields[name].default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"{where}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: no list item {part!r} to override")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{dotted}: no list item {last!r} to override")
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings to (key, value); values parse as YAML (`[a, b]`, `null`, `1e-5`)."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command line: override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"command line: {key}: value {text!r} is not valid YAML ({e})") from None
        parsed.append((key.strip(), value))
    return parsed


def deep_update(base: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value


def read_yaml_mapping(
    path: str | os.PathLike[str], kind: str = "config", top_level: str = ""
) -> dict[str, Any]:
    """The mapping at the top of YAML file `path`; a ConfigError naming the file otherwise."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise ConfigError(f"{source}: {kind} file not found")
    with open(source, encoding="utf-8") as f:
        try:
            loaded = yaml.safe_load(f)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{source}: the top level must be a mapping{top_level}")
    return loaded or {}


def load_dataclass(
    cls: type[T],
    path: str | os.PathLike[str] | None,
    overrides: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
    kind: str = "config",
    top_level: str = "",
    retired: Retired = NO_RETIRED,
) -> T:
    """`cls` from the YAML in `path` (nothing when None) with `key.sub=value` overrides applied.

    Overrides apply on top of `defaults` too, so that a list the file leaves out can still be indexed.
    """
    raw: dict[str, Any] = {}
    source = "built-in default"
    if path is not None:
        source = os.fspath(path)
        raw = read_yaml_mapping(path, kind, top_level)
    parsed = parse_overrides(overrides)
    if parsed:
        merged = copy.deepcopy(dict(defaults or {}))
        deep_update(merged, raw)
        raw = merged
        for key, value in parsed:
            set_path(raw, key, value)
        source = f"{source} + command line"
    return from_dict(cls, raw, source, retired)


def from_dict(
    cls: type[T], raw: Mapping[str, Any], source: str = "<dict>", retired: Retired = NO_RETIRED
) -> T:
    """`cls` from a plain mapping; errors start with `source` (a file, "command line")."""
    try:
        return build(cls, raw, "", retired)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
