"""The crystal record: one sample, the unit every part of the system exchanges.

Units (recorded in every manifest): energies in eV (per atom where the name says so), lengths in Å,
forces in eV/Å, stress in GPa (3x3, the sign convention of pymatgen/ASE/CHGNet: positive is tensile,
i.e. MPtrj's VASP kBar times -0.1), magnetic moments in μB.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import ase
    from pymatgen.core import Structure

UNITS = {
    "lattice": "angstrom",
    "frac_coords": "fractional",
    "energy": "eV",
    "energy_per_atom": "eV/atom",
    "formation_energy_per_atom": "eV/atom",
    "e_above_hull": "eV/atom",
    "band_gap": "eV",
    "forces": "eV/angstrom",
    "stress": "GPa",
    "magmoms": "bohr_magneton",
}

# Scalar labels every record may carry (None when the source has no value).
SCALAR_LABELS = ("energy", "energy_per_atom", "formation_energy_per_atom", "e_above_hull", "band_gap")
# Per-atom or per-crystal array labels with their expected shape given N atoms.
ARRAY_LABELS = {"forces": lambda n: (n, 3), "stress": lambda n: (3, 3), "magmoms": lambda n: (n,)}

_STRUCTURE_FIELDS = frozenset(("atomic_numbers", "frac_coords", "lattice"))

MAX_Z = 100  # one-hot width of the token view; elements beyond fermium are rejected


class RecordError(ValueError):
    """A raw entry that cannot become a valid record; the message is the reason."""


_SYMBOLS: dict[int, str] | None = None


def element_symbol(z: int) -> str:
    global _SYMBOLS
    if _SYMBOLS is None:
        from pymatgen.core.periodic_table import Element

        _SYMBOLS = {el.Z: el.symbol for el in Element}
    symbol = _SYMBOLS.get(int(z))
    return symbol if symbol is not None else f"Z{int(z)}"


def reduced_formula(atomic_numbers: np.ndarray) -> str:
    """Alphabetical reduced formula ('Fe2O3', 'FeLiO2'); identical for any supercell of a cell."""
    counts = Counter(np.asarray(atomic_numbers).tolist())  # plain ints: far faster than np.unique here
    if not counts:
        return ""
    divisor = math.gcd(*counts.values())
    parts = sorted([(element_symbol(z), c // divisor) for z, c in counts.items()])
    return "".join([sym if n == 1 else f"{sym}{n}" for sym, n in parts])


@dataclass
class CrystalRecord:
    """One crystal (or one frame of a trajectory).

    key: stable, unique `source:id[:frame]`.
    group: the id that decides the split (all frames of one material share it).
    lattice: rows are the lattice vectors a, b, c in Å.
    frac_coords: wrapped to [0, 1).
    """

    key: str
    source: str
    atomic_numbers: np.ndarray  # [N] int64
    frac_coords: np.ndarray  # [N, 3] float64 in [0, 1)
    lattice: np.ndarray  # [3, 3] float64, rows are lattice vectors (Å)
    group: str = ""
    energy: float | None = None
    energy_per_atom: float | None = None
    formation_energy_per_atom: float | None = None
    e_above_hull: float | None = None
    band_gap: float | None = None
    forces: np.ndarray | None = None  # [N, 3]
    stress: np.ndarray | None = None  # [3, 3]
    magmoms: np.ndarray | None = None  # [N]
    properties: dict[str, float] = field(default_factory=dict)
    # Derived, not data: the PDD rows of `pdd_features` below ([N, k + 1]) when a
    # data build or a fine-tune cache computed them once (`BuildConfig.pdd_k`); None otherwise.
    # The collate uses them when their k matches and computes the rows itself when not.
    pdd: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.atomic_numbers = np.asarray(self.atomic_numbers, dtype=np.int64).reshape(-1)
        self.frac_coords = np.asarray(self.frac_coords, dtype=np.float64).reshape(-1, 3)
        self.lattice = np.asarray(self.lattice, dtype=np.float64).reshape(3, 3)
        # Wrap into [0, 1): np.mod(x, 1.0) is in [0, 1] (+0.0 for zeros, 1.0 where a tiny negative x
        # rounds up) and the second mod sends 1.0 to 0.0, so no value is left >= 1.0.
        self.frac_coords = np.mod(np.mod(self.frac_coords, 1.0), 1.0)
        for name in ARRAY_LABELS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=np.float64))
        if self.pdd is not None:
            self.pdd = np.asarray(self.pdd, dtype=np.float64)
            if self.pdd.ndim != 2 or self.pdd.shape[0] != self.num_atoms or self.pdd.shape[1] < 2:
                raise ValueError(f"{self.key}: pdd must be [{self.num_atoms}, k + 1] rows, got shape {self.pdd.shape}")
        if not self.group:
            self.group = self.key

    # ------------------------------------------------------------------ basic facts
    @property
    def num_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @property
    def cart_coords(self) -> np.ndarray:
        return self.frac_coords @ self.lattice

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.lattice)))

    def labels(self) -> dict[str, Any]:
        """Scalar labels that are present, plus the free `properties` map."""
        out = {name: getattr(self, name) for name in SCALAR_LABELS if getattr(self, name) is not None}
        out.update(self.properties)
        return out

    def replace(self, **changes: Any) -> "CrystalRecord":
        """A copy with `changes`; a new structure (numbers, coordinates, lattice) drops the PDD rows
        derived from the old one unless `pdd` is given too."""
        if "pdd" not in changes and _STRUCTURE_FIELDS.intersection(changes):
            changes["pdd"] = None
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ conversions
    def to_structure(self) -> "Structure":
        from pymatgen.core import Lattice, Structure

        site_properties = {}
        if self.forces is not None:
            site_properties["forces"] = self.forces.tolist()
        if self.magmoms is not None:
            site_properties["magmom"] = self.magmoms.tolist()
        return Structure(
            Lattice(self.lattice),
            [int(z) for z in self.atomic_numbers],
            self.frac_coords,
            coords_are_cartesian=False,
            site_properties=site_properties or None,
        )

    @classmethod
    def from_structure(cls, structure: "Structure", key: str, source: str, **labels: Any) -> "CrystalRecord":
        """Build a record from an ordered pymatgen Structure (disordered sites are refused)."""
        if not structure.is_ordered:
            raise ValueError(f"{key}: disordered structure (partial occupancies) is not supported")
        numbers = [site.specie.Z for site in structure]
        if "forces" not in labels and "forces" in structure.site_properties:
            labels["forces"] = structure.site_properties["forces"]
        return cls(
            key=key,
            source=source,
            atomic_numbers=numbers,
            frac_coords=structure.frac_coords,
            lattice=structure.lattice.matrix,
            **labels,
        )

    def to_ase(self) -> "ase.Atoms":
        import ase

        atoms = ase.Atoms(numbers=self.atomic_numbers, cell=self.lattice, scaled_positions=self.frac_coords, pbc=True)
        if self.magmoms is not None:
            atoms.set_initial_magnetic_moments(self.magmoms)
        atoms.info["key"] = self.key
        atoms.info["source"] = self.source
        atoms.info.update(self.labels())
        if self.forces is not None:
            atoms.arrays["forces"] = self.forces.copy()
        return atoms

    @classmethod
    def from_ase(cls, atoms: "ase.Atoms", key: str, source: str, **labels: Any) -> "CrystalRecord":
        if "forces" not in labels and "forces" in atoms.arrays:
            labels["forces"] = atoms.arrays["forces"]
        return cls(
            key=key,
            source=source,
            atomic_numbers=atoms.numbers,
            frac_coords=atoms.get_scaled_positions(wrap=True),
            lattice=np.asarray(atoms.cell[:]),
            **labels,
        )


def lattice_polar6(lattice: np.ndarray) -> np.ndarray:
    """The 6 independent entries of the symmetric polar factor S = sqrt(L Lᵀ) of a lattice.

    With lattice rows as vectors, a rotation R maps L to L Rᵀ and leaves L Lᵀ (the Gram matrix of
    the lattice vectors) unchanged, so S is rotation-invariant; L = S V with V orthogonal, so S
    and the orientation V together give back the lattice. Order: S00, S01, S02, S11, S12, S22.
    Works on [..., 3, 3] arrays.
    """
    lattice = np.asarray(lattice, dtype=np.float64)
    gram = lattice @ np.swapaxes(lattice, -1, -2)
    w, v = np.linalg.eigh(gram)
    s = (v * np.sqrt(np.clip(w, 0.0, None))[..., None, :]) @ np.swapaxes(v, -1, -2)
    iu = np.triu_indices(3)
    return s[..., iu[0], iu[1]]


def polar6_to_matrix(polar6: np.ndarray) -> np.ndarray:
    """Inverse of `lattice_polar6` up to orientation: the symmetric 3x3 lattice S."""
    polar6 = np.asarray(polar6, dtype=np.float64)
    out = np.zeros(polar6.shape[:-1] + (3, 3))
    iu = np.triu_indices(3)
    out[..., iu[0], iu[1]] = polar6
    out[..., iu[1], iu[0]] = polar6
    return out


# ------------------------------------------------------------------ PDD rows (a derived view)
def pdd_features(record: "CrystalRecord", k: int) -> np.ndarray:
    """[N, k+1] per-atom pointwise distance distribution rows (average-minimum-distance).

    Column 0 (amd's weight column, 1/N for an uncollapsed PDD) is replaced by Z_i / ΣZ so the
    row also says which element sits there (the PDDFormer input); columns 1..k are the atom's
    sorted distances to its k nearest periodic neighbours (Å). `lexsort=False` keeps row i on atom i
    (amd sorts rows lexicographically by default, which would hand atoms other atoms' rows).
    Distances include the atom's own periodic images and exclude itself. amd JIT-compiles on its
    first call in a process (seconds): the loader warms it once per worker (`load.loader.warm_pdd`).
    It lives here, on the floor under both wings, because a data build stores these rows in shards
    (`BuildConfig.pdd_k`) and the loader's collate reads or computes the same rows.
    """
    import amd

    periodic_set = amd.PeriodicSet(record.cart_coords, record.lattice, types=record.atomic_numbers)
    pdd = np.asarray(amd.PDD(periodic_set, k, lexsort=False, collapse=False), dtype=np.float64)
    z = record.atomic_numbers.astype(np.float64)
    pdd[:, 0] = z / z.sum()
    return pdd


def record_pdd(record: "CrystalRecord", k: int) -> np.ndarray:
    """[N, k+1] PDD rows of a record: the ones it carries (stored by a data build with `pdd_k`, or
    filled by a fine-tune cache) when their k matches, else computed now by `pdd_features`.
    Both give the same float64 numbers: the stored rows are `pdd_features`' output."""
    if record.pdd is not None and record.pdd.shape[1] == k + 1:
        return record.pdd
    return pdd_features(record, k)


def with_pdd(record: "CrystalRecord", k: int) -> "CrystalRecord":
    """The record carrying its PDD rows for k (the same record when it already does)."""
    if record.pdd is not None and record.pdd.shape[1] == k + 1:
        return record
    return record.replace(pdd=pdd_features(record, k))
