"""MLflow logging into a real local SQLite store, the registry alias, and the comparison table."""
from __future__ import annotations

import math

import pytest

from finetune.config import FinetuneConfig
from finetune.tracking import Tracker, experiment_name, registered_model_name


@pytest.mark.slow
def test_run_is_tagged_logged_and_registered(tmp_path, release_dir, mp20_task_data):
    from finetune.run import run_finetune

    out = tmp_path / "runs"
    config = FinetuneConfig.from_dict(dict(
        task="mp20_formation_energy_per_atom", encoder=str(release_dir), mode="full", fraction=0.5, seed=7,
        epochs=2, batch_size=16, head_hidden=[16], out=str(out),
    ))
    outcome = run_finetune(config, data=mp20_task_data, progress=False, verbose=False)
    tracker = Tracker(out)
    assert tracker.uri == f"sqlite:///{out.resolve() / 'mlflow.db'}"
    run = tracker.client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    experiment = tracker.client.get_experiment(run.info.experiment_id)
    assert experiment.name == experiment_name("mp20_formation_energy_per_atom")
    from pretrain.release import release_id

    tags = run.data.tags
    assert tags["encoder"] == release_id(release_dir) and tags["mode"] == "full"
    assert tags["fraction"] == "0.5" and tags["seed"] == "7"
    assert tags["pretrain_run_id"] == "pretrain-run-0123"  # linked to the pretraining run
    assert tags["unit"] == "eV/atom" and len(tags["crystalfm.git_commit"]) >= 7
    history = tracker.client.get_metric_history(outcome.run_id, "val/mae")
    assert [m.step for m in history] == [1, 2]  # one point per epoch
    assert run.data.metrics["test/mae"] == pytest.approx(outcome.result.test["mae"])
    # One name per series, grouped as MLflow's UI groups charts; the per-epoch names are the history's (#17).
    from crystalfm_common.metrics import group_of

    keys = set(run.data.metrics)
    assert all(group_of(k) in ("train", "val", "test", "throughput", "run") for k in keys), sorted(keys)
    per_epoch = {k for record in outcome.result.history for k in record}
    assert per_epoch <= keys and {"train/loss", "val/mae", "throughput/crystals_per_s"} <= per_epoch
    assert keys - per_epoch == set(outcome.meta["metrics"]["logged"]) | {
        "run/best_epoch", "run/epochs_run", "run/diverged", "run/n_train", "run/n_val", "run/n_test", "run/n_rejects",
        "throughput/train_seconds"}
    assert "val/best_mae" in outcome.meta["metrics"]["logged"]
    card = (out / "mlartifacts" / outcome.run_id / "artifacts" / "model" / "README.md").read_text()
    assert f"test/mae {outcome.result.test['mae']:.4g}" in card
    assert run.data.params["lr"] == str(config.lr)
    artifacts = {a.path for a in tracker.client.list_artifacts(outcome.run_id)}
    assert artifacts == {"model", "plots", "config", "data"}
    model_files = {a.path for a in tracker.client.list_artifacts(outcome.run_id, "model")}
    assert {"model/head.safetensors", "model/encoder.safetensors", "model/model.json"} <= model_files
    plots = {a.path for a in tracker.client.list_artifacts(outcome.run_id, "plots")}
    assert plots == {"plots/parity_test.png", "plots/learning_curve.png"}
    assert {a.path for a in tracker.client.list_artifacts(outcome.run_id, "config")} == {"config/config.yaml"}
    local = out / "mlartifacts" / outcome.run_id / "artifacts"  # beside the store: the folder holds everything
    assert (local / "plots" / "parity_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    version = tracker.client.get_model_version_by_alias(registered_model_name("mp20_formation_energy_per_atom"), "best")
    assert version.run_id == outcome.run_id and outcome.registered["changed"]

    # the registered model predicts from its URI, self-contained
    from data_pipeline.load.collate import collate
    from finetune.predict import load_models

    (loaded,) = load_models("models:/crystalfm-mp20_formation_energy_per_atom@best", tracker.uri)
    records = mp20_task_data.test[:4]
    predicted = loaded.model.predict(collate(records, loaded.views)).double().numpy()
    assert predicted == pytest.approx(outcome.result.test_predictions.y_pred[:4], abs=1e-5)


def _fake_study(tracker: Tracker, task: str, results: dict) -> None:
    """Runs logged through the real store the way run_finetune tags them (metrics given)."""
    for (encoder, mode, fraction), maes in results.items():
        for seed, mae in enumerate(maes):
            tracker.start(task, f"{encoder}-{mode}-{seed}", {
                "task": task, "unit": "eV", "encoder": encoder, "encoder_name": "pddformer", "mode": mode,
                "fraction": f"{fraction:g}", "seed": seed,
            }, {"seed": seed})
            tracker.log_metrics({"test/mae": mae, "test/rmse": 1.5 * mae, "test/r2": 0.5, "val/best_mae": mae})
            tracker.finish()


def test_comparison_table_from_mlflow(tmp_path):
    from finetune.compare import compare

    tracker = Tracker(tmp_path)
    _fake_study(tracker, "mp20_band_gap", {
        ("scratch", "scratch", 0.1): [1.0, 1.2, 1.1],
        ("abc123", "full", 0.1): [0.5, 0.7, 0.6],
        ("scratch", "scratch", 1.0): [0.4, 0.4],
        ("abc123", "full", 1.0): [0.3, 0.5],
        ("abc123", "frozen", 1.0): [0.8],
        ("baseline:magpie-hgb", "baseline", 0.1): [0.8, 0.8],
        ("baseline:train-mean", "baseline", 0.1): [2.0],
    })
    _fake_study(tracker, "perov5_heat_ref", {("scratch", "scratch", 1.0): [0.2]})
    table, paths = compare(tmp_path, tasks=["mp20_band_gap"])
    assert set(table["task"]) == {"mp20_band_gap"}
    row = table[(table["encoder"] == "abc123 (full)") & (table["fraction"] == 0.1)].iloc[0]
    assert row["n_seeds"] == 3 and row["mae_mean"] == pytest.approx(0.6) and row["mae_std"] == pytest.approx(0.1)
    assert row["gain_vs_scratch_pct"] == pytest.approx(100 * (1.1 - 0.6) / 1.1)
    full = table[(table["encoder"] == "abc123 (full)") & (table["fraction"] == 1.0)].iloc[0]
    assert full["gain_vs_scratch_pct"] == pytest.approx(0.0, abs=1e-9)
    frozen = table[table["encoder"] == "abc123 (frozen-mlp)"].iloc[0]
    assert frozen["gain_vs_scratch_pct"] == pytest.approx(-100.0) and math.isnan(frozen["mae_std"])
    assert table[table["encoder"] == "scratch"]["gain_vs_scratch_pct"].isna().all()
    # every row of a fraction with a baseline gets "vs baseline"; full and frozen stay separate rows
    assert row["gain_vs_baseline_pct"] == pytest.approx(100 * (0.8 - 0.6) / 0.8)
    scratch_01 = table[(table["encoder"] == "scratch") & (table["fraction"] == 0.1)].iloc[0]
    assert scratch_01["gain_vs_baseline_pct"] == pytest.approx(100 * (0.8 - 1.1) / 0.8)
    assert table[table["fraction"] == 1.0]["gain_vs_baseline_pct"].isna().all()  # no baseline at 1.0
    first = table[table["fraction"] == 0.1]["encoder"].tolist()[:3]
    assert first == ["baseline:train-mean", "baseline:magpie-hgb", "scratch"]
    assert paths["csv"].read_text().splitlines()[0].startswith("task,unit,encoder")
    markdown = paths["markdown"].read_text()
    assert "| mp20_band_gap | abc123 (full) | 0.1 | 3 | 0.6000 ± 0.1000 eV |" in markdown and "+45.5%" in markdown
    assert "vs baseline" in markdown and "+25.0%" in markdown
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    everything, _ = compare(tmp_path, save_dir=tmp_path / "all")
    assert set(everything["task"]) == {"mp20_band_gap", "perov5_heat_ref"}
