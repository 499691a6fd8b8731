"""Structural dedup that scales (issue #15, item 2), on real crystals, real pymatgen, no Ray:

* noisy copies of a real crystal collapse to one even when a bucket is cut into pieces (the
  space-group key of the old matcher let such copies through);
* distinct real polymorphs of one formula all stay, whether the bucket is one piece or cut;
* the cut planning is a function of the data and `dedup_group_size` only.
The Ray build's determinism across worker counts and the comparison with the previous code are in
test_build_scale.py."""
from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest

from data_pipeline.build.config import MatcherConfig
from data_pipeline.build.dedup import (
    Candidate,
    could_match,
    match_bucket,
    pair_tiles,
    plan_pieces,
    resolve_representatives,
    shape_key,
    shape_tolerance,
)
from data_pipeline.record import CrystalRecord


def noisy_copies(record: CrystalRecord, n: int, sigma: float, seed: int = 0) -> list[CrystalRecord]:
    """n copies with every atom moved by `sigma` Å in a random direction (cartesian), re-wrapped."""
    rng = np.random.default_rng(seed)
    inverse = np.linalg.inv(record.lattice)
    out = []
    for i in range(n):
        step = rng.normal(size=(record.num_atoms, 3))
        step *= sigma / np.linalg.norm(step, axis=1, keepdims=True)
        frac = (record.frac_coords + step @ inverse) % 1.0
        out.append(record.replace(key=f"copy:{i}", frac_coords=frac))
    return out


def carbon_polymorphs(shared_data, n: int) -> list[CrystalRecord]:
    """The first n real Carbon-24 structures (all C, distinct polymorphs of one formula)."""
    from pymatgen.core import Structure

    out = []
    with open(shared_data / "carbon_24" / "val.csv") as handle:
        for row in csv.DictReader(handle):
            out.append(CrystalRecord.from_structure(Structure.from_str(row["cif"], fmt="cif"),
                                                    key=f"c24:{row['material_id']}", source="c24"))
            if len(out) == n:
                break
    return out


def as_candidates(records, structural=True):
    return [Candidate(name=r.key, role="record", structural=structural, record=r) for r in records]


@pytest.fixture(scope="module")
def heusler(shared_data) -> CrystalRecord:
    """A real cubic crystal from MP-20 (TmMgHg2, Fm-3m)."""
    from pymatgen.core import Structure

    with gzip.open(shared_data / "mp_20" / "val.csv.gz", "rt") as handle:
        for row in csv.DictReader(handle):
            if row["material_id"] == "mp-865981":
                return CrystalRecord.from_structure(Structure.from_str(row["cif"], fmt="cif"), key="mp-865981", source="mp20")
    raise AssertionError("mp-865981 not in the MP-20 validation file")


@pytest.mark.parametrize("group_size", [None, 16])
def test_noisy_copies_of_a_real_crystal_collapse_to_one(heusler, group_size):
    copies = noisy_copies(heusler, 200, 0.01)
    stats: dict = {}
    dropped = match_bucket(as_candidates(copies), MatcherConfig(), check_exclude=False, group_size=group_size, stats=stats)
    assert len(dropped) == 199 and {d[0] for d in dropped} == {c.key for c in copies[1:]}
    assert all(how == "structural" for _, how, _ in dropped)
    if group_size is not None:
        assert stats["pieces"] > 1  # the bucket was cut and the pieces' representatives merged
    # Every copy's shape key is within the tolerance of the original's: the key is noise-tolerant.
    tol = shape_tolerance(MatcherConfig())
    base = shape_key(heusler, MatcherConfig())
    assert all(could_match(base, shape_key(c, MatcherConfig()), tol) for c in copies[:20])


@pytest.mark.parametrize("group_size", [None, 8])
def test_distinct_real_polymorphs_of_one_formula_stay(shared_data, group_size):
    polymorphs = carbon_polymorphs(shared_data, 40)
    # The reference: every pair compared (no bucketing, no shape filter), greedy in order.
    from data_pipeline.build.dedup import PairMatcher

    pm = PairMatcher(MatcherConfig())
    kept, reference = [], []
    for i, r in enumerate(polymorphs):
        hit = next((j for j in kept if pm._matcher.fit(pm.reduced(i, r), pm.reduced(j, polymorphs[j]),
                                                        skip_structure_reduction=True)), None)
        if hit is None:
            kept.append(i)
        else:
            reference.append((r.key, "structural", polymorphs[hit].key))
    dropped = match_bucket(as_candidates(polymorphs), MatcherConfig(), check_exclude=False, group_size=group_size)
    assert dropped == reference
    assert len(polymorphs) - len(dropped) >= 30  # distinct polymorphs remain distinct


def test_planning_depends_on_data_and_group_size_only():
    rng = np.random.default_rng(1)
    shapes = [(4, *np.round(rng.uniform(-0.5, 0.5, 3), 6)) for _ in range(300)] + [(8, 0.1, 0.2, 0.3)] * 50
    tol = shape_tolerance(MatcherConfig())
    pieces = plan_pieces(shapes, 64, tol)
    assert pieces == plan_pieces(list(shapes), 64, tol)
    assert sorted(i for p in pieces for i in p) == list(range(len(shapes)))  # a partition
    assert all(len(p) <= 64 for p in pieces) and all(p == sorted(p) for p in pieces)
    assert plan_pieces(shapes, 1000, tol) == [list(range(len(shapes)))]  # small buckets are one piece
    piece_of = {i: k for k, p in enumerate(pieces) for i in p}
    structural = [True] * len(shapes)
    reps = list(range(len(shapes)))
    tiles = pair_tiles(reps, shapes, [piece_of[i] for i in reps], structural, tol, tile=16)
    pairs = [pair for tile in tiles for pair in tile]
    assert all(len(tile) <= 16 * 16 for tile in tiles)
    # Exactly the pairs of different pieces that could match, each once, earlier first.
    expect = {(a, b) for b in reps for a in reps if a < b and piece_of[a] != piece_of[b]
              and could_match(shapes[a], shapes[b], tol)}
    assert len(pairs) == len(set(pairs)) and set(pairs) == expect
    # Resolution is greedy in global order and keeps the first of a chain.
    assert resolve_representatives([0, 1, 2, 3], [True] * 4, {(0, 1), (1, 2), (0, 3)}) == [(1, 0), (3, 0)]
    assert resolve_representatives([0, 1, 2], [False, True, False], {(0, 1), (0, 2)}) == [(1, 0)]


def test_shape_key_is_supercell_and_scale_invariant(heusler):
    from pymatgen.core import Structure

    structure = heusler.to_structure()
    big = structure.copy()
    big.make_supercell([[1, 1, 0], [0, 1, 1], [2, 0, 1]])
    scaled = structure.copy()
    scaled.scale_lattice(structure.volume * 1.1)
    keys = [shape_key(CrystalRecord.from_structure(s, key=k, source="t"), MatcherConfig())
            for k, s in (("a", structure), ("b", big), ("c", scaled))]
    assert keys[0][0] == keys[1][0] == keys[2][0] == 4  # primitive cell of a full Heusler: 4 sites
    assert np.allclose(keys[0][1:], keys[1][1:], atol=1e-5) and np.allclose(keys[0][1:], keys[2][1:], atol=1e-5)
    unscaled = shape_key(CrystalRecord.from_structure(scaled, key="d", source="t"), MatcherConfig(scale=False))
    assert unscaled[1] > keys[2][1]  # without volume scaling the key keeps the lengths in Å


def test_real_near_duplicates_across_space_groups_are_caught(shared_data):
    """Two Carbon-24 entries StructureMatcher calls the same crystal (rms 0.001) that spglib puts in
    space groups 15 and 166 at symprec 0.1: the old (formula, space group) bucket kept both."""
    from data_pipeline.build.dedup import space_group_number
    from pymatgen.core import Structure

    wanted = ("C-148219-4273-38", "C-13640-2755-45")
    found = {}
    with open(shared_data / "carbon_24" / "val.csv") as handle:
        for row in csv.DictReader(handle):
            if row["material_id"] in wanted:
                found[row["material_id"]] = CrystalRecord.from_structure(Structure.from_str(row["cif"], fmt="cif"),
                                                                         key=row["material_id"], source="c24")
    first, second = (found[k] for k in wanted)
    assert space_group_number(first) != space_group_number(second)
    assert match_bucket(as_candidates([first, second]), MatcherConfig(), check_exclude=False) == \
        [(second.key, "structural", first.key)]


def test_distortion_variants_merge_at_the_default_tolerance_and_stay_apart_with_a_tighter_stol(shared_data):
    """The decision of docs/scaling.md: `structural` means StructureMatcher's own definition. Two MP
    materials that are small distortions of one another (SrHfO3 mp-3378, Pnma, and mp-4673, Cmcm;
    rms 0.08) are one crystal at its default tolerances; `matcher: {stol: 0.1}` keeps them apart."""
    from pymatgen.core import Structure

    wanted = ("mp-3378", "mp-4673")
    found = {}
    with gzip.open(shared_data / "mpts_52" / "val.csv.gz", "rt") as handle:
        for row in csv.DictReader(handle):
            if row["material_id"] in wanted:
                found[row["material_id"]] = CrystalRecord.from_structure(Structure.from_str(row["cif"], fmt="cif"),
                                                                         key=row["material_id"], source="mpts52")
    first, second = (found[k] for k in wanted)
    assert match_bucket(as_candidates([first, second]), MatcherConfig(), check_exclude=False) == \
        [(second.key, "structural", first.key)]
    assert match_bucket(as_candidates([first, second]), MatcherConfig(stol=0.1), check_exclude=False) == []
