"""Readers for the real raw layouts, chosen by `kind` in a build's source list.

`open_reader(kind, path, **options)` returns an object following `readers.base.Reader`.
"""
from __future__ import annotations

from typing import Callable

from data_pipeline.build.readers.base import RawEntry, Reader, RecordError, Reject

_READERS: dict[str, Callable[..., Reader]] = {}


def register_reader(kind: str):
    def wrap(cls):
        _READERS[kind] = cls
        return cls

    return wrap


def available_readers() -> list[str]:
    _import_builtin()
    return sorted(_READERS)


def open_reader(kind: str, path, **options) -> Reader:
    _import_builtin()
    if kind not in _READERS:
        raise ValueError(f"unknown source kind {kind!r}; available: {sorted(_READERS)}")
    return _READERS[kind](path, **options)


def _import_builtin() -> None:
    import importlib
    import pkgutil

    import data_pipeline.build.readers as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base":
            importlib.import_module(f"data_pipeline.build.readers.{info.name}")


__all__ = ["RawEntry", "Reader", "RecordError", "Reject", "open_reader", "register_reader", "available_readers"]
