"""One MLflow run per evaluation command, in the project's store (`crystalfm_common.tracking`): its
artifacts under the store's artifact root (`mlartifacts/` beside a SQLite store), as pretraining's and
fine-tuning's are, so the store folder can be moved or copied whole."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable


def log_evaluation(out: str | os.PathLike, experiment: str, run_name: str, params: dict, metrics: dict[str, float],
                   artifacts: Iterable[str | os.PathLike] = (), tracking_uri: str | None = None,
                   artifact_location: str | None = None) -> tuple[str, str]:
    """Log params, finite metrics and files; returns (tracking URI, run id). The process-global
    tracking URI is restored afterwards, so a caller's own runs are not redirected."""
    import mlflow

    from crystalfm_common.provenance import git_commit
    from crystalfm_common.tracking import ensure_experiment, open_client, resolve_tracking_uri

    uri = resolve_tracking_uri(out, tracking_uri)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = ensure_experiment(open_client(uri), experiment, uri, artifact_location)
        with mlflow.start_run(run_name=run_name, experiment_id=experiment_id) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in {**params, "git_commit": git_commit()}.items()})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))})
            for path in artifacts:
                if Path(path).is_file():
                    mlflow.log_artifact(str(path))
            return uri, run.info.run_id
    finally:
        mlflow.set_tracking_uri(previous)
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
