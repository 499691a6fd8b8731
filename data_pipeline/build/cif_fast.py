"""A fast CIF path with gemmi for the plain P1 CIFs that make up most crystal datasets.

pymatgen's `CifParser` parses an MP-20 CIF in ~1.75 ms; gemmi tokenises the same text ~50x
faster. This module reads a CIF with gemmi and then reproduces, step by step, what pymatgen's
`CifParser(...).parse_structures(primitive=False)[0]` would produce, so the two paths give the same
record (same atom order, fractional coordinates and lattice to 1e-6; a slow test proves it on
every shared CIF):

  1. lattice from (a, b, c, α, β, γ) with pymatgen's `Lattice.from_parameters` convention
     (a in the xz plane, c along z);
  2. coordinates within 1e-4 (relative) of 1/3 or 2/3 snapped to them, as pymatgen's
     `_sanitize_data` does with `frac_tolerance=1e-4`, then wrapped with x - floor(x);
  3. sites stably sorted by (electronegativity, symbol), as `Structure.get_sorted_structure`.

Anything this path does not reproduce exactly returns None, and the caller falls back to
pymatgen: more than one data block, symmetry operations other than the identity (or none listed),
partial occupancies, symbols that are not plain elements (oxidation states,
labels only), noble gases (no electronegativity), implicit hydrogens, magnetic CIFs, two sites within pymatgen's 1e-4 merge
tolerance, and cells thinner than pymatgen's 0.01 Å guard.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np

from data_pipeline.build import kernels

# Strings whose presence makes pymatgen do something this path does not: fall back.
_FALLBACK_MARKERS = ("_magn", "moment", "attached_hydrogens")
_CELL_TAGS = tuple(f"_cell_length_{x}" for x in "abc") + tuple(f"_cell_angle_{x}" for x in ("alpha", "beta", "gamma"))
_SYMOP_TAGS = (
    "_symmetry_equiv_pos_as_xyz",
    "_space_group_symop_operation_xyz",
    "_space_group_symop.operation_xyz",
    "_symmetry_equiv_pos_as_xyz_",
    "_space_group_symop_operation_xyz_",
)
_SITE_TOLERANCE = 1e-4  # pymatgen's site_tolerance; we fall back below twice that
_FRAC_TOLERANCE = 1e-4  # pymatgen's frac_tolerance
_MIN_THICKNESS = 0.01  # Å, pymatgen's min_thickness
_ONE_THIRD, _TWO_THIRDS = float(str(1 / 3)), float(str(2 / 3))  # the values pymatgen snaps to


@lru_cache(maxsize=1)
def element_tables() -> tuple[dict[str, int], dict[str, float]]:
    """Symbol → Z and symbol → Pauling electronegativity (NaN where pymatgen has none)."""
    from pymatgen.core.periodic_table import Element

    z_of, x_of = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No Pauling electronegativity for He" etc.
        for element in Element:
            if element.Z > 118:
                continue
            z_of[element.symbol] = element.Z
            x_of[element.symbol] = float(element.X)
    return z_of, x_of


@lru_cache(maxsize=1)
def _ordered_symbols() -> frozenset[str]:
    """Element symbols the fast path takes: those with a Pauling electronegativity."""
    _, x_of = element_tables()
    return frozenset(symbol for symbol, x in x_of.items() if not math.isnan(x))


def lattice_from_parameters(a, b, c, alpha, beta, gamma) -> np.ndarray:
    """pymatgen's `Lattice.from_parameters(..., vesta=False)`, rows are lattice vectors.

    The trigonometry is numpy's, called as pymatgen calls it (so the bits are the same on any
    machine, whatever libm numpy uses); the arithmetic is on Python floats, which round exactly
    as numpy's float64 scalars do at a tenth of their cost."""
    cos_alpha, cos_beta, sin_alpha, sin_beta, cos_gamma_star, sin_gamma_star = _angle_terms(alpha, beta, gamma)
    return np.array(
        [
            [a * sin_beta, 0.0, a * cos_beta],
            [-b * sin_alpha * cos_gamma_star, b * sin_alpha * sin_gamma_star, b * cos_alpha],
            [0.0, 0.0, float(c)],
        ],
        dtype=np.float64,
    )


@lru_cache(maxsize=4096)
def _angle_terms(alpha, beta, gamma) -> tuple[float, float, float, float, float, float]:
    """(cos α, cos β, sin α, sin β, cos γ*, sin γ*) from numpy's trigonometry. Cached: many cells
    share their angles (90/90/90, 60/60/60, 90/90/120: ~40% of MP-20), and each miss is ~8 µs
    of numpy calls on scalars. A pure function of the three floats (±0.0 share a key and give
    the same terms: cos is even, and sin α or sin β = ±0 raises)."""
    angles_r = np.radians([alpha, beta, gamma])
    cos_alpha, cos_beta, cos_gamma = np.cos(angles_r).tolist()
    sin_alpha, sin_beta, _ = np.sin(angles_r).tolist()
    if sin_alpha * sin_beta == 0.0:
        raise ValueError("alpha or beta is 0 or 180 degrees: the cell is flat")
    val = (cos_alpha * cos_beta - cos_gamma) / (sin_alpha * sin_beta)
    gamma_star = np.arccos(min(max(val, -1.0), 1.0))  # np.clip(val, -1, 1)
    return cos_alpha, cos_beta, sin_alpha, sin_beta, float(np.cos(gamma_star)), float(np.sin(gamma_star))


def _snap_fractions(frac: np.ndarray) -> np.ndarray:
    """Vectorised `math.isclose(x / special, 1, abs_tol=1e-4, rel_tol=0)` → x = float(str(special))."""
    # Most cells have no coordinate near 1/3 or 2/3 (|x - 1/2| near 1/6): one loose test, 30 times
    # wider than the snapping bands, spares them the exact ones.
    if not (np.abs(np.abs(frac - 0.5) - 1 / 6) < 1e-3).any():
        return frac
    out = frac.copy()
    for special in (2 / 3, 1 / 3):  # pymatgen checks 1/3 last, so it wins (never both)
        out[np.abs(frac / special - 1) <= _FRAC_TOLERANCE] = float(str(special))
    return out


def _cell_is_sound(lattice: np.ndarray) -> bool:
    """|det| >= 1e-12 and no thickness (volume / face area) under pymatgen's 0.01 Å, as numpy's
    `det` and `inv` decide it.

    numpy's 3x3 linear algebra costs ~20 µs a cell in call overhead. Most cells are far from both
    limits: closed forms (one compiled call) decide those with a factor 2 to spare, more than
    numpy's rounding can bridge while the cell is well conditioned (longest vector under 1e6 times
    the thinnest thickness keeps the relative error below ~1e-8). The rest get numpy's answer."""
    if kernels.cell_clearly_sound(lattice, _MIN_THICKNESS):  # the closed forms (`_cell_clearly_sound` in Python)
        return True
    det = float(np.linalg.det(lattice))
    if not math.isfinite(det) or abs(det) < 1e-12:
        return False
    reciprocal = np.linalg.inv(lattice).T  # [3, 3] rows are reciprocal vectors / 2π
    return not (1.0 / np.linalg.norm(reciprocal, axis=1) < _MIN_THICKNESS).any()


def _cell_clearly_sound(lattice: np.ndarray) -> bool:
    """kernels.cell_clearly_sound on Python floats (the reference): True when the closed forms clear
    the cell with a factor 2 to spare."""
    a, b, c = lattice.tolist()
    if all(map(math.isfinite, a + b + c)):
        crosses = (_cross(b, c), _cross(c, a), _cross(a, b))
        volume = abs(a[0] * crosses[0][0] + a[1] * crosses[0][1] + a[2] * crosses[0][2])
        if math.isfinite(volume) and volume >= 2e-12:
            thickness = [volume / math.sqrt(x * x + y * y + z * z) for x, y, z in crosses]
            if all(t >= 2 * _MIN_THICKNESS for t in thickness):
                thinnest = min(thickness)
                if all(math.sqrt(x * x + y * y + z * z) < 1e6 * thinnest for x, y, z in (a, b, c)):
                    return True
    return False


def _cross(u: list[float], v: list[float]) -> tuple[float, float, float]:
    return (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])


def _columns(table) -> list[list[str] | None]:
    """A gemmi table's columns as raw value strings (None for an absent optional tag). A loop
    hands over all its values as one list, where iterating a gemmi column costs ~0.5 µs a value
    (pybind ends each iteration with an exception)."""
    present = [table.has_column(i) for i in range(table.width())]
    loop = table.loop
    if loop is None:  # key-value pairs: one value per tag
        return [list(table.column(i)) if here else None for i, here in enumerate(present)]
    width, values, loop_tags, tags = loop.width(), loop.values, loop.tags, table.tags
    return [values[loop_tags.index(tags[i])::width] if here else None for i, here in enumerate(present)]


def parse_p1_cif(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(atomic_numbers [N], frac_coords [N, 3], lattice [3, 3]) as pymatgen would give, or None
    when the CIF needs pymatgen (see the module docstring). Never raises on bad input."""
    for marker in _FALLBACK_MARKERS:
        if marker in text:
            return None
    try:
        return _parse(text)
    except Exception:  # gemmi syntax errors, missing tags...: let pymatgen decide and explain
        return None


def _parse(text: str):
    from gemmi import cif

    doc = cif.read_string(text)
    if len(doc) != 1:
        return None
    block = doc[0]

    # Symmetry: exactly the identity.
    ops = None
    for tag in _SYMOP_TAGS:
        values = block.find_values(tag)
        if len(values):
            ops = [values.str(i).replace(" ", "").lower() for i in range(len(values))]  # str(i): as_string
            break
    if ops != ["x,y,z"]:
        return None

    # Lattice.
    params = [cif.as_number(block.find_value(tag)) for tag in _CELL_TAGS]
    if not all(map(math.isfinite, params)):
        return None
    lattice = lattice_from_parameters(*params)  # [3, 3]
    if not _cell_is_sound(lattice):
        return None

    # Sites.
    table = block.find("_atom_site_", ["label", "type_symbol", "fract_x", "fract_y", "fract_z", "?occupancy"])
    if len(table) == 0:
        return None
    _, symbol_column, x, y, z, occupancy = _columns(table)
    z_of, x_of = element_tables()
    symbols = [s if s in z_of else cif.as_string(s) for s in symbol_column]  # 'Fe' or a quoted "'Fe'"
    # Plain elements with an electronegativity only. Without one (He, Ne, Ar) pymatgen's site order
    # depends on its internal pre-sort by Composition; not worth reproducing for these few crystals.
    if not _ordered_symbols().issuperset(symbols):
        return None
    if occupancy is not None and any(cif.as_number(o) != 1.0 for o in set(occupancy)):  # each distinct text once
        return None
    if not len(x) == len(y) == len(z) == len(symbols):
        return None

    # pymatgen's `Site.__lt__` order (electronegativity, then symbol), stable like `sorted`.
    keys = [(x_of[s], s) for s in symbols]
    order = sorted(range(len(symbols)), key=keys.__getitem__)
    numbers = np.array([z_of[symbols[i]] for i in order], dtype=np.int64)  # [N]
    # Coordinates in that order: finite, snapped to 1/3 and 2/3, wrapped, no two sites merged (kernels.p1_sites;
    # `_sites_numpy` is the same in numpy, the reference).
    values = np.array(list(map(cif.as_number, [x[i] for i in order] + [y[i] for i in order] + [z[i] for i in order])),
                      dtype=np.float64)  # [3N]
    status, frac = kernels.p1_sites(values, _FRAC_TOLERANCE, _SITE_TOLERANCE, _ONE_THIRD, _TWO_THIRDS)
    if status != kernels.SITES_OK:
        return None
    return numbers, frac, lattice


def _sites_numpy(values: np.ndarray) -> np.ndarray | None:
    """kernels.p1_sites in numpy (values [3N]: x..., y..., z...): frac [N, 3], or None for non-finite
    or merged sites."""
    frac = values.reshape(3, -1).T.copy()  # [N, 3]
    if not np.isfinite(frac).all():
        return None
    frac = _snap_fractions(frac)
    frac = frac - np.floor(frac)
    # pymatgen merges sites closer than its tolerance into one (possibly mixed) site: fall back.
    if len(frac) > 1:
        delta = frac[:, None, :] - frac[None, :, :]  # [N, N, 3]
        delta = np.abs(delta - np.round(delta))
        close = (delta < 2 * _SITE_TOLERANCE).all(axis=-1)  # [N, N], the diagonal always True
        if np.count_nonzero(close) > len(frac):
            return None
    return frac


def parse_cif_pymatgen(text: str):
    """pymatgen's own CIF parse (the reference and the fallback): the first structure, primitive=False."""
    from pymatgen.io.cif import CifParser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parser = CifParser.from_str(text, check_cif=False)  # check_cif only warns; ~10% of the time
        try:
            return parser.parse_structures(primitive=False)[0]
        except ValueError as error:  # "no structures!": the real reason is in the parser's warnings
            details = "; ".join(str(w)[:160] for w in parser.warnings[-3:])
            raise ValueError(f"{error} {details}".strip()) from None
