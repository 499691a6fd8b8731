"""How one record is stored in a webdataset tar: two members per sample, no pickles.

    <name>.json         key, source, group, scalar labels, properties (sorted keys, compact)
    <name>.safetensors  atomic_numbers int64 [N], frac_coords f64 [N,3], lattice f64 [3,3],
                        and forces / stress / magmoms when present

`<name>` is the record key made safe for tar member names and webdataset (which splits the
sample name at the first dot): every character outside [A-Za-z0-9_:-] becomes '_'. The exact key
lives in the JSON. Encoding is deterministic: the same record gives the same bytes.
Reading a shard never executes code: JSON and safetensors are data-only formats.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from data_pipeline.record import ARRAY_LABELS, SCALAR_LABELS, CrystalRecord

SCHEMA_VERSION = 1
JSON_EXT = "json"
ARRAYS_EXT = "safetensors"
_UNSAFE = re.compile(r"[^A-Za-z0-9_:\-]")


class ShardFormatError(ValueError):
    """A sample in a shard could not be decoded."""


def sample_name(key: str) -> str:
    return _UNSAFE.sub("_", key)


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"non-finite label {value}")
    return value


def encode_record(record: CrystalRecord) -> dict[str, bytes | str]:
    """Record → webdataset sample dict {'__key__', 'json', 'safetensors'}."""
    meta = {"key": record.key, "source": record.source, "group": record.group}
    for name in SCALAR_LABELS:
        value = getattr(record, name)
        if value is not None:
            meta[name] = _finite_or_none(value)
    if record.properties:
        meta["properties"] = {k: _finite_or_none(v) for k, v in sorted(record.properties.items())}
    arrays = {
        "atomic_numbers": np.ascontiguousarray(record.atomic_numbers, dtype=np.int64),
        "frac_coords": np.ascontiguousarray(record.frac_coords, dtype=np.float64),
        "lattice": np.ascontiguousarray(record.lattice, dtype=np.float64),
    }
    for name in ARRAY_LABELS:
        value = getattr(record, name)
        if value is not None:
            arrays[name] = np.ascontiguousarray(value, dtype=np.float64)
    return {
        "__key__": sample_name(record.key),
        JSON_EXT: json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode(),
        ARRAYS_EXT: st_save(arrays),
    }


def decode_sample(sample: dict) -> CrystalRecord:
    """webdataset sample dict (raw bytes per extension) → record. Raises ShardFormatError."""
    name = sample.get("__key__", "?")
    try:
        meta = json.loads(sample[JSON_EXT])
        arrays = st_load(bytes(sample[ARRAYS_EXT]))
    except KeyError as exc:
        raise ShardFormatError(f"sample {name!r}: missing member .{exc.args[0]}") from exc
    except Exception as exc:  # noqa: BLE001 - any decode failure is reported with the sample name
        raise ShardFormatError(f"sample {name!r}: cannot decode ({type(exc).__name__}: {exc})") from exc
    labels = {k: meta[k] for k in SCALAR_LABELS if k in meta}
    labels.update({k: arrays[k] for k in ARRAY_LABELS if k in arrays})
    return CrystalRecord(
        key=meta["key"],
        source=meta["source"],
        group=meta.get("group", ""),
        atomic_numbers=arrays["atomic_numbers"],
        frac_coords=arrays["frac_coords"],
        lattice=arrays["lattice"],
        properties=meta.get("properties", {}),
        **labels,
    )
