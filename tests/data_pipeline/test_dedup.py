"""Dedup keys and structural matching (no Ray): supercells, permutations and translations are
caught; different structures, including polymorphs of one formula, are not."""
from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from data_pipeline.build.config import MatcherConfig
from data_pipeline.build.dedup import Candidate, exact_fingerprint, match_bucket, space_group_number
from data_pipeline.record import reduced_formula
from data_pipeline.record import CrystalRecord


def _record(structure: Structure, key: str) -> CrystalRecord:
    return CrystalRecord.from_structure(structure, key=key, source="t")


def rocksalt(a=5.64) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def zincblende(a=5.64) -> Structure:
    return Structure.from_spacegroup("F-43m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.25, 0.25, 0.25]])


def candidates(pairs, structural=True):
    return [Candidate(name=name, role=role, structural=structural, record=_record(s, name)) for name, role, s in pairs]


def test_reduced_formula_is_supercell_invariant_and_alphabetical():
    s = rocksalt()
    big = s.copy()
    big.make_supercell([2, 2, 3])
    assert reduced_formula(_record(s, "a").atomic_numbers) == "ClNa"
    assert reduced_formula(_record(big, "b").atomic_numbers) == "ClNa"
    assert reduced_formula(np.array([26, 26, 8, 8, 8])) == "Fe2O3"
    assert reduced_formula(np.array([3, 26, 8, 8])) == "FeLiO2"


def test_exact_fingerprint_ignores_atom_order_but_not_geometry():
    s = rocksalt()
    rec = _record(s, "a")
    order = np.random.default_rng(0).permutation(len(s))
    permuted = CrystalRecord(key="b", source="t", atomic_numbers=rec.atomic_numbers[order],
                             frac_coords=rec.frac_coords[order], lattice=rec.lattice)
    assert exact_fingerprint(rec) == exact_fingerprint(permuted)
    moved = rec.replace(frac_coords=rec.frac_coords + 0.01)
    assert exact_fingerprint(moved) != exact_fingerprint(rec)
    strained = rec.replace(lattice=rec.lattice * 1.01)
    assert exact_fingerprint(strained) != exact_fingerprint(rec)


def test_space_group_of_known_structures():
    assert space_group_number(_record(rocksalt(), "a")) == 225
    assert space_group_number(_record(zincblende(), "b")) == 216


def test_supercell_permuted_translated_copies_are_structural_duplicates():
    base = rocksalt()
    supercell = base.copy()
    supercell.make_supercell([[1, 1, 0], [0, 1, 1], [2, 0, 1]])
    permuted = Structure(base.lattice, list(reversed(base.species)), list(reversed(base.frac_coords)))
    translated = base.copy()
    translated.translate_sites(list(range(len(base))), [0.13, 0.27, 0.31])
    jittered = base.copy()
    jittered.perturb(0.02, min_distance=0.01)
    dropped = match_bucket(
        candidates([("base", "record", base), ("super", "record", supercell), ("perm", "record", permuted),
                    ("trans", "record", translated), ("jit", "record", jittered)]),
        MatcherConfig(), check_exclude=False,
    )
    assert sorted(dropped) == [(n, "structural", "base") for n in ("jit", "perm", "super", "trans")]


def test_different_structures_are_kept():
    # Same formula, different structures (rocksalt vs zinc blende), and a different formula.
    cscl = Structure(Lattice.cubic(3.2), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    dropped = match_bucket(
        candidates([("rs", "record", rocksalt()), ("zb", "record", zincblende()), ("cscl", "record", cscl)]),
        MatcherConfig(), check_exclude=False,
    )
    assert dropped == []


def test_real_mp20_crystals_of_one_formula_are_not_merged(mp20_records):
    # 64 distinct MP materials: no two are the same crystal, so nothing may be dropped.
    pairs = [(r.key, "record", r.to_structure()) for r in mp20_records]
    assert match_bucket(candidates(pairs), MatcherConfig(), check_exclude=False) == []


def test_only_structural_sources_are_deduplicated_and_refs_exclude():
    base = rocksalt()
    copy = base.copy()
    copy.make_supercell([1, 1, 2])
    keep_all = [Candidate("a", "record", False, _record(base, "a")), Candidate("b", "record", False, _record(copy, "b"))]
    assert match_bucket(keep_all, MatcherConfig(), check_exclude=False) == []
    with_ref = [Candidate("test", "ref", False, _record(copy, "test"))] + keep_all
    assert match_bucket(with_ref, MatcherConfig(), check_exclude=True) == [("a", "excluded", "test"), ("b", "excluded", "test")]
    assert match_bucket(with_ref, MatcherConfig(), check_exclude=False) == []


@pytest.mark.parametrize("ltol, expect", [(0.2, 1), (0.001, 0)])
def test_matcher_tolerances_are_used(ltol, expect):
    base = rocksalt()
    # Isotropic strain keeps the space group (same bucket); only the lattice tolerance decides.
    strained = rocksalt(5.64 * 1.05)
    dropped = match_bucket(candidates([("a", "record", base), ("b", "record", strained)]),
                           MatcherConfig(ltol=ltol, scale=False), check_exclude=False)
    assert len(dropped) == expect
