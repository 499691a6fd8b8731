"""Stability: energy above the convex hull, per chemical system, from a reference set.

Footing. Every energy is put on the Materials Project's (MP2020-corrected) scale as a formation
energy per atom:
  * reference crystals carry formation energies already (MP-20's `formation_energy_per_atom`,
    MPtrj's `ef_per_atom`), and every element is a reference at 0 eV/atom;
  * a candidate's force-field energy (CHGNet, trained on MPtrj's corrected energies, so it
    estimates MP2020-corrected total energies) becomes a formation energy by subtracting MP's
    elemental reference energies per atom (`mp-elemental-reference-entries`, the file
    Matbench Discovery uses for exactly this): E_f = E/N - Σ_el x_el μ_el.
The hull of each chemical system is a pymatgen PhaseDiagram over formation energies, built once
per system from the reference crystals whose elements are a subset of it and cached.
"""
from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable

STABLE_THRESHOLD = 0.1  # eV/atom above the hull (the paper's S criterion)


def load_elemental_references(path: str | Path) -> dict[str, float]:
    """MP elemental reference entries (element → ComputedEntry dict) → {element: eV/atom}."""
    from pymatgen.entries.computed_entries import ComputedEntry

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        raw = json.load(handle)
    refs = {}
    for element, entry in raw.items():
        entry = ComputedEntry.from_dict(entry)
        refs[element] = entry.energy / entry.composition.num_atoms
    return refs


def formation_energy_per_atom(composition, energy_per_atom: float, elemental: dict[str, float]) -> float:
    """Total energy per atom → formation energy per atom against elemental references."""
    from pymatgen.core import Composition

    composition = Composition(composition)
    missing = [str(el) for el in composition.elements if str(el) not in elemental]
    if missing:
        raise KeyError(f"no elemental reference energy for {missing}; add them to the reference file")
    fractions = composition.fractional_composition
    return energy_per_atom - sum(fractions[el] * elemental[str(el)] for el in composition.elements)


class HullReference:
    """Formation-energy convex hulls per chemical system from reference (composition, E_f) pairs."""

    def __init__(self, entries: Iterable[tuple[object, float]]):
        from pymatgen.core import Composition

        self._by_system: dict[frozenset[str], list[tuple[Composition, float]]] = defaultdict(list)
        for composition, ef in entries:
            composition = Composition(composition)
            self._by_system[frozenset(str(el) for el in composition.elements)].append((composition, float(ef)))
        self._cache: dict[frozenset[str], object] = {}

    @classmethod
    def from_records(cls, records) -> "HullReference":
        """CrystalRecords with `formation_energy_per_atom`; the others are skipped."""
        from pymatgen.core import Composition

        pairs = []
        for record in records:
            if record.formation_energy_per_atom is None:
                continue
            composition = Composition(
                {int(z): int(n) for z, n in zip(*__import__("numpy").unique(record.atomic_numbers, return_counts=True))}
            )
            pairs.append((composition, record.formation_energy_per_atom))
        return cls(pairs)

    def phase_diagram(self, elements: Iterable[str]):
        from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
        from pymatgen.core import Composition

        system = frozenset(elements)
        if system not in self._cache:
            entries = [PDEntry(Composition(el), 0.0) for el in sorted(system)]  # elements at E_f = 0
            for subsystem, members in self._by_system.items():
                if subsystem <= system:
                    entries += [PDEntry(c, ef * c.num_atoms) for c, ef in members]
            self._cache[system] = PhaseDiagram(entries)
        return self._cache[system]

    def e_above_hull(self, composition, formation_energy: float) -> float:
        """eV/atom above the hull of the composition's chemical system (negative: below it)."""
        from pymatgen.core import Composition

        composition = Composition(composition)
        diagram = self.phase_diagram(str(el) for el in composition.elements)
        hull = diagram.get_hull_energy_per_atom(composition)
        return float(formation_energy - hull)

    def is_stable(self, composition, formation_energy: float, threshold: float = STABLE_THRESHOLD) -> bool:
        return self.e_above_hull(composition, formation_energy) < threshold
