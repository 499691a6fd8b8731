"""Typed dataclass from a map: unknown keys rejected with the closest valid name, values checked
against the field's type hint (numbers given as YAML-1.1 strings converted). One `ConfigError`
for every config of the project (build, pretrain, finetune)."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what is allowed."""


# ---------------------------------------------------------------------- building from maps
def check_keys(cls, data: dict, where: str = "") -> None:
    """Raise ConfigError for the first key of `data` that is not a field of dataclass `cls`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean {_join(where, close[0])!r}?" if close else f"; valid keys: {', '.join(names)}"
        raise ConfigError(f"unknown config key {_join(where, key)!r}{hint}")


def from_dict(cls, data: dict | None, where: str = "", typed: bool = True):
    """Build dataclass `cls` from a (nested) map, rejecting unknown keys.

    typed: check and convert every value against its type hint (nested dataclasses recursively);
    False passes the values through as they are (for classes whose `__post_init__` validates)."""
    data = dict(data or {}) if data is None or isinstance(data, dict) else data
    check_keys(cls, data, where)
    if not typed:
        return cls(**data)
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [value_ if item is Any else _coerce(item, value_, f"{where}[{i}]") for i, value_ in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
