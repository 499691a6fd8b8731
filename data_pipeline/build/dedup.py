"""Deduplication keys and structural matching, bucketed so it scales.

Three levels, cheapest first:

* key: two records with the same sample name (the sanitised record key) are the same record;
  the later one is always dropped (keys must be unique inside a shard set).
* exact: `exact_fingerprint` hashes the lattice and the sorted (Z, fractional position) list,
  rounded, so the same structure with its atoms listed in another order hashes the same.
* structural: pymatgen's StructureMatcher (supercells, permutations, translations, small strain).
  Comparing every pair is quadratic, so candidates are bucketed first by reduced formula (computed
  by every worker for every record, for free) and only inside a formula bucket with more than one
  member by space group (spglib, computed only for those records); the matcher runs only between
  records in the same (formula, space group) bucket. The matcher normalises supercells through
  the primitive cell, and both bucket keys are supercell-invariant.

The same matching excludes benchmark test-set structures (`exclude` sources) from the shards.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from data_pipeline.record import CrystalRecord

def exact_fingerprint(record: CrystalRecord, length_decimals: int = 4, frac_decimals: int = 5) -> str:
    """sha256 over the rounded lattice and the sorted, rounded (Z, frac) rows (32 hex chars)."""
    lattice = np.round(record.lattice, length_decimals) + 0.0  # + 0.0 folds -0.0
    frac = np.round(record.frac_coords, frac_decimals) % 1.0 + 0.0
    rows = np.column_stack([record.atomic_numbers.astype(np.float64), frac])  # [N, 4]
    rows = rows[np.lexsort((rows[:, 3], rows[:, 2], rows[:, 1], rows[:, 0]))]  # by Z, then x, y, z
    sha = hashlib.sha256(lattice.astype("<f8").tobytes())
    sha.update(rows.astype("<f8").tobytes())
    return sha.hexdigest()[:32]


def space_group_number(record: CrystalRecord, symprec: float = 0.1) -> int:
    """International space-group number from spglib; 0 when spglib finds none."""
    import spglib

    cell = (record.lattice, record.frac_coords, record.atomic_numbers)
    try:
        dataset = spglib.get_symmetry_dataset(cell, symprec=symprec)
    except Exception:  # noqa: BLE001 - spglib raises on odd cells; 0 keeps them in their own bucket
        return 0
    return int(dataset.number) if dataset is not None else 0


@dataclass(frozen=True)
class Candidate:
    """One structure in a formula bucket, in global build order.

    role: 'ref' (an exclude-source structure), or 'record' with `structural` True when its source
    asks for structural dedup (records of other sources are kept and serve as references).
    """

    name: str
    role: str
    structural: bool
    record: CrystalRecord


def match_bucket(candidates: list[Candidate], matcher_cfg, check_exclude: bool) -> list[tuple[str, str, str]]:
    """Resolve one reduced-formula bucket; returns [(name, how, matched_name)] for dropped records.

    how is 'excluded' (matches a ref) or 'structural' (matches an earlier kept record). Records are
    visited in the given (global) order, so the first of a set of duplicates is the one kept.
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher(
        ltol=matcher_cfg.ltol,
        stol=matcher_cfg.stol,
        angle_tol=matcher_cfg.angle_tol,
        primitive_cell=matcher_cfg.primitive_cell,
        scale=matcher_cfg.scale,
    )
    groups: dict[int, tuple[list, list]] = {}  # space group → (refs, kept)
    reduced: dict[str, object] = {}

    def structure(c: Candidate):
        # Primitive + Niggli reduction once per structure, not once per pair (fit would redo it).
        if c.name not in reduced:
            reduced[c.name] = matcher._get_reduced_structure(_bare_structure(c.record), matcher_cfg.primitive_cell, True)
        return reduced[c.name]

    def fits(a: Candidate, b: Candidate) -> bool:
        return matcher.fit(structure(a), structure(b), skip_structure_reduction=True)

    dropped = []
    for c in candidates:
        sg = space_group_number(c.record, matcher_cfg.symprec)
        refs, kept = groups.setdefault(sg, ([], []))
        if c.role == "ref":
            refs.append(c)
            continue
        hit = None
        if check_exclude:
            hit = next((r.name for r in refs if fits(c, r)), None)
            if hit is not None:
                dropped.append((c.name, "excluded", hit))
                continue
        if c.structural:
            hit = next((k.name for k in kept if fits(c, k)), None)
            if hit is not None:
                dropped.append((c.name, "structural", hit))
                continue
        kept.append(c)
    return dropped


def _bare_structure(record: CrystalRecord):
    """A pymatgen Structure without site properties (forces, magmoms are not part of identity)."""
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(record.lattice), record.atomic_numbers.tolist(), record.frac_coords)
