"""Crys-JEPA screening: reference selection by chemical system, D_C against a hand computation,
unscored candidates reported, ranking and keep fraction."""
from __future__ import annotations

import math

import numpy as np
import pytest

from data_pipeline.record import CrystalRecord
from discovery.screen import ReferenceEmbeddings, chemical_system, fingerprint_embeddings, jepa_scores, rank_candidates


def _rec(key, zs):
    n = len(zs)
    return CrystalRecord(key, "t", zs, np.linspace(0, 0.9, 3 * n).reshape(n, 3), np.eye(3) * 4)


REFS = [_rec("r:li", [3]), _rec("r:o", [8, 8]), _rec("r:li2o", [3, 3, 8]), _rec("r:fe2o3", [26, 26, 8, 8, 8]), _rec("r:na", [11])]
EMB = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [5.0, 5.0], [9.0, 9.0]])


def test_reference_set_is_every_crystal_whose_elements_are_a_subset():
    index = ReferenceEmbeddings(REFS, EMB)
    count, total, squares = index.subset_sums(chemical_system(_rec("c", [3, 8])))
    assert count == 3  # Li, O2, Li2O — not Fe2O3 (has Fe) nor Na
    np.testing.assert_allclose(total, EMB[:3].sum(0))
    assert count == index.subset_sums(frozenset({3, 8}))[0]  # cached path agrees
    assert index.subset_sums(frozenset({3, 8, 26}))[0] == 4


def test_d_c_matches_a_hand_computation():
    index = ReferenceEmbeddings(REFS, EMB)
    candidate = _rec("c:lio2", [3, 8, 8])
    e = np.array([0.5, 0.25])
    expected = np.mean([np.sum((e - EMB[i]) ** 2) for i in (0, 1, 2)])
    d, n = index.distance(candidate, e)
    assert n == 3 and math.isclose(d, expected, rel_tol=1e-12)


def test_candidates_without_references_are_reported_not_guessed():
    index = ReferenceEmbeddings(REFS, EMB)
    scores, refs = jepa_scores([_rec("c:k", [19]), _rec("c:li", [3])], np.array([[0, 0], [0, 1.0]]), index)
    assert math.isnan(scores[0]) and refs[0] == 0
    assert scores[1] == 0.0 and refs[1] == 1
    rows = rank_candidates(["c:k", "c:li"], scores, refs, keep_fraction=0.5)
    assert rows[0].rank is None and not rows[0].kept
    assert rows[1].rank == 1 and rows[1].kept


def test_ranking_keeps_the_lowest_scores():
    rows = rank_candidates(list("abcdef"), [5, 1, 3, float("nan"), 2, 4], [1] * 6, keep_fraction=0.4)
    kept = sorted(r.key for r in rows if r.kept)
    assert kept == ["b", "e"]  # ceil(0.4 × 5 scored) = 2
    assert [r.rank for r in rows] == [5, 1, 3, None, 2, 4]


def test_fingerprint_ranker_is_invariant_to_cell_choice(mp20_records):
    base = mp20_records[0]
    supercell = CrystalRecord.from_structure(base.to_structure() * (2, 1, 1), key="s", source="t")
    fp = fingerprint_embeddings([base, supercell])
    np.testing.assert_allclose(fp[0], fp[1], atol=1e-8)


def _labelled(key, zs, formation_energy):
    record = _rec(key, zs)
    record.formation_energy_per_atom = formation_energy
    return record


def test_reference_minimum_energy_is_the_lowest_of_every_subset_system():
    from discovery.screen import ReferenceMinimumEnergy

    refs = [_labelled("r:li", [3], 0.0), _labelled("r:o", [8, 8], 0.0), _labelled("r:li2o", [3, 3, 8], -2.07),
            _labelled("r:li2o-b", [3, 3, 8], -1.5), _labelled("r:fe2o3", [26, 26, 8, 8, 8], -1.7),
            _labelled("r:na", [11], None)]
    floor = ReferenceMinimumEnergy(refs)
    assert floor.minimum(frozenset({3, 8})) == (-2.07, 4)  # Li, O2 and both Li2O; not Fe2O3 nor the unlabelled Na
    assert floor.minimum(frozenset({3, 8, 26})) == (-2.07, 5)
    lowest, count = floor.minimum(frozenset({26}))  # Fe alone: no reference of that chemistry
    assert math.isnan(lowest) and count == 0
    with pytest.raises(ValueError, match="no formation_energy_per_atom label"):
        ReferenceMinimumEnergy([_rec("r:li", [3])])


def test_probe_score_is_the_predicted_energy_above_the_chemistrys_lowest_and_one_sided():
    from discovery.screen import probe_scores

    rng = np.random.default_rng(0)
    energies = rng.uniform(-3, 0, 60)
    # references in the Li–O system whose 3-d feature holds the energy exactly: the probe is then exact
    refs = [_labelled(f"r:{i}", [3, 3, 8], float(e)) for i, e in enumerate(energies)]
    features = np.column_stack([energies, rng.normal(size=60), rng.normal(size=60)])
    lowest = energies.min()
    candidates = [_rec("c:below", [3, 8]), _rec("c:above", [3, 8]), _rec("c:k", [19])]
    candidate_features = np.array([[lowest - 0.5, 0, 0], [lowest + 0.5, 0, 0], [0.0, 0, 0]])
    scores, counts = probe_scores(candidates, candidate_features, refs, features)
    np.testing.assert_allclose(scores[:2], [-0.5, 0.5], atol=0.02)
    assert counts[:2] == [60, 60] and math.isnan(scores[2]) and counts[2] == 0
    # D_C with the same features ranks the candidate below every reference last (it is farther from their
    # mean); the signed score ranks it first
    d_c, _ = jepa_scores(candidates[:2], candidate_features[:2], ReferenceEmbeddings(refs, features))
    assert d_c[0] > d_c[1] and scores[0] < scores[1]


def test_composition_features_are_element_fractions():
    from discovery.screen import composition_features

    (row,) = composition_features([_rec("c", [3, 3, 8])])
    assert row[2] == pytest.approx(2 / 3) and row[7] == pytest.approx(1 / 3) and row.sum() == pytest.approx(1.0)
