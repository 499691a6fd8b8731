"""Typed objective configs: dataclasses with documented defaults, built from plain dicts (YAML)
with unknown keys rejected, and the batch views an encoder asks the loader for."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def parse_config(cls: type[T], config: dict | None, where: str) -> T:
    """Build dataclass `cls` from `config`; nested dataclass fields accept dicts.

    Raises ValueError naming `where` and the offending keys when a key is unknown."""
    config = dict(config or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown config key(s) {unknown}; known keys: {sorted(known)}")
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
