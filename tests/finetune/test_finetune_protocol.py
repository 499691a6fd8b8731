"""The fine-tune protocol: early stopping before the maximum epochs, learning rates chosen on
validation MAE by one grid (recorded in MLflow and the run's JSON), caps on validation only."""
from __future__ import annotations

import json
import math

import pytest

from finetune.config import FinetuneConfig, SweepConfig

TASK = "mp20_formation_energy_per_atom"


def _config(tiny_encoder, tmp_path, **changes) -> FinetuneConfig:
    fields = dict(task=TASK, encoder="scratch", encoder_config=dict(tiny_encoder), head_hidden=[16], batch_size=16,
                  out=str(tmp_path / "runs"), register=False)
    return FinetuneConfig.from_dict({**fields, **changes})


def test_early_stopping_stops_when_validation_stops_improving(tiny_encoder, tmp_path, mp20_task_data):
    from finetune.backbone import load_backbone
    from finetune.train import fit

    # lr 0: the weights never move, so validation MAE never improves after epoch 1.
    config = _config(tiny_encoder, tmp_path, lr=0.0, epochs=50, patience=3, weight_decay=0.0)
    result = fit(config, mp20_task_data, load_backbone("scratch", "scratch", encoder_config=tiny_encoder, seed=0),
                 progress=False)
    assert result.best_epoch == 1 and result.epochs_run == 4 and len(result.history) == 4
    assert not result.diverged
    assert len({round(h["val/mae"], 9) for h in result.history}) == 1


def test_protocol_defaults_train_to_convergence():
    config = FinetuneConfig.from_dict({"encoder": "scratch", "encoder_config": {"name": "matformer"}})
    assert config.epochs == 100 and config.patience == 15 and config.lr_select == "first_seed"
    assert config.max_eval is None and config.max_val is None  # whole splits unless capped


@pytest.mark.slow
def test_lr_grid_picks_the_best_validation_mae_and_records_it(tiny_encoder, tmp_path, mp20_task_data):
    from finetune.lr_select import selection_path
    from finetune.run import run_finetune
    from finetune.tracking import Tracker

    # 1e4 diverges (or lands far off); 3e-3 trains: the answer is known, and it is not the first candidate.
    grid = [1e4, 3e-3]
    config = _config(tiny_encoder, tmp_path, epochs=3, patience=2, lr_grid=grid, lr_select="first_seed",
                     lr_select_seed=0, seed=0)
    first = run_finetune(config, data=mp20_task_data, progress=False, verbose=False)
    tracker = Tracker(tmp_path / "runs")
    run = tracker.client.get_run(first.run_id)
    tags = run.data.tags
    assert tags["lr_selected"] == "0.003" and tags["lr_select"] == "first_seed" and tags["lr_select_seed"] == "0"
    assert json.loads(tags["lr_grid"]) == grid
    val_mae = json.loads(tags["lr_grid_val_mae"])
    assert val_mae["0.003"] is not None and (val_mae["10000"] is None or val_mae["10000"] > val_mae["0.003"])
    assert run.data.metrics["run/lr_selected"] == pytest.approx(3e-3)
    candidates = tracker.client.get_metric_history(first.run_id, "run/lr_candidate")
    assert sorted((m.step, m.value) for m in candidates) == [(0, 1e4), (1, 3e-3)]
    maes = {m.step: m.value for m in tracker.client.get_metric_history(first.run_id, "run/lr_candidate_val_mae")}
    assert maes[1] == pytest.approx(val_mae["0.003"])  # a diverged candidate has no finite value to log
    assert tracker.client.get_metric_history(first.run_id, "lr_grid/1/val/mae")  # each candidate's curve
    assert len(tracker.client.get_metric_history(first.run_id, "val/mae")) == first.result.epochs_run
    # the winner's fit is the run: its best validation MAE is the one recorded for 3e-3
    assert run.data.metrics["val/best_mae"] == pytest.approx(val_mae["0.003"])
    meta = json.loads(open(tracker.client.download_artifacts(first.run_id, "model/model.json")).read())
    assert meta["lr_selection"]["lr"] == 3e-3 and meta["lr_selection"]["grid"] == grid
    shared = json.loads(selection_path(config, TASK).read_text())
    assert shared["lr"] == 3e-3 and shared["seed"] == 0

    # another seed of the cell reads the choice and trains that rate only
    second = run_finetune(config.replace(seed=1), data=mp20_task_data, progress=False, verbose=False)
    tags2 = tracker.client.get_run(second.run_id).data.tags
    assert tags2["lr_selected"] == "0.003" and tags2["lr_selection_source"] == str(selection_path(config, TASK))
    assert not tracker.client.get_metric_history(second.run_id, "lr_grid/0/val/mae")
    assert len(tracker.client.get_metric_history(second.run_id, "val/mae")) == second.result.epochs_run


def test_choose_ignores_diverged_candidates_and_breaks_ties_to_the_first():
    from finetune.lr_select import choose

    assert choose([math.inf, 0.3, math.nan, 0.2]) == 3
    assert choose([0.2, 0.2]) == 0
    assert choose([math.inf, math.inf]) == 0


def test_lr_grid_and_explicit_encoder_lr_exclude_each_other():
    base = {"encoder": "scratch", "encoder_config": {"name": "matformer"}}
    with pytest.raises(ValueError, match="exclude each other"):
        FinetuneConfig.from_dict({**base, "lr_grid": [1e-3], "encoder_lr": 1e-4})
    with pytest.raises(ValueError, match="positive"):
        FinetuneConfig.from_dict({**base, "lr_grid": []})
    with pytest.raises(ValueError, match="lr_select"):
        FinetuneConfig.from_dict({**base, "lr_grid": [1e-3], "lr_select": "best"})
    assert FinetuneConfig.from_dict({**base, "lr_grid": ["3e-4", 1e-3]}).lr_grid == [3e-4, 1e-3]
    # the old explicit path still stands
    assert FinetuneConfig.from_dict({"encoder": "x", "lr": 1e-3, "encoder_lr": 3e-4}).encoder_lr == 3e-4


def test_sweep_lists_the_choosing_seed_first():
    from finetune.sweep import expand

    sweep = SweepConfig.from_dict({
        "tasks": [TASK], "encoders": ["scratch", "baseline"], "fractions": [0.1, 1.0], "seeds": [3, 4, 5],
        "train": {"encoder_config": {"name": "matformer"}, "lr_grid": [3e-4, 1e-3]},
    })
    runs = [r for r in expand(sweep) if r.mode == "scratch"]
    assert [r.seed for r in runs] == [3, 3, 4, 5, 4, 5]  # choosers first, then the rest in order
    assert {r.selection_seed for r in runs} == {3}


def test_max_val_caps_validation_only(shared_data):
    from finetune.data import load_task_data
    from finetune.tasks import get_task

    data = load_task_data(get_task("perov5_heat_ref"), root=shared_data, fraction=0.01, max_val=5, progress=False)
    assert len(data.val) == 5
    assert len(data.test) <= data.available["test"]
    assert len(data.test) >= data.available["test"] - len(data.rejects) > 5  # max_eval None: the whole split
