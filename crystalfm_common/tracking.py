"""Which MLflow store a run logs to, and where its artifacts live: the one rule every package uses.

A local store is a folder: `<folder>/mlflow.db` (SQLite) and `<folder>/mlartifacts/` (every
experiment's artifacts, whichever stage made it). MLflow records artifact locations as absolute
URIs, so `local_artifact_path` re-roots them when the folder has been moved or copied.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

ARTIFACT_DIR = "mlartifacts"
ARTIFACT_ROOT_ENV = "CRYSTALFM_ARTIFACT_ROOT"


def resolve_tracking_uri(run_root: str | os.PathLike, configured: str | None = None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else a SQLite store `<run_root>/mlflow.db`
    (the folder is created so the store can be opened)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(run_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def point_mlflow_at(uri: str):
    """Point MLflow's process-global tracking URI at `uri` (fluent `mlflow.start_run`/`log_*` use it)
    and return a function that puts it back as it was.

    `mlflow.set_tracking_uri` is process-global and also exports $MLFLOW_TRACKING_URI, which
    `resolve_tracking_uri` prefers over a run root: left set, it would send every later command of the
    same process (an evaluation, a second training run, a notebook cell) into this store. The
    restore function is idempotent."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    done = False

    def restore() -> None:
        nonlocal done
        if done:
            return
        done = True
        mlflow.set_tracking_uri(previous)  # None clears mlflow's global and the exported variable
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)

    return restore


def sqlite_folder(tracking_uri: str) -> Path | None:
    """The folder holding a `sqlite:///...` store's database file; None for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve().parent


def artifact_root(tracking_uri: str, configured: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: `configured`, else $CRYSTALFM_ARTIFACT_ROOT, else
    `<store folder>/mlartifacts` for a SQLite store; None lets a tracking server decide."""
    chosen = configured or os.environ.get(ARTIFACT_ROOT_ENV)
    if chosen:
        return chosen if "://" in chosen else Path(chosen).expanduser().resolve().as_uri()
    folder = sqlite_folder(tracking_uri)
    return (folder / ARTIFACT_DIR).as_uri() if folder is not None else None


def local_artifact_path(artifact_uri: str, tracking_uri: str) -> Path | None:
    """A local file artifact as a path: as recorded when it exists, else re-rooted under the store's
    own `mlartifacts/` (the store folder was moved); None when it is not a local file URI."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme not in ("file", ""):
        return None
    path = Path(unquote(parsed.path))
    if path.exists():
        return path
    folder = sqlite_folder(tracking_uri)
    if folder is not None and ARTIFACT_DIR in path.parts:
        last = len(path.parts) - 1 - path.parts[::-1].index(ARTIFACT_DIR)
        moved = folder.joinpath(ARTIFACT_DIR, *path.parts[last + 1:])
        if moved.exists():
            return moved
    raise FileNotFoundError(
        f"artifact {artifact_uri} is not on this machine (nor under {folder / ARTIFACT_DIR if folder else 'the store'}); "
        "was the store copied without its mlartifacts/ folder?"
    )


def open_client(tracking_uri: str):
    """An `MlflowClient` (tracking and registry on `tracking_uri`) whose store is already created.

    A new SQLite store is created by running MLflow's schema migrations; two processes that open
    the same new store at once (parallel runs, Ray workers) race in them and one fails with
    "No such constraint: 'uq_registered_models_name'". The first open therefore runs under an
    exclusive lock on `<db>.lock` beside the database; other stores are opened as they are."""
    from mlflow.tracking import MlflowClient

    folder = sqlite_folder(tracking_uri)
    if folder is None:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    database = Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve()
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:  # the client may create its stores eagerly; both migrate the one database
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def ensure_experiment(client, name: str, tracking_uri: str, configured: str | None = None, tags: dict | None = None) -> str:
    """The id of experiment `name`, created with its artifacts under `artifact_root(...)` when new, so
    no run of it writes to MLflow's default `./mlruns` of the working directory. An experiment that
    already exists keeps the location it was made with. Safe when another process creates it first."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(tracking_uri, configured), tags=tags)
    except Exception:  # created concurrently (Ray workers, parallel sweeps)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id
