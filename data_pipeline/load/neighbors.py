"""Periodic neighbour lists for the graph view (pymatgen's cell-list search, or vesin).

Two rules:
  radius  every periodic image within `cutoff` Å;
  knn     the k nearest periodic neighbours of every atom, searched within `cutoff` Å, the
          cutoff growing (×1.5) until every atom has at least k candidates, up to `max_cutoff`
          (PDDFormer: k=25 within 4 Å; Matformer: k=12 within 8 Å). Candidates that tie with
          the k-th nearest (within `tie_tolerance`, 1e-5 Å) are all kept, so an atom may get more
          than k edges: which neighbours an atom has is then a function of the crystal, not of
          the order its atoms are listed in (a cut inside a tie would pick by atom index). Edges
          are ordered by (distance, sender, image) within each receiver so the list is
          deterministic for a given atom order.
Optionally 6 self-edges per atom along ±a, ±b, ±c (the lattice vectors themselves), as
ComFormer/PDDFormer add to expose the cell to the network.

Output is receiver-sorted: edge e goes from sender `src[e]` to receiver `dst[e]`, and the edge
vector is pos[src] + shift @ lattice - pos[dst].

Backends (same pairs, tested against each other and a brute-force search): "pymatgen"
(`pymatgen.optimization.neighbors.find_points_in_spheres`, Cython) and "vesin". Measured on MP-20
crystals and their supercells (benchmarks/neighbors.py), pymatgen's call is 1.3-2.2x faster than
vesin's from 9 to 950 atoms (vesin's per-call ctypes marshalling weighs on small systems);
"auto" (the default) uses pymatgen below `VESIN_FROM_ATOMS` atoms and vesin above.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crystalfm_common.config import from_dict as dataclass_from_dict

_LATTICE_SHIFTS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)


@dataclass(frozen=True)
class NeighborRule:
    kind: str = "knn"  # "knn" or "radius"
    cutoff: float = 4.0  # Å; the starting search radius for knn
    k: int = 25
    max_cutoff: float = 24.0  # knn stops growing here (a crystal this sparse is almost empty)
    lattice_self_edges: bool = False
    # knn: candidates at most this far (Å) beyond the k-th distance tie with it and are kept. Above
    # float noise (1e-12) and the rounding of CIF coordinates (MP-20: near-ties of 1e-7..1e-5 Å
    # between atoms a symmetric cell makes equivalent), below real distance differences.
    tie_tolerance: float = 1e-5

    def __post_init__(self):
        if self.kind not in ("knn", "radius"):
            raise ValueError(f"neighbour rule kind must be 'knn' or 'radius', got {self.kind!r}")

    @classmethod
    def from_dict(cls, config: dict | None) -> "NeighborRule | None":
        return None if config is None else dataclass_from_dict(cls, config, "graph", typed=False)


@dataclass
class NeighborList:
    src: np.ndarray  # [E] int64 sender
    dst: np.ndarray  # [E] int64 receiver, non-decreasing
    shift: np.ndarray  # [E, 3] float64 integer image offsets
    distance: np.ndarray  # [E] float64 Å


BACKENDS = ("auto", "pymatgen", "vesin")
# pymatgen was faster at every size measured (9 to 950 atoms, benchmarks/results/loader.md); its
# lead shrinks with size, so "auto" hands cells above this many atoms to vesin's linear cell list.
VESIN_FROM_ATOMS = 2000


def _vesin_pairs(cart: np.ndarray, lattice: np.ndarray, cutoff: float):
    """(receiver i, sender j, image shift S, distance) of every pair closer than cutoff."""
    from vesin import NeighborList as VesinNL

    calculator = VesinNL(cutoff=cutoff, full_list=True, n_threads=1)
    i, j, s, d = calculator.compute(points=cart, box=lattice, periodic=True, quantities="ijSd")
    return i.astype(np.int64), j.astype(np.int64), s.astype(np.float64), d.astype(np.float64)


_PBC = np.ones(3, dtype=np.int64)


def _pymatgen_pairs(cart: np.ndarray, lattice: np.ndarray, cutoff: float):
    """Same contract as _vesin_pairs, from pymatgen's Cython cell-list search."""
    from pymatgen.optimization.neighbors import find_points_in_spheres

    i, j, s, d = find_points_in_spheres(cart, cart, r=cutoff, pbc=_PBC, lattice=lattice, tol=1e-8)
    not_self = (i != j) | np.any(s != 0, axis=1)  # drop each atom's zero-shift self pair only
    return i[not_self].astype(np.int64), j[not_self].astype(np.int64), s[not_self], d[not_self]


def _pairs(cart, lattice, cutoff, backend):
    if backend == "auto":
        backend = "vesin" if len(cart) >= VESIN_FROM_ATOMS else "pymatgen"
    if backend == "pymatgen":
        return _pymatgen_pairs(cart, lattice, cutoff)
    if backend == "vesin":
        return _vesin_pairs(cart, lattice, cutoff)
    raise ValueError(f"neighbour backend must be one of {BACKENDS}, got {backend!r}")


def _knn_start_radius(n: int, lattice: np.ndarray, rule: NeighborRule) -> float:
    """A search radius expected to hold ~1.5 k neighbours at the crystal's mean density.

    Starting there instead of at `rule.cutoff` gives the same k nearest (the search grows until
    every atom's k-th distance plus the tie tolerance lies strictly inside the radius), with
    far fewer candidate pairs to sort when the cutoff is generous (k=12 within 6 Å: ~10x fewer).
    """
    volume = abs(np.linalg.det(lattice))
    radius = (3.0 * 1.5 * rule.k * volume / (4.0 * np.pi * max(n, 1))) ** (1.0 / 3.0)
    return float(min(rule.cutoff, max(radius, 1.0)))


def _image_code(shift: np.ndarray) -> np.ndarray:
    """One int64 per integer image shift, ordered like (sx, sy, sz) lexicographically."""
    s = shift.astype(np.int64) + 4096
    return (s[:, 0] * 8192 + s[:, 1]) * 8192 + s[:, 2]


def compute_neighbors(frac_coords: np.ndarray, lattice: np.ndarray, rule: NeighborRule,
                      backend: str = "auto") -> NeighborList:
    lattice = np.ascontiguousarray(lattice, dtype=np.float64)
    cart = np.ascontiguousarray(np.asarray(frac_coords, dtype=np.float64) @ lattice)
    n = cart.shape[0]
    cutoff = rule.cutoff if rule.kind == "radius" else _knn_start_radius(n, lattice, rule)
    while True:
        dst, src, shift, dist = _pairs(cart, lattice, cutoff, backend)
        inside = dist < cutoff  # strict, whatever the backend's own convention at the boundary
        dst, src, shift, dist = dst[inside], src[inside], shift[inside], dist[inside]
        if rule.kind == "radius" or n == 0:
            break
        # Deterministic order: receiver, then distance (to 1e-10 Å, so float noise cannot reorder
        # ties), then sender and image as tie-breakers.
        order = np.lexsort((_image_code(shift), src, np.round(dist, 10), dst))
        dst, src, shift, dist = dst[order], src[order], shift[order], dist[order]
        counts = np.bincount(dst, minlength=n)
        enough = counts >= rule.k
        kth = np.full(n, np.inf)  # [n] each atom's k-th nearest distance (inf: fewer candidates)
        kth[enough] = dist[(np.cumsum(counts) - counts)[enough] + rule.k - 1]
        # complete once every atom has k candidates and all those tied with its k-th lie inside
        if (enough.all() and kth.max() + rule.tie_tolerance < cutoff) or cutoff >= rule.max_cutoff:
            keep = dist <= kth[dst] + rule.tie_tolerance  # an atom short of k keeps all it has
            dst, src, shift, dist = dst[keep], src[keep], shift[keep], dist[keep]
            break
        cutoff = min(cutoff * 1.5, rule.max_cutoff)
    if rule.kind == "radius":
        order = np.lexsort((_image_code(shift), src, np.round(dist, 10), dst))
        dst, src, shift, dist = dst[order], src[order], shift[order], dist[order]
    if rule.lattice_self_edges and n:
        atoms = np.repeat(np.arange(n, dtype=np.int64), 6)
        self_shift = np.tile(_LATTICE_SHIFTS, (n, 1))
        self_dist = np.linalg.norm(self_shift @ lattice, axis=1)
        dst = np.concatenate([dst, atoms])
        src = np.concatenate([src, atoms])
        shift = np.concatenate([shift, self_shift])
        dist = np.concatenate([dist, self_dist])
        order = np.argsort(dst, kind="stable")
        dst, src, shift, dist = dst[order], src[order], shift[order], dist[order]
    return NeighborList(src=src, dst=dst, shift=shift, distance=dist)
