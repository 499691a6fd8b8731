"""Validity of a generated crystal, as the Crys-JEPA paper's appendix (and CDVAE's metric code) define it.

A crystal is valid when all three hold:
  structural   cell volume > 0.1 Å³ and every interatomic distance (periodic, minimum image,
               self-images included) > 0.5 Å;
  compositional  SMACT: some assignment of oxidation states is charge neutral and, with the Pauling
               test, anions are more electronegative than cations; all-metal compositions (alloys)
               count as valid, as in CDVAE's `smact_validity` (smact's `include_alloys=True`).
               Oxidation states: SMACT's original list ("smact14"), the one `Element.oxidation_states`
               held in the SMACT releases CDVAE ran with; SMACT >= 3 defaults to ICSD24 instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from data_pipeline.load.neighbors import NeighborRule, compute_neighbors
from data_pipeline.record import CrystalRecord

MIN_VOLUME = 0.1  # Å³, for the whole cell (the paper's rule)
MIN_DISTANCE = 0.5  # Å
# SMACT enumerates every combination of oxidation states; a 12-element composition from a barely
# trained generator can take minutes. Above this many combinations the composition is reported
# not valid, with the reason, instead of searched (real crystals stay far below it).
MAX_OXIDATION_COMBINATIONS = 200_000
OXIDATION_STATES = "smact14"  # CDVAE's set (see the module docstring)


@dataclass(frozen=True)
class Validity:
    structural: bool
    compositional: bool
    reason: str = ""  # why invalid, empty when valid

    @property
    def valid(self) -> bool:
        return self.structural and self.compositional


def min_interatomic_distance(record: CrystalRecord, search: float = MIN_DISTANCE + 0.5) -> float:
    """Shortest periodic distance between any two atoms (or an atom and its own image), in Å."""
    neighbors = compute_neighbors(record.frac_coords, record.lattice, NeighborRule(kind="radius", cutoff=search))
    return float(neighbors.distance.min()) if len(neighbors.distance) else float("inf")


def structural_validity(record: CrystalRecord) -> tuple[bool, str]:
    volume = record.volume
    if not np.isfinite(volume) or volume <= MIN_VOLUME:
        return False, f"volume {volume:.3g} Å³ <= {MIN_VOLUME}"
    shortest = min_interatomic_distance(record)
    if shortest <= MIN_DISTANCE:
        return False, f"atoms {shortest:.3f} Å apart (<= {MIN_DISTANCE} Å)"
    return True, ""


@lru_cache(maxsize=65536)
def _smact_valid(formula: str) -> bool:
    from pymatgen.core import Composition
    from smact.screening import smact_validity

    return bool(smact_validity(Composition(formula), use_pauling_test=True, include_alloys=True,
                               oxidation_states_set=OXIDATION_STATES))


def oxidation_combinations(elements) -> int:
    """Upper bound of the oxidation-state assignments SMACT would enumerate for these elements."""
    import smact

    total = 1
    for symbol in elements:
        total *= max(1, len(getattr(smact.Element(str(symbol)), f"oxidation_states_{OXIDATION_STATES}") or ()))
    return total


def compositional_validity(record: CrystalRecord) -> tuple[bool, str]:
    from pymatgen.core import Composition

    composition = Composition(dict(zip(*np.unique(record.atomic_numbers, return_counts=True))))
    formula = composition.reduced_formula
    combinations = oxidation_combinations(composition.elements)
    if combinations > MAX_OXIDATION_COMBINATIONS:
        return False, (f"{formula}: {len(composition.elements)} elements, {combinations:.2g} oxidation-state "
                       f"combinations (> {MAX_OXIDATION_COMBINATIONS:,}): not searched, counted not valid")
    if _smact_valid(formula):
        return True, ""
    return False, f"{formula}: no charge-neutral, electronegativity-ordered oxidation states (SMACT)"


def check_validity(record: CrystalRecord) -> Validity:
    structural, why_s = structural_validity(record)
    compositional, why_c = compositional_validity(record)
    return Validity(structural, compositional, "; ".join(r for r in (why_s, why_c) if r))
