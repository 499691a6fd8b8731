"""How one record is stored in a webdataset tar: two members per sample, no pickles.

    <name>.json         key, source, group, scalar labels, properties (sorted keys, compact)
    <name>.safetensors  atomic_numbers int64 [N], frac_coords f64 [N,3], lattice f64 [3,3],
                        and forces / stress / magmoms when present; optionally pdd f64 [N,k+1]
                        (the PDD rows of `record.pdd_features`, when the build asked for them
                        with `pdd_k`: derived from the structure, stored so no epoch recomputes
                        them). A sample without it is complete: readers compute the rows then.

`<name>` is the record key made safe for tar member names and webdataset (which splits the
sample name at the first dot): every character outside [A-Za-z0-9_:-] becomes '_'. The exact key
lives in the JSON. Encoding is deterministic: the same record gives the same bytes.
Reading a shard never executes code: JSON and safetensors are data-only formats.

Beside each shard the build writes its index, `<shard>.idx.npy` (`index_path`): one row per
sample, in shard order, of little-endian int64 `INDEX_COLUMNS` = (json offset, json size,
safetensors offset, safetensors size, atom count), offsets being the byte positions of the member
data in the tar. A plain .npy (no pickle) so a loader maps it with `np.load(mmap_mode="r")`
instead of reading every tar header; it holds no names (a name is read from the tar only for an
error message). The shards' bytes do not depend on it; shard sets built before it existed have
none, and the loader then scans the headers.
"""
from __future__ import annotations

import functools
import json
import math
import re

import numpy as np
from safetensors import TensorSpec, serialize
from safetensors.numpy import load as st_load

from data_pipeline.record import ARRAY_LABELS, SCALAR_LABELS, CrystalRecord

SCHEMA_VERSION = 1
JSON_EXT = "json"
ARRAYS_EXT = "safetensors"
PDD_ARRAY = "pdd"  # optional member of the arrays (schema 1 readers ignore unknown arrays)
_UNSAFE = re.compile(r"[^A-Za-z0-9_:\-]")
INDEX_SUFFIX = ".idx.npy"
INDEX_COLUMNS = ("json_offset", "json_size", "arrays_offset", "arrays_size", "num_atoms")
INDEX_DTYPE = np.dtype("<i8")


def index_path(shard_path: str) -> str:
    """The index file of a shard: `<shard>.idx.npy` beside it."""
    return f"{shard_path}{INDEX_SUFFIX}"


def index_file_bytes(rows: list[list[int]]) -> bytes:
    """The bytes of an index file for `rows` (one [json offset, json size, safetensors offset,
    safetensors size, atoms] per sample); deterministic, as np.save writes no dates or paths."""
    import io

    table = np.asarray(rows, dtype=INDEX_DTYPE).reshape(-1, len(INDEX_COLUMNS))  # [S, 5]
    buffer = io.BytesIO()
    np.save(buffer, table, allow_pickle=False)
    return buffer.getvalue()


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


# Little-endian int64 / float64 whatever the machine, so the arrays go to safetensors as they are.
_INT64, _FLOAT64 = np.dtype("<i8"), np.dtype("<f8")
_DTYPE_NAMES = {_INT64: "int64", _FLOAT64: "float64"}
# One encoder, made once: json.dumps builds a new one per call with these options.
_META_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


def arrays_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """`safetensors.numpy.save(arrays)` for contiguous little-endian int64 / float64 arrays: the same
    bytes, without that function's per-array Python (ctypes pointers, dtype names, TensorSpecs:
    ~20 µs a record). The file is safetensors' header followed by the arrays' bytes in the header's
    order, and the header depends only on the names, dtypes and shapes (`_arrays_layout`)."""
    values = list(arrays.values())
    head, order = _arrays_layout(tuple((name, a.dtype, a.shape) for name, a in arrays.items()))
    return head + b"".join([values[i].tobytes() for i in order])


@functools.lru_cache(maxsize=4096)
def _arrays_layout(specs: tuple) -> tuple[bytes, tuple[int, ...]]:
    """(length + JSON header, order of the arrays' data) of a safetensors file holding arrays of
    these (name, dtype, shape): written by safetensors' own `serialize` for zero-filled arrays."""
    zeros = [np.zeros(shape, dtype=dtype) for _, dtype, shape in specs]
    blob = bytes(serialize({
        name: TensorSpec(dtype=_DTYPE_NAMES[dtype], shape=shape, data_ptr=a.__array_interface__["data"][0],
                         data_len=a.nbytes)
        for (name, dtype, shape), a in zip(specs, zeros)
    }))
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    order = sorted(range(len(specs)), key=lambda i: header[specs[i][0]]["data_offsets"][0])
    return blob[: 8 + size], tuple(order)


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
        "atomic_numbers": np.ascontiguousarray(record.atomic_numbers, dtype=_INT64),
        "frac_coords": np.ascontiguousarray(record.frac_coords, dtype=_FLOAT64),
        "lattice": np.ascontiguousarray(record.lattice, dtype=_FLOAT64),
    }
    for name in ARRAY_LABELS:
        value = getattr(record, name)
        if value is not None:
            arrays[name] = np.ascontiguousarray(value, dtype=_FLOAT64)
    if record.pdd is not None:  # absent unless asked for: samples without it keep their exact bytes
        arrays[PDD_ARRAY] = np.ascontiguousarray(record.pdd, dtype=_FLOAT64)
    return {
        "__key__": sample_name(record.key),
        JSON_EXT: _META_ENCODER.encode(meta).encode(),
        ARRAYS_EXT: arrays_bytes(arrays),
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
    try:
        return _record(meta, arrays, labels)
    except ValueError as exc:  # e.g. a pdd member whose rows do not match the atoms
        raise ShardFormatError(f"sample {name!r}: {exc}") from exc


def _record(meta: dict, arrays: dict, labels: dict) -> CrystalRecord:
    return CrystalRecord(
        key=meta["key"],
        source=meta["source"],
        group=meta.get("group", ""),
        atomic_numbers=arrays["atomic_numbers"],
        frac_coords=arrays["frac_coords"],
        lattice=arrays["lattice"],
        properties=meta.get("properties", {}),
        pdd=arrays.get(PDD_ARRAY),
        **labels,
    )


# ----------------------------------------------------------------------------- fast decoding
_META_KEYS = frozenset(("key", "source", "group", "properties", *SCALAR_LABELS))
_FLOAT_ARRAYS = frozenset(("frac_coords", "lattice", *ARRAY_LABELS))
_JSON = json.JSONDecoder()


def _expected_shape(name: str, n: int) -> list[int]:
    if name in ("frac_coords", "forces"):
        return [n, 3]
    if name in ("lattice", "stress"):
        return [3, 3]
    return [n]  # magmoms


def decode_fast(meta_bytes: bytes, arrays_bytes: bytes) -> CrystalRecord | None:
    """The record `decode_sample` would return, built without its per-sample overhead.

    Reads the safetensors header itself and views the arrays with np.frombuffer over one
    writable copy of the member, and fills the record's fields directly: shards are written from
    CrystalRecords, so coordinates are already wrapped and arrays already int64/float64. Returns
    None for anything it does not recognise exactly (an unknown key, dtype or shape, a short
    buffer): the caller then uses `decode_sample`, which is the reference and reports errors.
    Equality with decode_sample is tested on every sample of the test shards.
    """
    try:
        meta = _JSON.decode(meta_bytes.decode())
        length = int.from_bytes(arrays_bytes[:8], "little")
        header = _JSON.decode(arrays_bytes[8 : 8 + length].decode())
    except (ValueError, UnicodeDecodeError):
        return None
    header.pop("__metadata__", None)
    if type(meta) is not dict or not _META_KEYS.issuperset(meta) or "key" not in meta or "source" not in meta:
        return None
    numbers = header.get("atomic_numbers")
    if numbers is None or numbers["dtype"] != "I64" or len(numbers["shape"]) != 1:
        return None
    n = numbers["shape"][0]
    data = bytearray(arrays_bytes)  # one writable copy shared by the arrays
    size, base = len(data), 8 + length
    arrays = {}
    for name, spec in header.items():
        start, end = spec["data_offsets"]
        shape = spec["shape"]
        if name == "atomic_numbers":
            dtype = np.int64
        elif name in _FLOAT_ARRAYS and spec["dtype"] == "F64" and shape == _expected_shape(name, n):
            dtype = np.float64
        elif name == PDD_ARRAY and spec["dtype"] == "F64" and len(shape) == 2 and shape[0] == n and shape[1] >= 2:
            dtype = np.float64
        else:
            return None
        count = math.prod(shape)
        if end - start != 8 * count or base + end > size:
            return None
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=base + start).reshape(shape)
    if "frac_coords" not in arrays or "lattice" not in arrays:
        return None
    record = object.__new__(CrystalRecord)
    fields = record.__dict__
    fields["key"] = meta["key"]
    fields["source"] = meta["source"]
    fields["atomic_numbers"] = arrays["atomic_numbers"]
    fields["frac_coords"] = arrays["frac_coords"]
    fields["lattice"] = arrays["lattice"]
    fields["group"] = meta.get("group") or meta["key"]
    for name in SCALAR_LABELS:
        fields[name] = meta.get(name)
    for name in ARRAY_LABELS:
        fields[name] = arrays.get(name)
    fields["properties"] = meta.get("properties", {})
    fields["pdd"] = arrays.get(PDD_ARRAY)
    return record
