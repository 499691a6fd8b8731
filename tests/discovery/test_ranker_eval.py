"""Judging stability rankers: Spearman ρ with paired, seeded bootstrap intervals on cases where ρ is
known, then `discovery screen --evaluate` end to end on real MP-20 crystals with a tiny JEPA."""
from __future__ import annotations

import csv
import gzip
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from discovery.ranker_eval import evaluate_rankers, random_scores, spearman, spearman_ci, bootstrap_indices


def _labels(n=400, seed=0):
    return np.random.default_rng(seed).exponential(0.1, n)  # E_hull-like: many near 0, a long tail


def test_perfect_and_reversed_rankers():
    labels = _labels()
    results = {r.ranker: r for r in evaluate_rankers(labels, {"perfect": labels, "monotone": np.sqrt(labels),
                                                              "reversed": -labels}, resamples=200)}
    assert results["perfect"].spearman == pytest.approx(1.0) and results["perfect"].ci_low == pytest.approx(1.0)
    assert results["monotone"].spearman == pytest.approx(1.0)  # ρ depends on order only
    assert results["reversed"].spearman == pytest.approx(-1.0) and results["reversed"].ci_high == pytest.approx(-1.0)


def test_random_ranker_is_zero_within_its_interval():
    labels = _labels(1000)
    (result,) = evaluate_rankers(labels, {"random": random_scores(1000, seed=3)}, resamples=500, seed=1)
    assert result.ci_low < 0.0 < result.ci_high
    assert result.ci_high - result.ci_low < 0.2  # ≈ 4/√n wide


def test_interval_covers_the_known_rho_of_a_gaussian_pair():
    # For a bivariate normal with correlation r, Spearman's ρ = (6/π) arcsin(r/2).
    r, n = 0.6, 3000
    rng = np.random.default_rng(7)
    x = rng.normal(size=n)
    y = r * x + math.sqrt(1 - r * r) * rng.normal(size=n)
    expected = 6 / math.pi * math.asin(r / 2)
    rho, low, high = spearman_ci(x, y, bootstrap_indices(n, 500, seed=0))
    assert low < expected < high and low < rho < high
    assert abs(rho - expected) < 0.05


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 5, 60).astype(float), rng.integers(0, 4, 60).astype(float)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_bootstrap_is_seeded_and_paired_over_common_crystals():
    labels = _labels(200)
    noisy = labels + np.random.default_rng(4).normal(0, 0.05, 200)
    unscored = noisy.copy()
    unscored[:50] = np.nan  # a ranker that could not score 50 crystals
    first = evaluate_rankers(labels, {"a": noisy, "b": unscored}, resamples=300, seed=5)
    again = evaluate_rankers(labels, {"a": noisy, "b": unscored}, resamples=300, seed=5)
    other = evaluate_rankers(labels, {"a": noisy, "b": unscored}, resamples=300, seed=6)
    assert [r.row() for r in first] == [r.row() for r in again]
    assert first[0].ci_low != other[0].ci_low
    a, b = first
    assert a.scored == 200 and b.scored == 150 and a.n == b.n == 150
    # on the common crystals the two rankers' scores are the same, so are ρ and its interval
    assert (a.spearman, a.ci_low, a.ci_high) == (b.spearman, b.ci_low, b.ci_high)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="scores for"):
        evaluate_rankers([0.1, 0.2, 0.3], {"short": [1.0, 2.0]})


@pytest.mark.slow
def test_screen_evaluate_on_real_crystals(shared_data, tiny_jepa, tmp_path, capsys):
    """30 crystals of MP-20's test half (with their DFT e_above_hull) ranked against the training
    file by the tiny JEPA's D_C and energy probe, the composition probe, the AMD fingerprint, CHGNet and
    random; one table, one MLflow run."""
    import mlflow

    from discovery.cli import main
    from discovery.references import half_of

    with gzip.open(shared_data / "mp_20" / "val.csv.gz", "rt") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        test_half = [row for row in reader if half_of(row[header.index("material_id")]) == "test"]
    rows = test_half[:: len(test_half) // 30][:30]  # spread over the file: its first rows are all on the hull
    with open(tmp_path / "test_half.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    refs = shared_data / "mp_entries" / "mbd_2023-02-07-mp-elemental-reference-entries.json.gz"
    out = tmp_path / "ranker_eval"
    code = main(["screen", str(tmp_path / "test_half.csv"), "--evaluate", "--jepa", str(tiny_jepa),
                 "--reference", str(shared_data / "mp_20" / "train.csv.gz"), "--elemental-refs", str(refs),
                 "--bootstrap", "200", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    with open(out / "ranker_eval.csv") as handle:
        table = {r["ranker"]: r for r in csv.DictReader(handle)}
    assert set(table) == {"jepa", "jepa_probe", "composition_probe", "fingerprint", "chgnet", "random"}
    n = int(table["jepa"]["n"])
    assert 3 <= n <= 30 and all(int(r["n"]) == n for r in table.values())
    assert int(table["chgnet"]["scored"]) == 30  # CHGNet needs no reference crystal of the same chemistry
    for row in table.values():
        rho, low, high = float(row["spearman"]), float(row["ci_low"]), float(row["ci_high"])
        assert -1 <= low <= rho <= high <= 1, row
        assert f"| {row['ranker']} |" in printed
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("crystalfm-discovery-ranker-eval").experiment_id])
    assert run.data.metrics["jepa_spearman"] == pytest.approx(float(table["jepa"]["spearman"]))


def test_subsample_is_seeded_keeps_file_order_and_skips_nothing_when_large():
    from discovery.cli import subsample

    items = list(range(100))
    a, b = subsample(items, 10, seed=0), subsample(items, 10, seed=0)
    assert a == b == sorted(a) and len(set(a)) == 10
    assert subsample(items, 10, seed=1) != a
    assert subsample(items, None, 0) == items and subsample(items, 500, 0) == items
