"""Properties of new crystals from fine-tuned models.

    MODEL   a model directory (model.json + safetensors), a folder of model directories (one
            property each: every property is predicted), or an MLflow URI
            (`models:/crystalfm-<task>@best`, `runs:/<run id>/model`) downloaded first
    PATH... CIF / POSCAR files, folders or archives of them

Stages: entries (structures.py) → parse + validate per chunk → collate with each model's views →
predict in physical units. A file that cannot be read or parsed becomes an error row (file and
reason) and the rest are still predicted.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from crystalfm_common.tracking import local_artifact_path
from data_pipeline.load.collate import collate
from data_pipeline.build.readers import RecordError, Reject
from finetune.model_dir import META, LoadedModel, load_model
from finetune.structures import iter_structure_entries


@dataclass
class PredictionTable:
    columns: list[str]  # one per model: "<target> (<unit>)"
    rows: list[dict] = field(default_factory=list)  # file, key, formula, num_atoms, <columns>
    errors: list[dict] = field(default_factory=list)  # file, reason

    def to_csv(self, handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=["file", "key", "formula", "num_atoms", *self.columns])
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def to_text(self) -> str:
        header = ["file", "formula", "num_atoms", *self.columns]
        body = [[str(r["file"]), r["formula"], str(r["num_atoms"]), *(f"{r[c]:.4f}" for c in self.columns)] for r in self.rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
        return "\n".join(lines)

    def to_csv_string(self) -> str:
        buffer = io.StringIO()
        self.to_csv(buffer)
        return buffer.getvalue()


def resolve_models(model: str, tracking_uri: str | None = None) -> list[Path]:
    """Local model directories for a MODEL argument (see module docstring)."""
    if model.startswith(("models:/", "runs:/")):
        return resolve_models(str(_download(model, tracking_uri)))
    path = Path(model).expanduser()
    if (path / META).is_file():
        return [path]
    if path.is_dir():
        found = sorted(p.parent for p in path.glob(f"*/{META}"))
        if found:
            return found
    raise FileNotFoundError(
        f"{model} is not a fine-tuned model: expected a directory with {META}, a folder of such directories, "
        f"or an MLflow URI like models:/crystalfm-<task>@best"
    )


def _download(uri: str, tracking_uri: str | None) -> Path:
    """An MLflow model-registry or run URI → a local copy of the model directory. The registry is
    the tracking store itself (as `finetune.tracking` registers models)."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    store = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if store is None:
        raise ValueError(f"{uri}: give --tracking-uri (e.g. sqlite:///finetune_runs/mlflow.db) or set MLFLOW_TRACKING_URI")
    if uri.startswith("models:/"):
        name, _, rest = uri[len("models:/"):].partition("@")
        client = MlflowClient(tracking_uri=store, registry_uri=store)
        if rest:
            version = client.get_model_version_by_alias(name, rest)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
        uri = version.source
    elif uri.startswith("runs:/"):
        run_id, _, sub = uri[len("runs:/"):].partition("/")
        run_uri = MlflowClient(tracking_uri=store).get_run(run_id).info.artifact_uri
        uri = f"{run_uri}/{sub}" if sub else run_uri
    local = local_artifact_path(uri, store)  # a local store may have been moved since it recorded uri
    if local is not None:
        return local
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=store))


def load_models(model: str, tracking_uri: str | None = None, device: str = "cpu") -> list[LoadedModel]:
    models = [load_model(p) for p in resolve_models(model, tracking_uri)]
    for loaded in models:
        loaded.model.to(device)
    return models


def column_name(loaded: LoadedModel) -> str:
    return f"{loaded.target} ({loaded.unit})" if loaded.unit else loaded.target


def predict_paths(
    models: Sequence[LoadedModel], paths: Iterable[str | Path], *, batch_size: int = 64, device: str = "cpu",
    progress: bool = False,
) -> PredictionTable:
    from data_pipeline.build.validate import validate

    table = PredictionTable(columns=[column_name(m) for m in models])
    chunk: list[tuple] = []

    def flush():
        if chunk:
            _predict_chunk(models, chunk, table, device)
            chunk.clear()

    entries = iter_structure_entries(paths)
    if progress:
        from tqdm import tqdm

        entries = tqdm(entries, desc="predict", unit="file")
    for item in entries:
        if isinstance(item, Reject):
            table.errors.append({"file": item.location, "reason": item.reason})
            continue
        reader, entry = item
        try:
            record = reader.parse(entry)
            validate(record)
        except (RecordError, ValueError) as error:
            table.errors.append({"file": entry.location, "reason": str(error)})
            continue
        chunk.append((entry.location, record))
        if len(chunk) >= batch_size:
            flush()
    flush()
    return table


@torch.no_grad()
def _predict_chunk(models: Sequence[LoadedModel], chunk: list[tuple], table: PredictionTable, device) -> None:
    records = [record for _, record in chunk]
    columns: dict[str, list[float]] = {}
    by_views: dict = {}
    for loaded in models:  # models that need the same views share one collated batch
        if loaded.views not in by_views:
            by_views[loaded.views] = collate(records, loaded.views).to(device)
        columns[column_name(loaded)] = loaded.model.predict(by_views[loaded.views]).double().cpu().tolist()
    for i, (location, record) in enumerate(chunk):
        row = {"file": location, "key": record.key, "formula": _formula(record), "num_atoms": record.num_atoms}
        row.update({name: values[i] if math.isfinite(values[i]) else float("nan") for name, values in columns.items()})
        table.rows.append(row)


def _formula(record) -> str:
    from pymatgen.core import Composition, Element

    counts: dict[str, int] = {}
    for z in record.atomic_numbers.tolist():
        symbol = Element.from_Z(int(z)).symbol
        counts[symbol] = counts.get(symbol, 0) + 1
    return Composition(counts).reduced_formula
