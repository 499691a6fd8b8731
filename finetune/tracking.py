"""MLflow tracking of fine-tune runs: one experiment per task, tagged runs, the registry alias.

Store: `--tracking-uri`, else $MLFLOW_TRACKING_URI, else a local SQLite store
`sqlite:///<out>/mlflow.db`. Artifacts: `--artifact-root`, else $CRYSTALFM_ARTIFACT_ROOT, else
`mlartifacts/` beside a SQLite store's database (`crystalfm_common.tracking.artifact_root`), so
a store folder holds everything its registry points at (browse with
`mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db`).

Every run carries the tags the comparison groups by (`TAGS`): task, encoder (release id or
"scratch"), mode, fraction, seed; plus the pretraining MLflow run id when the release records
one. The best run of a task (lowest best-epoch validation MAE — never chosen on test) is
registered as model `crystalfm-<task>` with alias `best`.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from crystalfm_common.metrics import grouped, metric_name
from crystalfm_common.provenance import git_commit
from crystalfm_common.tracking import artifact_root, resolve_tracking_uri

EXPERIMENT_PREFIX = "finetune/"
MODEL_PREFIX = "crystalfm-"
BEST_ALIAS = "best"
SELECT_METRIC = metric_name("val", "best_mae")  # crystalfm_common/metrics.py
TAGS = ("task", "target", "unit", "encoder", "encoder_name", "mode", "fraction", "seed")


def experiment_name(task: str) -> str:
    return f"{EXPERIMENT_PREFIX}{task}"


def registered_model_name(task: str) -> str:
    return f"{MODEL_PREFIX}{task}"


def data_counts(data) -> dict[str, int]:
    return {"n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test), "n_rejects": len(data.rejects)}


def summary_metrics(val: dict, test: dict) -> dict[str, float]:
    """The best epoch's validation numbers (val/best_mae, the registry's choice) and test/ ones,
    as MLflow, model.json ("logged") and the model card name them."""
    return {**grouped("val", val, prefix="best_", skip=("count",)), **grouped("test", test, skip=("count",))}


class Tracker:
    """A thin layer over `MlflowClient` (explicit client, no global active run: safe in Ray workers)."""

    def __init__(self, out: str | os.PathLike = "finetune_runs", tracking_uri: str | None = None,
                 artifact_location: str | None = None):
        from crystalfm_common.tracking import open_client

        self.out = Path(out).expanduser().resolve()
        self.uri = resolve_tracking_uri(self.out, tracking_uri)
        self.artifact_location = artifact_root(self.uri, artifact_location)
        self.client = open_client(self.uri)
        self.run_id: str | None = None

    # ------------------------------------------------------------------ experiments and runs
    def experiment_id(self, task: str) -> str:
        name = experiment_name(task)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.artifact_location,
                                                 tags={"crystalfm.task": task})
        except Exception:  # another worker created it first
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def finished_fingerprints(self, task: str) -> set[str]:
        """`crystalfm.config_sha` of every FINISHED run of the task's experiment (FinetuneConfig.fingerprint)."""
        experiment = self.client.get_experiment_by_name(experiment_name(task))
        if experiment is None:
            return set()
        found, token = set(), None
        while True:
            page = self.client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                           max_results=1000, page_token=token)
            found.update(r.data.tags["crystalfm.config_sha"] for r in page if "crystalfm.config_sha" in r.data.tags)
            token = page.token
            if not token:
                return found

    def start(self, task: str, run_name: str, tags: dict, params: dict) -> str:
        run = self.client.create_run(
            self.experiment_id(task),
            run_name=run_name,
            tags={**{k: str(v) for k, v in tags.items() if v is not None}, "crystalfm.git_commit": git_commit() or "unknown"},
        )
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        flat = _flatten(params)
        for i in range(0, len(flat), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in list(flat.items())[i : i + 100]])
        return self.run_id

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def artifact_uri(self, sub: str = "") -> str:
        uri = self.client.get_run(self.run_id).info.artifact_uri
        return f"{uri}/{sub}" if sub else uri

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    # ------------------------------------------------------------------ registry
    def register_best(self, task: str, artifact_path: str = "model") -> dict | None:
        """Point alias `best` of model `crystalfm-<task>` at the finished run with the lowest
        validation MAE; a new version is created only when the best run changed."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(experiment_name(task))
        if experiment is None:
            return None
        runs = self.client.search_runs(
            [experiment.experiment_id],
            # Only neural runs have a model directory to register (baseline runs have kind "baseline").
            filter_string="attributes.status = 'FINISHED' and tags.`crystalfm.kind` = 'finetune'",
            order_by=[f"metrics.`{SELECT_METRIC}` ASC"],
            max_results=1,
        )
        if not runs or SELECT_METRIC not in runs[0].data.metrics:
            return None
        best = runs[0]
        name = registered_model_name(task)
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(name, description=f"best crystalfm fine-tuned model for {task}")
            except MlflowException:
                pass  # created concurrently
        try:
            current = self.client.get_model_version_by_alias(name, BEST_ALIAS)
            if current.run_id == best.info.run_id:
                return {"name": name, "version": current.version, "run_id": best.info.run_id, "changed": False}
        except MlflowException:
            pass
        version = self.client.create_model_version(
            name, source=f"{best.info.artifact_uri}/{artifact_path}", run_id=best.info.run_id,
            tags={k: best.data.tags.get(k, "") for k in TAGS},
        )
        self.client.set_registered_model_alias(name, BEST_ALIAS, version.version)
        return {"name": name, "version": version.version, "run_id": best.info.run_id, "changed": True}


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
