"""One fine-tune run end to end: config → data → encoder → fit → model dir → MLflow.

    run_finetune(config) -> RunOutcome
        1. print and keep the resolved config (with the git commit)
        2. load the task's split (fraction and seed applied before parsing)
        3. load the encoder copy (release, frozen release, or same architecture from scratch)
        4. open an MLflow run tagged with encoder / mode / fraction / seed (+ pretraining run)
        5. fit, logging every epoch
        6. write the self-contained model dir, the parity and learning-curve plots, the config,
           the test predictions and the split summary; log them; register the task's best run
A failure marks the MLflow run FAILED and re-raises.
"""
from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from finetune.backbone import Backbone, load_backbone, views_dict
from finetune.config import FinetuneConfig
from finetune.data import TaskData, load_task_data, write_split_files
from finetune.model_dir import save_model_dir
from finetune.plots import learning_curve_plot, parity_plot
from finetune.tasks import get_task
from finetune.train import FitResult, fit
from crystalfm_common.metrics import grouped, metric_name
from crystalfm_common.provenance import git_commit
from finetune.tracking import Tracker, data_counts, summary_metrics


@dataclass
class RunOutcome:
    result: FitResult
    meta: dict
    run_id: str | None = None
    model_uri: str | None = None  # where the model dir lives (MLflow artifact URI or local path)
    registered: dict | None = None


def run_name(config: FinetuneConfig, encoder_label: str) -> str:
    return f"{encoder_label}-{config.mode}-f{config.fraction:g}-s{config.seed}"


def run_finetune(
    config: FinetuneConfig,
    *,
    data: TaskData | None = None,
    tracking: bool = True,
    save_to: str | Path | None = None,
    progress: bool = True,
    verbose: bool = True,
    show_config: bool = False,
) -> RunOutcome:
    task = get_task(config.task, target_name=config.target_name, unit=config.unit)
    resolved = {**config.to_dict(), "task_spec": task.to_dict(), "git_commit": git_commit()}
    if config.lr_grid:
        resolved["lr"] = "chosen from lr_grid (tag lr_selected)"  # the config's lr is not used
    if show_config:  # always written beside the outputs and logged to MLflow (config/config.yaml)
        print(f"[finetune] config:\n{json.dumps(resolved, indent=2, default=str)}", flush=True)
    if data is None:
        data = load_task_data(
            task, root=config.data_root, fraction=config.fraction, seed=config.seed,
            max_train=config.max_train, max_eval=config.max_eval, max_val=config.max_val, progress=progress,
        )
    if verbose:
        print(f"[finetune] data: {json.dumps(data.summary())}", flush=True)
    backbone = load_backbone(config.encoder, config.mode, encoder_config=config.encoder_config, seed=config.seed)
    name = run_name(config, backbone.label)

    tracker = Tracker(config.out, config.tracking_uri, config.artifact_root) if tracking else None
    if tracker is not None:
        tracker.start(task.name, name, _tags(config, task, backbone), resolved)
    try:
        log = (lambda metrics, step: tracker.log_metrics(metrics, step=step)) if tracker else None
        selection = None
        if config.lr_grid:
            from finetune.lr_select import fit_with_lr_grid

            result, selection = fit_with_lr_grid(config, data, backbone, log=log, progress=progress)
            if tracker is not None:
                tracker.set_tags(selection.tags())
                tracker.log_metrics({metric_name("run", "lr_selected"): selection.lr})
                for index, mae in enumerate(selection.val_mae):
                    tracker.log_metrics({metric_name("run", "lr_candidate"): selection.grid[index],
                                         metric_name("run", "lr_candidate_val_mae"): mae}, step=index)
                if selection.source == "this run" and selection.seed == config.seed:
                    for epoch, metrics in enumerate(result.history, start=1):  # the winner's curve, as the run's
                        tracker.log_metrics(metrics, step=epoch)
        else:
            on_epoch = (lambda epoch, metrics: log(metrics, epoch)) if log else None
            result = fit(config, data, backbone, on_epoch=on_epoch, progress=progress)
        meta = _model_meta(config, task, backbone, result, data)
        if selection is not None:
            meta["lr_selection"] = selection.to_dict()
            resolved["lr_selection"] = selection.to_dict()
        outcome = RunOutcome(result, meta, run_id=tracker.run_id if tracker else None)
        with tempfile.TemporaryDirectory(prefix="crystalfm-finetune-") as tmp:
            artifacts = _write_artifacts(Path(tmp), config, task, name, result, meta, data, resolved)
            if save_to is not None or tracker is None:
                target = Path(save_to) if save_to is not None else Path(config.out) / "models" / task.name / name
                save_model_dir(result.model, target, meta)
                outcome.model_uri = str(target.resolve())
            if tracker is not None:
                summary = {  # once per run (crystalfm_common/metrics.py); the card shows the val/ and test/ ones
                    **grouped("run", {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                                      "diverged": float(result.diverged), **data_counts(data)}),
                    metric_name("throughput", "train_seconds"): result.train_seconds,
                    **summary_metrics(result.val, result.test),
                }
                tracker.log_metrics(summary, step=result.best_epoch)
                for sub, directory in artifacts.items():
                    tracker.log_artifacts(directory, sub)
                if outcome.model_uri is None:
                    outcome.model_uri = tracker.artifact_uri("model")
        if tracker is not None:
            tracker.finish("FINISHED")
            if config.register:
                outcome.registered = tracker.register_best(task.name)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    if verbose and selection is not None:
        print(f"[finetune] lr grid {selection.grid}: val MAE {[round(m, 5) for m in selection.val_mae]} "
              f"(seed {selection.seed}, {selection.source}) → lr {selection.lr:g}", flush=True)
    if verbose:
        print(
            f"[finetune] {task.name} {name}: best epoch {result.best_epoch} of {result.epochs_run}, val {_fmt(result.val)}, "
            f"test {_fmt(result.test)} ({task.unit}); model: {outcome.model_uri}",
            flush=True,
        )
    return outcome


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k.upper()} {v:.4g}" for k, v in metrics.items() if k != "count") or "-"


def _tags(config: FinetuneConfig, task, backbone: Backbone) -> dict:
    return {
        "task": task.name,
        "target": task.target,
        "unit": task.unit,
        "encoder": backbone.label,
        "encoder_name": backbone.info.get("encoder_name"),
        "mode": config.mode,
        "probe": config.probe if config.mode == "frozen" else None,
        "head_init": config.head_init,
        "fraction": f"{config.fraction:g}",
        "seed": config.seed,
        "release_dir": backbone.info.get("release_dir"),
        "release_id": backbone.info.get("release_id"),
        "pretrain_objective": backbone.info.get("objective"),
        "pretrain_run_id": backbone.info.get("pretrain_mlflow_run_id"),
        "crystalfm.kind": "finetune",
        "crystalfm.config_sha": config.fingerprint(),
    }


def _model_meta(config: FinetuneConfig, task, backbone: Backbone, result: FitResult, data: TaskData) -> dict:
    return {
        "task": task.to_dict(),
        "encoder_spec": backbone.spec,
        "encoder_label": backbone.label,
        "encoder_info": backbone.info,
        "views": views_dict(backbone.encoder),
        "head": {"readout": config.readout, "hidden": list(config.head_layers), "dropout": config.dropout,
                 "prior_hidden": None if result.model.head.prior is None else int(result.model.head.prior[0].out_features)},
        "mode": config.mode,
        "fraction": config.fraction,
        "seed": config.seed,
        "data": data.summary(),
        "metrics": {"val": result.val, "test": result.test, "best_epoch": result.best_epoch,
                    "epochs_run": result.epochs_run, "logged": summary_metrics(result.val, result.test)},
        "git_commit": git_commit(),
    }


def _write_artifacts(tmp: Path, config, task, name, result: FitResult, meta, data: TaskData, resolved) -> dict[str, Path]:
    """Artifact folders → their MLflow artifact paths: model/, plots/, config/, data/."""
    dirs = {sub: tmp / sub for sub in ("plots", "config", "data")}
    for directory in dirs.values():
        directory.mkdir()
    save_model_dir(result.model, tmp / "model", meta)
    title = f"{task.name}: {name}"
    learning_curve_plot(result.history, dirs["plots"] / "learning_curve.png", title=title, unit=task.unit)
    predictions = result.test_predictions
    if predictions is not None:
        parity_plot(predictions.y_true, predictions.y_pred, dirs["plots"] / "parity_test.png", title=title,
                    unit=task.unit, metrics=result.test)
        with open(dirs["data"] / "test_predictions.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["key", f"{task.target}_true", f"{task.target}_pred"])
            writer.writerows(zip(predictions.keys, predictions.y_true.tolist(), predictions.y_pred.tolist()))
    import yaml

    (dirs["config"] / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(resolved, default=str)), sort_keys=False))
    write_split_files(dirs["data"], task, data)  # split summary, training keys, rejects
    return {"model": tmp / "model", **dirs}
