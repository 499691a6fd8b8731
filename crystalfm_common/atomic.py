"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.

The bytes go to a temporary file in the same folder (same filesystem), are fsynced, then
`os.replace`d onto the target (atomic on POSIX)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> Path:
    """`data` as JSON (bytes are written as they are: an already-encoded document)."""
    payload = data if isinstance(data, bytes) else (json.dumps(data, **dumps_kwargs) + "\n").encode()
    return write_bytes_atomic(path, payload)
