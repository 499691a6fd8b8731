"""How much loss the paper-mode VAE targets carry that no invariant encoder can remove.

The reference CrysLDNet decodes Cartesian coordinates and the raw 3×3 lattice with L1 losses from
latents of an encoder that sees only interatomic distances (rotation- and translation-invariant).
If a crystal may come in any orientation R (L → L Rᵀ, x → x Rᵀ) — as when sources are mixed
(MPtrj, GNoME, JARVIS and CIF files each use their own conventions) or under rotation augmentation —
such a decoder gives the same output for every orientation, and its best output under L1 is the
per-entry median over orientations. For a Haar-random R each entry (v Rᵀ)_j = |v| u with
u ~ U[−1, 1] (Archimedes), so the median is 0 and the expected L1 is |v| / 2:

    lattice   E L1 per entry = mean_i |a_i| / 2            (a_i the lattice vectors)
    coords    E L1 per entry = mean_n |x_n| / 2            (x_n = f_n L, from the cell origin)

Likewise the origin: a translation-invariant encoder cannot know where the stored origin is, so
with a uniformly random origin the Cartesian position of an atom is uniform over the cell and the
best per-entry L1 predictor is the median of that distribution.

`measure(records)` evaluates both in closed form and by Monte Carlo (random rotations /
translations with the best blind predictor fitted on the samples), and `python -m
pretrain.objectives.irreducible [N]` prints the numbers for N real MP-20 crystals; they are
written in pretrain/README.md.
"""
from __future__ import annotations

import sys

import numpy as np


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 3, 3] Haar-uniform rotations (Shoemake)."""
    import torch

    from pretrain.objectives.geometry import shoemake_rotation

    return shoemake_rotation(torch.from_numpy(rng.random((n, 3)))).numpy()


def orientation_closed_form(lattice: np.ndarray, frac: np.ndarray) -> tuple[float, float]:
    """(lattice, coords) expected L1 per entry of the best rotation-blind predictor."""
    lengths = np.linalg.norm(lattice, axis=1)  # [3]
    radii = np.linalg.norm(frac @ lattice, axis=1)  # [N]
    return float(lengths.mean() / 2), float(radii.mean() / 2)


def orientation_monte_carlo(lattice, frac, rotations) -> tuple[float, float]:
    """Same, by sampling: rotate, fit the best blind predictor (per-entry median), average |error|."""
    lat = np.einsum("ij,rkj->rik", lattice, rotations)  # [R, 3, 3] = L Rᵀ
    pos = np.einsum("nj,rkj->rnk", frac @ lattice, rotations)  # [R, N, 3]
    lat_err = np.abs(lat - np.median(lat, axis=0)).mean()
    pos_err = np.abs(pos - np.median(pos, axis=0)).mean()
    return float(lat_err), float(pos_err)


def origin_monte_carlo(lattice, frac, rng, samples: int = 512) -> float:
    """Coordinates' expected L1 per entry of the best origin-blind predictor (stored orientation)."""
    shifts = rng.random((samples, 1, 3))
    pos = np.mod(frac[None] + shifts, 1.0) @ lattice  # [S, N, 3]
    return float(np.abs(pos - np.median(pos, axis=0)).mean())


def measure(records, rotations: int = 256, seed: int = 0) -> dict:
    """Mean over crystals of the irreducible L1 terms (Å per entry) and the stored-value scale."""
    rng = np.random.default_rng(seed)
    rots = random_rotations(rotations, rng)
    rows = []
    for record in records:
        lattice, frac = record.lattice, record.frac_coords
        cf_lat, cf_pos = orientation_closed_form(lattice, frac)
        mc_lat, mc_pos = orientation_monte_carlo(lattice, frac, rots)
        origin = origin_monte_carlo(lattice, frac, rng)
        rows.append((cf_lat, cf_pos, mc_lat, mc_pos, origin, np.abs(lattice).mean(), np.abs(frac @ lattice).mean()))
    rows = np.asarray(rows)
    names = [
        "lattice_l1_orientation_closed_form", "coord_l1_orientation_closed_form",
        "lattice_l1_orientation_monte_carlo", "coord_l1_orientation_monte_carlo",
        "coord_l1_origin_monte_carlo", "lattice_mean_abs_entry", "coord_mean_abs_entry",
    ]
    out = {name: float(rows[:, i].mean()) for i, name in enumerate(names)}
    out["crystals"] = len(records)
    out["rotations"] = rotations
    return out


def _mp20_records(n: int):
    import csv
    import gzip
    from pathlib import Path

    from pymatgen.core import Structure

    from data_pipeline.record import CrystalRecord

    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mp_20" / "val.csv.gz"
    records = []
    with gzip.open(path, "rt") as handle:
        for row in csv.DictReader(handle):
            structure = Structure.from_str(row["cif"], fmt="cif")
            records.append(CrystalRecord.from_structure(structure, key=row["material_id"], source="mp20"))
            if len(records) == n:
                break
    return records


if __name__ == "__main__":  # pragma: no cover - a measurement script
    import warnings

    warnings.filterwarnings("ignore")
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    for key, value in measure(_mp20_records(count)).items():
        print(f"{key:40s} {value:.4f}" if isinstance(value, float) else f"{key:40s} {value}")


def orbit_floor(record, symprec: float = 0.01) -> float:
    """Mean per-atom coordinate error (Å) when symmetry-equivalent atoms must share one fractional
    prediction — what a distance-only (E(3)-invariant) encoder with per-atom decoders is limited to.

    For each orbit (spglib's equivalent atoms) the shared prediction is the best of the orbit's own
    positions and their periodic mean, scored by the minimum-image distance, with the crystal's
    translation fixed — an upper estimate of the floor."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    dataset = SpacegroupAnalyzer(record.to_structure(), symprec=symprec).get_symmetry_dataset()
    orbits = np.asarray(dataset.equivalent_atoms if hasattr(dataset, "equivalent_atoms") else dataset["equivalent_atoms"])
    images = np.array(np.meshgrid(*[np.arange(-1, 2)] * 3)).reshape(3, -1).T  # [27, 3]
    total = 0.0
    for orbit in np.unique(orbits):
        frac = record.frac_coords[orbits == orbit]  # [m, 3]
        angle = 2 * np.pi * frac
        mean = np.arctan2(np.sin(angle).mean(0), np.cos(angle).mean(0)) / (2 * np.pi)
        best = np.inf
        for p in np.vstack([frac, mean[None]]):
            d = frac - p
            d = d - np.round(d)
            dist = np.linalg.norm((d[:, None, :] + images[None]) @ record.lattice, axis=-1).min(1)
            best = min(best, float(dist.sum()))
        total += best
    return total / record.num_atoms
