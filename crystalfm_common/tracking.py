"""Which MLflow store a run logs to: the one rule every package uses."""
from __future__ import annotations

import os
from pathlib import Path


def resolve_tracking_uri(run_root: str | os.PathLike, configured: str | None = None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else a SQLite store `<run_root>/mlflow.db`
    (the folder is created so the store can be opened)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(run_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"
