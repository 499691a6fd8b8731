"""Validation of parsed crystal records, and the stable reject codes every reader and the build use.

A reject reason is always the string ``"<code>: <detail>"``. The code is one of `REJECT_CODES`
(stable: manifests count rejects by it, so never rename one); the detail names what was wrong
in words a user can act on ("forces shape (5, 3) != (6, 3)").

Codes:

  unparsable          the raw text/document could not be parsed at all (bad CIF, bad POSCAR,
                      a structure dict pymatgen refuses, an unreadable archive member)
  truncated_file      the file ends in the middle of a document (reported once, by `scan`;
                      complete entries before the cut are still yielded)
  missing_field       a field the layout requires is absent (no structure, no `force` key in an
                      MPtrj frame, no CIF for a CSV row)
  bad_label_type      a label has the wrong JSON type (an energy given as a string, a list where
                      a number belongs, a boolean)
  label_shape         an array label does not match the atom count (forces N×3, stress 3×3,
                      magmoms N)
  non_finite          NaN or ±Inf in the lattice, coordinates or any label
  empty               a structure with no atoms
  unknown_element     an element symbol that is not an element, or Z outside 1..MAX_Z (100)
  disordered          partial occupancies / mixed sites (the record holds one species per site)
  degenerate_lattice  lattice vectors (nearly) linearly dependent or of (nearly) zero length
  volume_too_small    cell volume ≤ 0.1 Å³ per atom
  atoms_too_close     two atoms (or an atom and its own periodic image) closer than 0.5 Å,
                      measured with periodic minimum images

`validate(record)` checks what can be checked on a `CrystalRecord` (everything but the
parse-time codes) and raises `RecordError` with the first problem found; it returns None for a
good record.

The structure checks (atoms, finite values, lattice) first run as one compiled pass
(`kernels.plain_structure`) that only says "certainly fine"; a record it does not clear goes
through the numpy checks in order, which find and word the reject.

The distance check runs in two steps. A cheap exact pass (`_clear_by_minimum_image`: a compiled
loop over all pairs under the minimum-image convention, ~1 µs for an MP-20 cell against vesin's ~40 µs) proves most records have no
pair within 0.5 Å; only a record it cannot clear (a pair within 0.5 Å + 1e-6, a cell thinner
than ~1 Å along some axis, or more than 256 atoms) gets the full vesin neighbour search (2 Å,
filtered at 0.5 Å), which alone decides and words the reject. So verdicts and reasons
are those of the neighbour search on every record (checked on every shared record in the tests);
`validate(record, distance_prefilter=False)` skips the cheap pass.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from data_pipeline.build import kernels
from data_pipeline.record import ARRAY_LABELS, MAX_Z, SCALAR_LABELS, CrystalRecord, RecordError

REJECT_CODES: dict[str, str] = {
    "unparsable": "the raw text or document could not be parsed",
    "truncated_file": "the file ends inside a document",
    "missing_field": "a required field is absent",
    "bad_label_type": "a label has the wrong type (e.g. an energy given as a string)",
    "label_shape": "an array label does not match the number of atoms",
    "non_finite": "NaN or Inf in lattice, coordinates or labels",
    "empty": "a structure with no atoms",
    "unknown_element": "not an element, or Z outside 1..MAX_Z",
    "disordered": "partial occupancies or mixed sites",
    "degenerate_lattice": "lattice vectors (nearly) linearly dependent or of zero length",
    "volume_too_small": "cell volume <= 0.1 Å^3 per atom",
    "atoms_too_close": "two atoms closer than 0.5 Å (periodic minimum image)",
}

MIN_DISTANCE = 0.5  # Å, periodic minimum image
# vesin bins space into cells of the cutoff's size: with 0.5 Å a 500 Å^3 cell has 4,000 bins and
# the search costs ~1 ms; searching 2 Å and filtering is ~6x faster (few pairs lie within 2 Å).
_SEARCH_CUTOFF = 2.0
MIN_VOLUME_PER_ATOM = 0.1  # Å^3
# |det L| / (|a||b||c|) is the volume of the parallelepiped of unit vectors: 1 for a cube, 0 when
# the vectors are coplanar. Below this the cell is numerically flat (angles within ~0.06° of 0/180).
MIN_NORMALISED_VOLUME = 1e-3
MIN_VECTOR_LENGTH = 1e-3  # Å


def reject(code: str, detail: str) -> RecordError:
    """A `RecordError` whose message is ``"<code>: <detail>"``; unknown codes are a programming error."""
    if code not in REJECT_CODES:
        raise KeyError(f"unknown reject code {code!r}; known: {sorted(REJECT_CODES)}")
    return RecordError(f"{code}: {detail}")


def reason_code(reason: str | BaseException) -> str:
    """The code of a reason string (``"non_finite: ..."`` → ``"non_finite"``); "unparsable" otherwise."""
    code = str(reason).split(":", 1)[0].strip()
    return code if code in REJECT_CODES else "unparsable"


def as_float(value, name: str) -> float | None:
    """A JSON/CSV scalar label as float, None for null; strings, bools and lists are `bad_label_type`."""
    if type(value) is float:  # the common case, as below returns it (isinstance(.., Real) is an ABC check, ~1 µs)
        return value
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise reject("bad_label_type", f"{name} is {type(value).__name__} {str(value)[:40]!r}, expected a number")
    return float(value)


def validate(record: CrystalRecord, *, distance_prefilter: bool = True) -> None:
    """Raise `RecordError("<code>: <detail>")` for the first problem found, else return None.
    `distance_prefilter=False` runs the neighbour search on every record (the reference path)."""
    if _structure_is_plain(record):  # one compiled pass proves the three structure checks pass
        _check_labels(record)
    else:  # the checks in order: the first problem found is the reason
        _check_atoms(record)
        _check_finite(record)
        _check_labels(record)
        _check_lattice(record)
    if not (distance_prefilter and _clear_by_minimum_image(record)):
        _check_distances(record)


def _structure_is_plain(record: CrystalRecord) -> bool:
    """True when `_check_atoms`, `_check_finite` and `_check_lattice` certainly pass (kernels.plain_structure,
    one call instead of ~20 numpy calls); False when they might not, and then they decide."""
    return kernels.plain_structure(record.atomic_numbers, record.frac_coords, record.lattice, MAX_Z,
                                   MIN_VECTOR_LENGTH, MIN_NORMALISED_VOLUME, MIN_VOLUME_PER_ATOM)


# ---------------------------------------------------------------------------------------- stages
def _check_atoms(record: CrystalRecord) -> None:
    if record.num_atoms == 0:
        raise reject("empty", "structure has no atoms")
    z = record.atomic_numbers
    bad = (z < 1) | (z > MAX_Z)
    if bad.any():
        raise reject("unknown_element", f"atomic number {int(z[bad][0])} outside 1..{MAX_Z}")
    if record.frac_coords.shape != (record.num_atoms, 3):
        raise reject("label_shape", f"frac_coords shape {record.frac_coords.shape} != ({record.num_atoms}, 3)")


def _check_finite(record: CrystalRecord) -> None:
    if not np.isfinite(record.lattice).all():
        raise reject("non_finite", "lattice has NaN/Inf")
    if not np.isfinite(record.frac_coords).all():
        raise reject("non_finite", "coordinates have NaN/Inf")


def _check_labels(record: CrystalRecord) -> None:
    n = record.num_atoms
    for name in SCALAR_LABELS:
        value = getattr(record, name)
        if value is None:
            continue
        value = as_float(value, name)  # a Python float: math.isfinite, not numpy's per-call overhead
        if not math.isfinite(value):
            raise reject("non_finite", f"{name} is {value}")
    for name, value in record.properties.items():
        value = as_float(value, f"properties[{name!r}]")
        if value is not None and not math.isfinite(value):
            raise reject("non_finite", f"properties[{name!r}] is {value}")
    for name, shape_of in ARRAY_LABELS.items():
        value = getattr(record, name)
        if value is None:
            continue
        if value.dtype.kind not in "fiu":
            raise reject("bad_label_type", f"{name} has dtype {value.dtype}, expected numbers")
        if value.shape != shape_of(n):
            raise reject("label_shape", f"{name} shape {value.shape} != {shape_of(n)}")
        if not np.isfinite(value).all():
            raise reject("non_finite", f"{name} has NaN/Inf")


def _check_lattice(record: CrystalRecord) -> None:
    lattice = record.lattice
    # np.linalg.norm(lattice, axis=1) computed as it computes it, without its argument handling
    lengths = np.sqrt(np.add.reduce(lattice * lattice, axis=1))  # [3]
    if (lengths < MIN_VECTOR_LENGTH).any():
        raise reject("degenerate_lattice", f"lattice vector lengths {np.round(lengths, 6).tolist()} Å")
    volume = record.volume
    a, b, c = lengths.tolist()
    if volume / (a * b * c) < MIN_NORMALISED_VOLUME:  # np.prod's order: (a * b) * c
        raise reject("degenerate_lattice", f"lattice vectors (nearly) coplanar, volume {volume:.3g} Å^3")
    if volume / record.num_atoms <= MIN_VOLUME_PER_ATOM:
        raise reject("volume_too_small", f"{volume / record.num_atoms:.3g} Å^3/atom <= {MIN_VOLUME_PER_ATOM}")


# The cheap pass is conservative by this much, so float rounding can never clear a pair that the
# neighbour search would put below MIN_DISTANCE (both work in float64: errors are ~1e-14 Å).
_PREFILTER_MARGIN = 1e-6  # Å
# All pairs cost O(N^2): 256 atoms is 33k pairs (~1 ms), about what vesin's search costs there.
_PREFILTER_MAX_ATOMS = 256


def _clear_by_minimum_image(record: CrystalRecord) -> bool:
    """True when no two atoms (nor an atom and its own image) are within MIN_DISTANCE; False when
    that cannot be ruled out cheaply (then the neighbour search decides).

    Why it is exact: a displacement r = (Δf + n) @ L has fractional components (Δf + n)_k = r · c_k,
    where c_k is column k of L^-1, so |r| < cutoff implies |(Δf + n)_k| < cutoff·|c_k| =: reach_k.
    When every reach_k < 1/2, only the image with Δf + n wrapped into [-1/2, 1/2] can qualify (the
    next image is at least 1/2 away in that component), and no atom can be near its own image
    (n ≠ 0 would need |n_k| < 1/2). So checking each pair's minimum image suffices
    (`kernels.clear_by_minimum_image`, |c_k| = |(other two rows) x| / volume).
    """
    if record.num_atoms > _PREFILTER_MAX_ATOMS:
        return False
    return kernels.clear_by_minimum_image(record.frac_coords, record.lattice, MIN_DISTANCE + _PREFILTER_MARGIN)


_calculator = None


def _check_distances(record: CrystalRecord) -> None:
    global _calculator
    if _calculator is None:  # one per process: vesin's setup costs more than a small cell's search
        from vesin import NeighborList

        _calculator = NeighborList(cutoff=_SEARCH_CUTOFF, full_list=False, n_threads=1)
    cart = record.cart_coords  # [N, 3]
    i, j, d = _calculator.compute(points=cart, box=record.lattice, periodic=True, quantities="ijd")
    close = d < MIN_DISTANCE  # [pairs]
    if close.any():
        i, j, d = i[close], j[close], d[close]
        k = int(np.argmin(d))
        what = "its own periodic image" if i[k] == j[k] else f"atom {int(j[k])}"
        raise reject(
            "atoms_too_close",
            f"atom {int(i[k])} is {float(d[k]):.3f} Å from {what} (minimum {MIN_DISTANCE} Å)",
        )
