"""The per-record shortcuts of the build task give what the plain code gave, bit for bit:
the array-label check, safetensors encoding and the exact fingerprint."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from data_pipeline.build.dedup import exact_fingerprint
from data_pipeline.build.readers._common import _contains_string, array_label
from data_pipeline.build.readers.base import RecordError
from data_pipeline.record import CrystalRecord
from data_pipeline.shard_format import arrays_bytes, encode_record


def array_label_recursive(value, name):
    """array_label before its dtype shortcut: convert, then look for strings at every depth."""
    from data_pipeline.build.validate import reject

    if value is None:
        return None
    if isinstance(value, (str, bytes, bool)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise reject("bad_label_type", f"{name} is {type(value).__name__}, expected a list of numbers")
    try:
        array = np.asarray(value, dtype=np.float64)
    except ValueError as error:
        if _contains_string(value):
            raise reject("bad_label_type", f"{name} holds strings") from None
        raise reject("label_shape", f"{name} is ragged ({error})") from None
    if _contains_string(value):
        raise reject("bad_label_type", f"{name} holds strings")
    return array


def outcome(fn, value):
    try:
        result = fn(value, "forces")
    except RecordError as error:
        return "reject", str(error)
    except Exception as error:  # noqa: BLE001 - the same kind of failure is part of the verdict
        return "error", type(error).__name__
    return "array", None if result is None else (result.dtype.str, result.shape, result.tobytes())


TRICKY = [
    [[0.1, -0.2, 0.3], [1e-300, 2, 3]],  # floats and ints
    [[1, 2, 3], [4, 5, 6]],  # ints only (int64 → float64)
    [[True, False, 1.0]],  # bools
    [[2**62 + 1, 1.5, 0]],  # an int that float64 rounds
    [[2**70, 0, 0]],  # beyond int64: object dtype, the slow path
    [[np.float32(0.1), 0.2, 0.3]],  # numpy scalars
    [],  # empty
    [[]],
    (((0.0, 1.0, 2.0),),),  # nested tuples
    [["0.1", 0.2, 0.3]],  # a string among numbers
    [[0.1, 0.2, "0.3"]],
    [[[["1.0"]]]],  # deep
    [["1.0", "2.0"], ["3.0", "4.0"]],  # only strings, all numeric
    [[0.1, 0.2], [0.3]],  # ragged
    [[0.1, 0.2], ["x"]],  # ragged with a string
    [[b"1.0", 2.0]],  # bytes
    [np.array(["1.0", "2.0"])],  # a numpy string array inside a list (the recursion does not look inside)
    [np.array([1.0, 2.0]), [3.0, 4.0]],
    [np.array([1, "a"], dtype=object)],  # an object array inside a list
    np.array([["1.0", "2.0"]]),  # a numpy string array itself
    np.array([[1.0, "a"]], dtype=object),  # an object array itself
    np.array([[1.0, 2.0]], dtype=object),
    [[1 + 2j, 0, 0]],  # complex
    [[float("nan"), float("inf"), -0.0]],
    [[None, 1.0]],
    [[{"x": 1}, 1.0]],
]


@pytest.mark.parametrize("value", TRICKY, ids=range(len(TRICKY)))
def test_array_label_gives_the_recursive_checks_verdict(value):
    assert outcome(array_label, value) == outcome(array_label_recursive, value)


def record_with(n: int, seed: int, **labels) -> CrystalRecord:
    rng = np.random.default_rng(seed)
    return CrystalRecord(key=f"t:{seed}", source="t", atomic_numbers=rng.integers(1, 90, n),
                         frac_coords=rng.random((n, 3)) * 2 - 0.5, lattice=rng.normal(size=(3, 3)) * 5, **labels)


def test_arrays_bytes_equal_safetensors_save():
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 40):
        arrays = {"atomic_numbers": rng.integers(1, 100, n), "frac_coords": rng.random((n, 3)),
                  "lattice": rng.random((3, 3)), "forces": rng.normal(size=(n, 3)), "stress": rng.normal(size=(3, 3)),
                  "magmoms": rng.normal(size=n), "pdd": rng.random((n, 5))}
        assert arrays_bytes(arrays) == st_save(arrays)
        subset = {k: arrays[k] for k in ("lattice", "atomic_numbers", "frac_coords")}  # order of insertion
        assert arrays_bytes(subset) == st_save(subset)
    record = record_with(5, 2, forces=np.ones((5, 3)), stress=np.eye(3), magmoms=np.zeros(5), energy=-1.5)
    sample = encode_record(record)
    assert sample["safetensors"] == st_save({"atomic_numbers": record.atomic_numbers,
                                             "frac_coords": record.frac_coords, "lattice": record.lattice,
                                             "forces": record.forces, "stress": record.stress, "magmoms": record.magmoms})


def exact_fingerprint_reference(record, length_decimals=4, frac_decimals=5):
    lattice = np.round(record.lattice, length_decimals) + 0.0
    frac = np.round(record.frac_coords, frac_decimals) % 1.0 + 0.0
    rows = np.column_stack([record.atomic_numbers.astype(np.float64), frac])
    rows = rows[np.lexsort((rows[:, 3], rows[:, 2], rows[:, 1], rows[:, 0]))]
    sha = hashlib.sha256(lattice.astype("<f8").tobytes())
    sha.update(rows.astype("<f8").tobytes())
    return sha.hexdigest()[:32]


def test_exact_fingerprint_unchanged():
    records = [record_with(n, seed) for seed, n in enumerate((1, 2, 3, 8, 30, 100))]
    # ties in Z and x decided by y and z; values that round to 1.0 or -0.0
    tie = CrystalRecord(key="t:tie", source="t", atomic_numbers=[8, 8, 8, 3],
                        frac_coords=[[0.5, 0.2, 0.1], [0.5, 0.1, 0.9], [0.5, 0.1, 0.3], [0.9999999, 1e-9, 0.0]],
                        lattice=[[3.0, -1e-9, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    for record in records + [tie]:
        assert exact_fingerprint(record) == exact_fingerprint_reference(record)
