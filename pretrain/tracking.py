"""MLflow tracking for training runs: params, metrics, config, and the data the run was trained on.

Store: `tracking.tracking_uri` from config, else `$MLFLOW_TRACKING_URI` (a team server), else a
local SQLite file `sqlite:///<run root>/mlflow.db`; artifacts in `mlartifacts/` beside the database
(`crystalfm_common.tracking.artifact_root`)
(open it with `mlflow ui --backend-store-uri sqlite:///<run root>/mlflow.db`).

A requeued or resumed job continues the same MLflow run: its id is kept in `<run dir>/mlflow_run_id`.
Every run names its data: `mlflow.log_input` gets a dataset whose digest is the shard manifest's
sha256. Only rank 0 talks to MLflow; other ranks get a `NullTracker`.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

RUN_ID_FILE = "mlflow_run_id"


def artifact_location(run_root: str | os.PathLike) -> str:
    return (Path(run_root).resolve() / "mlartifacts").as_uri()


def experiment_artifact_location(tracking_uri: str, run_root: str | os.PathLike) -> str | None:
    """The common rule (`crystalfm_common.tracking.artifact_root`: mlartifacts/ beside a SQLite
    store, or $CRYSTALFM_ARTIFACT_ROOT); a non-file SQLite URI falls back to the run root."""
    from crystalfm_common.tracking import artifact_root

    location = artifact_root(tracking_uri)
    if location is None and tracking_uri.startswith("sqlite:"):
        location = artifact_location(run_root)
    return location


def manifest_sha256(shard_dir: str | os.PathLike | None) -> str | None:
    """The shard set's digest (`data_pipeline.manifest.manifest_digest`); None without a shard set."""
    if not shard_dir:
        return None
    from data_pipeline.manifest import manifest_digest

    return manifest_digest(shard_dir)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} → {"a.b": "1"} (MLflow params are flat strings, ≤ 6000 chars)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return {k: v[:6000] for k, v in out.items()}


class NullTracker:
    run_id: str | None = None
    tracking_uri: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(NullTracker):
    """One MLflow run per training run directory, continued across restarts."""

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str, run_dir: Path, run_root: Path):
        import mlflow

        self._mlflow = mlflow
        self.tracking_uri = tracking_uri
        from crystalfm_common.tracking import open_client, point_mlflow_at

        client = open_client(tracking_uri)  # first: a new store is created under a lock
        # The fluent API below needs the global URI while the run is open; `finish` puts it back, so a
        # Trainer used as a library does not leave later commands of the process pointed at this store.
        self._restore_uri = point_mlflow_at(tracking_uri)
        try:
            self._start(client, experiment, run_name, run_dir, run_root)
        except BaseException:
            self._restore_uri()
            raise

    def _start(self, client, experiment: str, run_name: str, run_dir: Path, run_root: Path) -> None:
        mlflow, tracking_uri = self._mlflow, self.tracking_uri
        found = client.get_experiment_by_name(experiment)
        if found is None:
            location = experiment_artifact_location(tracking_uri, run_root)
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = found.experiment_id
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id is not None:
            try:
                client.get_run(run_id)
            except Exception:  # the store was moved or wiped: start a new run rather than fail training
                run_id = None
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id, run_name=run_name)
        self.run_id = run.info.run_id
        self.resumed = run_id is not None
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id)

    def log_config(self, config: dict, config_path: Path) -> None:
        if not self.resumed:  # params are immutable in MLflow: log them once per run
            self._mlflow.log_params(flatten(config))
        self._mlflow.log_artifact(str(config_path))

    def log_dataset(self, shard_dir: str, digest: str | None, context: str = "training") -> None:
        """`mlflow.log_input` with a dataset whose digest is the shard manifest sha256."""
        if not shard_dir or digest is None:
            return
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(shard_dir).resolve()))
        dataset = MetaDataset(source=source, name=Path(shard_dir).name, digest=digest[:36])
        self._mlflow.log_input(dataset, context=context, tags={"manifest_sha256": digest})
        self._mlflow.set_tag("data.manifest_sha256", digest)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # Names as in metrics.jsonl and the model card: MLflow's UI groups charts by the part before "/".
        clean = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | os.PathLike) -> None:
        self._mlflow.log_artifact(str(path))

    def finish(self, status: str = "FINISHED") -> None:
        try:
            self._mlflow.end_run(status=status)
        finally:
            self._restore_uri()


def _is_number(value) -> bool:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return False
    return value == value and abs(value) != float("inf")
