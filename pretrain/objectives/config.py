"""Typed objective configs: dataclasses with documented defaults, built from plain dicts (YAML)
with unknown keys rejected, and the batch views an encoder asks the loader for."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from crystalfm_common.config import check_keys

T = TypeVar("T")


def parse_config(cls: type[T], config: dict | None, where: str) -> T:
    """Build dataclass `cls` from `config`; nested dataclass fields accept dicts.

    Raises `ConfigError` (a ValueError) naming `where`, the unknown key and the closest known one.
    Values are checked by the dataclass itself (`__post_init__`), not by type hint."""
    config = dict(config or {})
    check_keys(cls, config, where)
    hints = typing.get_type_hints(cls)
    for name, value in list(config.items()):
        kind = hints.get(name)
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            config[name] = parse_config(kind, value, f"{where}.{name}")
    return cls(**config)


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def encoder_views(encoder) -> dict:
    """What the loader must build for `encoder` (see data_pipeline.load.collate.BatchViews)."""
    return {
        "graph": dict(encoder.neighbor_rule) if encoder.needs_graph else None,
        "tokens": bool(encoder.needs_tokens),
        "pdd_k": int(encoder.pdd_k) if getattr(encoder, "needs_pdd", False) else None,
    }
