"""The build task's per-record numeric steps, compiled with numba: one call each instead of a
dozen numpy calls.

Why: an MP-20 cell has ~10 atoms, so each numpy call in the task (1–3 µs of Python overhead)
cost far more than its arithmetic, and the task made ~50 of them per record. Each kernel below
runs one step's loops in a single call (~0.5 µs to dispatch).

How they stay exact: the same IEEE operations in the same order as the numpy code they replace
(`np.rint`, `np.fmod` with numpy's sign rule, x - floor(x), no fastmath, so no reassociation
or FMA contraction); where a result only feeds a comparison (a length, a volume, a distance),
the kernel decides only cases that clear the threshold by a wide margin and the caller runs the
numpy code for the rest, so verdicts and messages are the numpy code's. Each caller keeps its
numpy reference; tests/data_pipeline/test_ingest_kernels.py compares the two bit for bit on
random and real cells.

Compiled on first call and cached beside this file (numba `cache=True`): the first process
compiles for a few seconds, later ones load the cache (~1 s with numba's import).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

# Status codes of `p1_sites`.
SITES_OK, SITES_NON_FINITE, SITES_MERGED = 0, 1, 2


@njit(cache=True)
def _remainder1(x):
    """np.remainder(x, 1.0) (= Python's x % 1.0): fmod, shifted into [0, 1), zero as +0.0."""
    m = np.fmod(x, 1.0)
    if m != 0.0:
        if m < 0.0:
            m += 1.0
    else:
        m = 0.0
    return m


@njit(cache=True)
def p1_sites(values, frac_tolerance, site_tolerance, one_third, two_thirds):
    """The fast CIF path's coordinate steps (cif_fast._sites_numpy): values [3N] are x..., y..., z...;
    returns (status, frac [N, 3]), status SITES_OK, SITES_NON_FINITE or SITES_MERGED.

    1. every value finite; 2. within frac_tolerance (relative) of 2/3 or 1/3 → that value (1/3
    checked last, as pymatgen does); 3. wrapped as x - floor(x); 4. SITES_MERGED when two sites
    are within 2·site_tolerance in every wrapped component (|Δ - rint(Δ)|)."""
    n = values.shape[0] // 3
    frac = np.empty((n, 3))
    for k in range(3):
        for i in range(n):
            raw = values[k * n + i]
            if not np.isfinite(raw):
                return SITES_NON_FINITE, frac
            x = raw
            if abs(raw / two_thirds - 1.0) <= frac_tolerance:
                x = two_thirds
            if abs(raw / one_third - 1.0) <= frac_tolerance:
                x = one_third
            frac[i, k] = x - np.floor(x)
    merge = 2.0 * site_tolerance
    for i in range(n):
        for j in range(i + 1, n):
            close = True
            for k in range(3):
                delta = frac[i, k] - frac[j, k]
                if not abs(delta - np.rint(delta)) < merge:
                    close = False
                    break
            if close:
                return SITES_MERGED, frac
    return SITES_OK, frac


@njit(cache=True)
def cell_clearly_sound(lattice, min_thickness):
    """cif_fast._cell_clearly_sound: True when |a · (b × c)| >= 2e-12, every thickness (volume / face
    area) >= 2·min_thickness and every vector shorter than 1e6 times the thinnest thickness, with
    Python's operations in Python's order (a zero face area raises ZeroDivisionError, as there)."""
    if not all_finite(lattice):
        return False
    faces = np.empty((3, 3))  # rows b × c, c × a, a × b
    for k in range(3):
        u, v = (k + 1) % 3, (k + 2) % 3
        faces[k, 0] = lattice[u, 1] * lattice[v, 2] - lattice[u, 2] * lattice[v, 1]
        faces[k, 1] = lattice[u, 2] * lattice[v, 0] - lattice[u, 0] * lattice[v, 2]
        faces[k, 2] = lattice[u, 0] * lattice[v, 1] - lattice[u, 1] * lattice[v, 0]
    volume = abs(lattice[0, 0] * faces[0, 0] + lattice[0, 1] * faces[0, 1] + lattice[0, 2] * faces[0, 2])
    if not (np.isfinite(volume) and volume >= 2e-12):
        return False
    thickness = np.empty(3)
    for k in range(3):  # all three before any test, as the Python list is built
        thickness[k] = volume / math.sqrt(faces[k, 0] * faces[k, 0] + faces[k, 1] * faces[k, 1] + faces[k, 2] * faces[k, 2])
    for k in range(3):
        if not thickness[k] >= 2.0 * min_thickness:
            return False
    thinnest = min(thickness[0], thickness[1], thickness[2])
    for r in range(3):
        if not math.sqrt(lattice[r, 0] * lattice[r, 0] + lattice[r, 1] * lattice[r, 1] + lattice[r, 2] * lattice[r, 2]) < 1e6 * thinnest:
            return False
    return True


@njit(cache=True)
def all_finite(a):
    """np.isfinite(a).all() for a float array of any shape."""
    for x in a.flat:
        if not np.isfinite(x):
            return False
    return True


@njit(cache=True)
def plain_structure(numbers, frac, lattice, max_z, min_length, min_normalised_volume, min_volume_per_atom):
    """True when validate's structure checks (atoms, finite, lattice) certainly pass: at least one
    atom, every Z in 1..max_z, frac [N, 3], all finite, each lattice vector at least 2·min_length
    long, |det| / (|a||b||c|) at least 2·min_normalised_volume and |det| / N above
    2·min_volume_per_atom. False means only "not certain": validate's numpy code then decides
    (the factor 2 is far more than the ~1e-15 relative difference between this triple product and
    numpy's LU determinant, or between the two ways of summing a length)."""
    n = numbers.shape[0]
    if n == 0 or frac.shape[0] != n or frac.shape[1] != 3:
        return False
    for i in range(n):
        if numbers[i] < 1 or numbers[i] > max_z:
            return False
    if not (all_finite(lattice) and all_finite(frac)):
        return False
    lengths = np.empty(3)
    for r in range(3):
        lengths[r] = math.sqrt(lattice[r, 0] * lattice[r, 0] + lattice[r, 1] * lattice[r, 1] + lattice[r, 2] * lattice[r, 2])
        if not lengths[r] >= 2.0 * min_length:
            return False
    volume = abs(_triple_product(lattice))
    if not volume / (lengths[0] * lengths[1] * lengths[2]) >= 2.0 * min_normalised_volume:
        return False
    return volume / n > 2.0 * min_volume_per_atom


@njit(cache=True)
def _triple_product(lattice):
    """a · (b × c) for lattice rows a, b, c."""
    return (lattice[0, 0] * (lattice[1, 1] * lattice[2, 2] - lattice[1, 2] * lattice[2, 1])
            + lattice[0, 1] * (lattice[1, 2] * lattice[2, 0] - lattice[1, 0] * lattice[2, 2])
            + lattice[0, 2] * (lattice[1, 0] * lattice[2, 1] - lattice[1, 1] * lattice[2, 0]))


@njit(cache=True)
def clear_by_minimum_image(frac, lattice, cutoff):
    """validate._clear_by_minimum_image's pass (see its docstring for why it is exact): True when
    no pair of atoms, nor an atom and its own image, lies within `cutoff`; False when that cannot
    be ruled out this way (then the neighbour search decides)."""
    n = frac.shape[0]
    # reach_k = cutoff · |(row k+1) × (row k+2)| / volume: how far fractional component k can go
    reach = np.empty(3)
    volume = 0.0
    for k in range(3):
        u, v = (k + 1) % 3, (k + 2) % 3
        x = lattice[u, 1] * lattice[v, 2] - lattice[u, 2] * lattice[v, 1]
        y = lattice[u, 2] * lattice[v, 0] - lattice[u, 0] * lattice[v, 2]
        z = lattice[u, 0] * lattice[v, 1] - lattice[u, 1] * lattice[v, 0]
        if k == 0:
            volume = abs(lattice[0, 0] * x + lattice[0, 1] * y + lattice[0, 2] * z)
        reach[k] = math.sqrt(x * x + y * y + z * z)
    if volume == 0.0:
        return False
    widest = -np.inf  # Python's max() as the numpy code takes it: a NaN is kept only in front
    for k in range(3):
        reach[k] = cutoff * reach[k] / volume
        if k == 0 or reach[k] > widest:
            widest = reach[k]
    if widest >= 0.5:
        return False  # a cell thinner than ~2·cutoff along some axis: more images could be close
    cutoff2 = cutoff * cutoff
    delta = np.empty(3)
    for i in range(n):
        for j in range(i + 1, n):
            near = True
            for k in range(3):
                d = frac[j, k] - frac[i, k]
                d -= np.rint(d)
                delta[k] = d
                if not abs(d) < reach[k]:
                    near = False
                    break
            if near:
                r2 = 0.0
                for c in range(3):
                    x = delta[0] * lattice[0, c] + delta[1] * lattice[1, c] + delta[2] * lattice[2, c]
                    r2 += x * x
                if not r2 >= cutoff2:
                    return False
    return True


@njit(cache=True)
def fingerprint_tables(numbers, frac, lattice, length_scale, frac_scale):
    """exact_fingerprint's two tables back to back: (finite, [9 + 4N] = the rounded lattice, then
    rows (Z, x, y, z) sorted by Z, then x, y, z). Rounding is numpy's `round(decimals)`:
    rint(v · 10^d) / 10^d (scale = 10^d); coordinates then % 1.0, and + 0.0 folds -0.0. `finite`
    False (table unset) when a value is NaN/Inf: the numpy code orders those its own way."""
    n = numbers.shape[0]
    table = np.empty(9 + 4 * n)
    if not (all_finite(lattice) and all_finite(frac)):
        return False, table
    for r in range(3):
        for c in range(3):
            table[3 * r + c] = np.rint(lattice[r, c] * length_scale) / length_scale + 0.0
    rows = np.empty((n, 4))
    for i in range(n):
        rows[i, 0] = numbers[i]
        for k in range(3):
            rows[i, k + 1] = _remainder1(np.rint(frac[i, k] * frac_scale) / frac_scale) + 0.0
    # Sort the row indices (bottom-up merge sort). Rows that compare equal are equal bit for bit
    # (no NaN, no -0.0), so the bytes do not depend on how ties are ordered.
    order = np.arange(n)
    spare = np.empty(n, dtype=np.int64)
    width = 1
    while width < n:
        for low in range(0, n, 2 * width):
            mid, high = min(low + width, n), min(low + 2 * width, n)
            i, j, k = low, mid, low
            while i < mid and j < high:
                if _row_less(rows, order[j], order[i]):
                    spare[k] = order[j]
                    j += 1
                else:
                    spare[k] = order[i]
                    i += 1
                k += 1
            while i < mid:
                spare[k] = order[i]
                i += 1
                k += 1
            while j < high:
                spare[k] = order[j]
                j += 1
                k += 1
        order, spare = spare, order
        width *= 2
    for i in range(n):
        for k in range(4):
            table[9 + 4 * i + k] = rows[order[i], k]
    return True, table


@njit(cache=True)
def _row_less(rows, a, b):
    for k in range(4):
        if rows[a, k] < rows[b, k]:
            return True
        if rows[a, k] > rows[b, k]:
            return False
    return False
