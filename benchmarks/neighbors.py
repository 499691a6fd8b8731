"""Periodic neighbour search: pymatgen's find_points_in_spheres vs vesin, on real MP-20 crystals
and their supercells (same pairs checked before timing). Prints µs per crystal and the ratio.

    python benchmarks/neighbors.py [--crystals 300] [--repeat 3]
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.load.neighbors import NeighborRule, _pymatgen_pairs, _vesin_pairs, compute_neighbors  # noqa: E402


def mp20_cells(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(frac coords, lattice) of the first n MP-20 validation crystals."""
    from pymatgen.core import Structure

    cells = []
    with gzip.open(ROOT.parent / "shared" / "data" / "mp_20" / "val.csv.gz", "rt") as handle:
        for row in csv.DictReader(handle):
            s = Structure.from_str(row["cif"], fmt="cif")
            cells.append((s.frac_coords, s.lattice.matrix))
            if len(cells) == n:
                break
    return cells


def supercell(frac, lattice, m: int):
    shifts = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 3)
    frac = ((frac[None, :, :] + shifts[:, None, :]) / m).reshape(-1, 3)
    return frac, lattice * m


def cpu_time(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crystals", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    base = mp20_cells(args.crystals)
    print(f"machine: {platform.machine()}, python {platform.python_version()}, 1 thread; CPU time per crystal")
    print("| cells | mean atoms | search | pymatgen µs | vesin µs | vesin / pymatgen |")
    print("|---|---:|---|---:|---:|---:|")
    for m, count in ((1, len(base)), (2, min(len(base), 60)), (3, 20), (5, 5)):
        cells = [supercell(f, l, m) if m > 1 else (f, l) for f, l in base[:count]]
        carts = [(np.ascontiguousarray(f @ l), np.ascontiguousarray(l)) for f, l in cells]
        for cutoff in (6.0,):
            for cart, lat in carts[:5]:  # same pairs from both before timing
                a, b = _pymatgen_pairs(cart, lat, cutoff), _vesin_pairs(cart, lat, cutoff)
                assert np.allclose(np.sort(a[3][a[3] < cutoff]), np.sort(b[3])), "backends disagree"
            t_pmg = cpu_time(lambda: [_pymatgen_pairs(c, l, cutoff) for c, l in carts], args.repeat) / count
            t_ves = cpu_time(lambda: [_vesin_pairs(c, l, cutoff) for c, l in carts], args.repeat) / count
            atoms = np.mean([len(c) for c, _ in carts])
            print(f"| MP-20 x{m ** 3} | {atoms:.0f} | radius {cutoff} Å pairs | {t_pmg * 1e6:,.0f} | "
                  f"{t_ves * 1e6:,.0f} | {t_ves / t_pmg:.2f} |")
        if m == 1:
            rule = NeighborRule(kind="knn", k=12, cutoff=6.0)
            for backend in ("pymatgen", "vesin"):
                t = cpu_time(lambda: [compute_neighbors(f, l, rule, backend=backend) for f, l in cells], args.repeat)
                print(f"| MP-20 x1 | {atoms:.0f} | full compute_neighbors knn k=12, {backend} | "
                      f"{t / count * 1e6:,.0f} µs | | |")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
