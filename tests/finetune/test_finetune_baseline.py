"""The composition baseline arm: real MP-20 rows, a real MLflow store, the same subset as the neural
runs, and its rows in the comparison."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from finetune.cli import main
from finetune.tracking import Tracker, registered_model_name

TASK = "mp20_formation_energy_per_atom"


def _artifact(tracker: Tracker, run_id: str, path: str):
    return tracker.client.download_artifacts(run_id, path)


@pytest.mark.slow
def test_baseline_is_tracked_uses_the_neural_subset_and_is_compared(shared_data, tmp_path, tiny_encoder, capsys):
    out = str(tmp_path / "runs")
    common = ["--out", out, "--data-root", str(shared_data), "--max-eval", "40"]
    # A neural run (tiny scratch encoder, 1 epoch) and the baseline on the same task, fraction, seed.
    assert main(["train", TASK, "--encoder", "scratch", "--encoder-config", json.dumps(tiny_encoder), "--fraction",
                 "0.05", "--seed", "1", "--epochs", "1", "--batch-size", "16", *common]) == 0
    assert main(["baseline", TASK, "--fractions", "0.05", "--seeds", "1", "2", *common]) == 0
    capsys.readouterr()

    tracker = Tracker(tmp_path / "runs")
    runs = tracker.client.search_runs([tracker.experiment_id(TASK)])
    by_cell = {(r.data.tags["encoder"], r.data.tags["seed"]): r for r in runs}
    assert set(by_cell) == {("scratch", "1"), ("baseline:magpie-hgb", "1"), ("baseline:magpie-hgb", "2"),
                            ("baseline:train-mean", "1"), ("baseline:train-mean", "2")}
    hgb = by_cell[("baseline:magpie-hgb", "1")]
    assert hgb.info.status == "FINISHED"
    tags = hgb.data.tags
    assert tags["mode"] == "baseline" and tags["fraction"] == "0.05" and tags["crystalfm.kind"] == "baseline"
    assert tags["task"] == TASK and tags["unit"] == "eV/atom"
    metrics = hgb.data.metrics
    assert {"test/mae", "test/rmse", "test/r2", "val/best_mae", "run/n_iter"} <= set(metrics)
    assert metrics["run/n_train"] == math.ceil(0.05 * 1847) and metrics["run/n_test"] == 40
    assert hgb.data.params["hgb.random_state"] == "1" and hgb.data.params["features.preset"] == "magpie"

    # the training subset is the neural run's, id for id; another seed draws another one
    neural_keys = open(_artifact(tracker, by_cell[("scratch", "1")].info.run_id, "data/train_keys.txt")).read().split()
    baseline_keys = open(_artifact(tracker, hgb.info.run_id, "data/train_keys.txt")).read().split()
    other_seed = open(_artifact(tracker, by_cell[("baseline:magpie-hgb", "2")].info.run_id,
                                "data/train_keys.txt")).read().split()
    assert baseline_keys == neural_keys and len(baseline_keys) == 93
    assert set(other_seed) != set(baseline_keys)

    # predictions CSV and parity plot; test MAE recomputed from the CSV
    rows = list(csv.DictReader(open(_artifact(tracker, hgb.info.run_id, "data/test_predictions.csv"))))
    assert len(rows) == 40
    err = [abs(float(r["formation_energy_per_atom_pred"]) - float(r["formation_energy_per_atom_true"])) for r in rows]
    assert np.mean(err) == pytest.approx(metrics["test/mae"])
    assert open(_artifact(tracker, hgb.info.run_id, "plots/parity_test.png"), "rb").read(4) == b"\x89PNG"
    mean_run = by_cell[("baseline:train-mean", "1")]
    preds = {r["formation_energy_per_atom_pred"] for r in csv.DictReader(open(_artifact(tracker, mean_run.info.run_id,
                                                                     "data/test_predictions.csv")))}
    assert len(preds) == 1  # one constant: the training mean

    # features cached per task under the output dir, keyed by reduced composition
    with np.load(tmp_path / "runs" / "baseline_cache" / TASK / "magpie.npz") as cache:
        assert cache["features"].shape[1] == 132 and len(cache["keys"]) >= 93

    # the registry never points at a baseline (it has no model directory)
    best = tracker.client.get_model_version_by_alias(registered_model_name(TASK), "best")
    assert best.run_id == by_cell[("scratch", "1")].info.run_id

    # compare: baseline rows, the train-mean row, and "vs baseline" on every other row
    assert main(["compare", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "vs baseline" in printed and "| baseline:magpie-hgb |" in printed and "| baseline:train-mean |" in printed
    table = list(csv.DictReader(open(tmp_path / "runs" / "comparison" / "comparison.csv")))
    row = {r["encoder"]: r for r in table}
    reference = float(row["baseline:magpie-hgb"]["mae_mean"])
    scratch = float(row["scratch"]["mae_mean"])
    assert float(row["scratch"]["gain_vs_baseline_pct"]) == pytest.approx(100 * (reference - scratch) / reference)
    assert row["baseline:magpie-hgb"]["gain_vs_baseline_pct"] == ""  # NaN: itself
    assert row["baseline:magpie-hgb"]["n_seeds"] == "2"
    assert [r["encoder"] for r in table][:3] == ["baseline:train-mean", "baseline:magpie-hgb", "scratch"]


def test_sweep_expands_baseline_once_per_cell(tmp_path):
    from finetune.config import SweepConfig
    from finetune.sweep import expand

    sweep = SweepConfig.from_dict({
        "tasks": [TASK], "encoders": ["baseline", "scratch"], "modes": ["full", "frozen"], "fractions": [0.1, 1.0],
        "seeds": [0, 1], "train": {"encoder_config": {"name": "matformer"}},
    })
    runs = expand(sweep)
    baseline = [r for r in runs if r.mode == "baseline"]
    assert [(r.encoder, r.fraction, r.seed) for r in baseline] == [
        ("baseline", 0.1, 0), ("baseline", 0.1, 1), ("baseline", 1.0, 0), ("baseline", 1.0, 1)]
    assert len(runs) == 8


def test_composition_key_is_the_reduced_formula():
    from finetune.baseline import composition_key

    assert composition_key([26, 26, 26, 26, 8, 8, 8, 8, 8, 8]) == composition_key([8, 26, 8, 26, 8])
    assert composition_key([26, 8]) != composition_key([26, 8, 8])
