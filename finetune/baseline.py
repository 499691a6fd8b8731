"""The composition baseline: what a model that never sees a structure gets on the same task.

    run_baseline(config) -> [BaselineOutcome, ...]     one MLflow run per baseline model:
        baseline:magpie-hgb   Magpie element-property statistics of the composition (matminer's
                              `ElementProperty.from_preset("magpie")`, 132 features; its element
                              tables ship inside the package: nothing is downloaded) fed to
                              scikit-learn's HistGradientBoostingRegressor with fixed
                              hyper-parameters (`HGB_PARAMS`), early-stopped on the task's
                              validation split, seeded
        baseline:train-mean   every crystal predicted as the training-label mean (anchors R² at 0)

Data come from `finetune.data.load_task_data` with the run's task, fraction, seed and caps, so the
training subset is the very set of ids a neural run with that seed trains on, and validation and
test are the same crystals (rejects too). Runs are tagged like neural runs (task, encoder label,
mode `baseline`, fraction, seed; `crystalfm.kind = baseline`) so `compare` puts them in every table;
they are never registered as the task's `@best` model (there is no model directory to predict with).

Features are cached per task in `<out>/baseline_cache/<task>/magpie.npz`, keyed by the reduced
composition (the features depend on nothing else), and extended as new compositions appear.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystalfm_common.metrics import grouped, metric_name
from finetune.config import BASELINE, FinetuneConfig
from finetune.data import TaskData, load_task_data, write_split_files
from finetune.tasks import get_task
from finetune.tracking import Tracker, data_counts, git_commit, summary_metrics

MAGPIE_HGB = "baseline:magpie-hgb"
TRAIN_MEAN = "baseline:train-mean"
MODELS = (MAGPIE_HGB, TRAIN_MEAN)
FEATURIZER = {"library": "matminer", "featurizer": "ElementProperty", "preset": "magpie", "impute_nan": True}
# Fixed, not tuned per task: a small learning rate with many rounds, stopped by the task's own
# validation split (50 rounds without improvement of the validation loss); leaves of ≥10 crystals
# keep 10%-label runs (a few hundred crystals) from fitting single rows.
HGB_PARAMS = {
    "loss": "squared_error",
    "learning_rate": 0.05,
    "max_iter": 2000,
    "max_leaf_nodes": 31,
    "min_samples_leaf": 10,
    "l2_regularization": 0.0,
    "early_stopping": True,
    "scoring": "loss",
    "n_iter_no_change": 50,
    "tol": 1e-7,
}


@dataclass
class BaselineOutcome:
    model: str  # MAGPIE_HGB | TRAIN_MEAN
    val: dict
    test: dict
    run_id: str | None = None
    extra: dict | None = None  # e.g. the boosting rounds used


# ---------------------------------------------------------------------------------------------- features
def composition_key(atomic_numbers) -> str:
    """The reduced composition as an alphabetical formula (e.g. 'Fe2 O3'): the cache key."""
    from pymatgen.core import Composition, Element

    counts = Counter(int(z) for z in atomic_numbers)
    composition = Composition({Element.from_Z(z): n for z, n in counts.items()})
    return composition.reduced_composition.alphabetical_formula


class MagpieFeatures:
    """Magpie features of compositions, cached in one .npz per task (written atomically)."""

    def __init__(self, cache_path: str | os.PathLike | None):
        self.path = Path(cache_path) if cache_path is not None else None
        self._featurizer = None
        self.table: dict[str, np.ndarray] = {}
        self.labels: list[str] = []
        if self.path is not None and self.path.is_file():
            with np.load(self.path, allow_pickle=False) as data:
                if str(data["version"]) == self.version():
                    self.labels = [str(x) for x in data["labels"]]
                    self.table = dict(zip((str(k) for k in data["keys"]), data["features"]))

    @staticmethod
    def version() -> str:
        import matminer

        return f"matminer {getattr(matminer, '__version__', '?')} {json.dumps(FEATURIZER, sort_keys=True)}"

    def featurizer(self):
        if self._featurizer is None:
            from matminer.featurizers.composition import ElementProperty

            self._featurizer = ElementProperty.from_preset(FEATURIZER["preset"], impute_nan=FEATURIZER["impute_nan"])
            self.labels = list(self._featurizer.feature_labels())
        return self._featurizer

    def matrix(self, records) -> np.ndarray:
        """[n_records, 132] features; new compositions are featurised and the cache rewritten."""
        from pymatgen.core import Composition

        keys = [composition_key(r.atomic_numbers) for r in records]
        missing = sorted(set(keys) - set(self.table))
        if missing:
            featurizer = self.featurizer()
            for key in missing:
                self.table[key] = np.asarray(featurizer.featurize(Composition(key)), dtype=np.float64)
            self._save()
        if not keys:
            return np.zeros((0, len(self.labels) or 132))
        return np.stack([self.table[k] for k in keys])

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.table)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".magpie-", suffix=".npz")
        os.close(fd)
        try:
            np.savez(tmp, keys=np.array(keys), features=np.stack([self.table[k] for k in keys]),
                     labels=np.array(self.labels), version=np.array(self.version()))
            os.replace(tmp, self.path)  # concurrent runs: the last complete file wins, never a torn one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def feature_cache_path(config: FinetuneConfig, task_name: str) -> Path:
    return Path(config.out).expanduser().resolve() / "baseline_cache" / task_name / "magpie.npz"


# ---------------------------------------------------------------------------------------------- models
def fit_magpie_hgb(train_x, train_y, val_x, val_y, seed: int):
    from sklearn.ensemble import HistGradientBoostingRegressor

    model = HistGradientBoostingRegressor(**HGB_PARAMS, random_state=seed)
    if len(val_y):
        model.fit(train_x, train_y, X_val=val_x, y_val=val_y)
    else:  # no validation split: a fixed share of the training rows stops it instead
        model.set_params(validation_fraction=0.1).fit(train_x, train_y)
    return model


def _metrics(y_true, y_pred) -> dict:
    from finetune.train import regression_metrics

    return regression_metrics(np.asarray(y_true, float), np.asarray(y_pred, float))


# ---------------------------------------------------------------------------------------------- one run
def run_baseline(
    config: FinetuneConfig,
    *,
    data: TaskData | None = None,
    models: tuple[str, ...] = MODELS,
    tracking: bool = True,
    progress: bool = True,
    verbose: bool = True,
) -> list[BaselineOutcome]:
    """The baseline models of one (task, fraction, seed) cell, each tracked as its own MLflow run."""
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown baseline model(s) {unknown}; known: {list(MODELS)}")
    config = config.replace(encoder=BASELINE, mode=BASELINE)
    task = get_task(config.task, target_name=config.target_name, unit=config.unit)
    if data is None:
        data = load_task_data(
            task, root=config.data_root, fraction=config.fraction, seed=config.seed, max_train=config.max_train,
            max_eval=config.max_eval, max_val=config.max_val, progress=progress,
        )
    y = {s: np.asarray(data.targets(s), dtype=np.float64) for s in ("train", "val", "test")}
    t0 = time.perf_counter()
    features = MagpieFeatures(feature_cache_path(config, task.name)) if MAGPIE_HGB in models else None
    x = {s: features.matrix(data.split(s)) for s in ("train", "val", "test")} if features else {}
    featurize_seconds = time.perf_counter() - t0

    outcomes = []
    for model_name in models:
        t0 = time.perf_counter()
        if model_name == MAGPIE_HGB:
            model = fit_magpie_hgb(x["train"], y["train"], x["val"], y["val"], config.seed)
            predict = {s: model.predict(x[s]) if len(y[s]) else np.zeros(0) for s in ("val", "test")}
            extra = {"n_iter": int(model.n_iter_), "featurize_seconds": featurize_seconds,
                     "n_features": int(x["train"].shape[1])}
            params = {"hgb": {**HGB_PARAMS, "random_state": config.seed}, "features": FEATURIZER}
        else:
            mean = float(np.nanmean(y["train"]))
            predict = {s: np.full(len(y[s]), mean) for s in ("val", "test")}
            extra = {"train_mean": mean}
            params = {}
        extra["fit_seconds"] = time.perf_counter() - t0
        outcome = BaselineOutcome(model_name, _metrics(y["val"], predict["val"]), _metrics(y["test"], predict["test"]),
                                  extra=extra)
        if tracking:
            outcome.run_id = _track(config, task, data, outcome, predict["test"], params)
        outcomes.append(outcome)
        if verbose:
            print(f"[baseline] {task.name} {model_name} f{config.fraction:g} s{config.seed}: "
                  f"val MAE {outcome.val['mae']:.4g}, test MAE {outcome.test['mae']:.4g}, "
                  f"R² {outcome.test['r2']:.3f} ({task.unit}; n_train {len(data.train)}, n_test {len(data.test)})",
                  flush=True)
    return outcomes


def run_name(model: str, config: FinetuneConfig) -> str:
    return f"{model}-f{config.fraction:g}-s{config.seed}"


def _track(config: FinetuneConfig, task, data: TaskData, outcome: BaselineOutcome, test_pred, params: dict) -> str:
    from finetune.plots import parity_plot

    tracker = Tracker(config.out, config.tracking_uri, config.artifact_root)
    tags = {
        "task": task.name, "target": task.target, "unit": task.unit, "encoder": outcome.model,
        "encoder_name": outcome.model.split(":", 1)[1], "mode": BASELINE, "fraction": f"{config.fraction:g}",
        "seed": config.seed, "crystalfm.kind": BASELINE, "crystalfm.config_sha": config.fingerprint(),
    }
    resolved = {**_relevant(config), "baseline": outcome.model, **params, "task_spec": task.to_dict(),
                "git_commit": git_commit()}
    name = run_name(outcome.model, config)
    tracker.start(task.name, name, tags, resolved)
    try:
        summary = {  # the fine-tune runs' names (crystalfm_common/metrics.py), so one table compares both
            **grouped("run", data_counts(data)),
            **summary_metrics(outcome.val, outcome.test),
            **{metric_name("throughput" if k.endswith("_seconds") else "run", k): v for k, v in outcome.extra.items()},
        }
        tracker.log_metrics(summary)
        with tempfile.TemporaryDirectory(prefix="crystalfm-baseline-") as tmp:
            tmp = Path(tmp)
            for sub in ("plots", "data", "config"):
                (tmp / sub).mkdir()
            if len(data.test):
                parity_plot(data.targets("test"), test_pred, tmp / "plots" / "parity_test.png",
                            title=f"{task.name}: {name}", unit=task.unit, metrics=outcome.test)
            write_split_files(tmp / "data", task, data, test_pred)
            import yaml

            (tmp / "config" / "config.yaml").write_text(
                yaml.safe_dump(json.loads(json.dumps(resolved, default=str)), sort_keys=False))
            (tmp / "config" / "baseline.json").write_text(json.dumps(
                {"model": outcome.model, "val": outcome.val, "test": outcome.test, **outcome.extra, **params},
                indent=2, default=str))
            for sub in ("plots", "data", "config"):
                tracker.log_artifacts(tmp / sub, sub)
        tracker.finish("FINISHED")
    except BaseException:
        tracker.finish("FAILED")
        raise
    return tracker.run_id


def _relevant(config: FinetuneConfig) -> dict:
    """The config fields a baseline run depends on (the neural ones would only mislead)."""
    keep = ("task", "encoder", "mode", "fraction", "seed", "max_train", "max_eval", "max_val", "data_root", "out",
            "tracking_uri", "artifact_root", "target_name", "unit")
    return {k: v for k, v in config.to_dict().items() if k in keep}


# ---------------------------------------------------------------------------------------------- grid
def run_baseline_grid(
    task: str, *, fractions=(1.0,), seeds=(0, 1, 2), models: tuple[str, ...] = MODELS, progress: bool = True,
    **fields,
) -> list[BaselineOutcome]:
    """fractions × seeds in this process (validation and test are parsed once, features cached)."""
    outcomes = []
    for fraction in fractions:
        for seed in seeds:
            config = FinetuneConfig.from_dict({**fields, "task": task, "encoder": BASELINE, "fraction": fraction,
                                               "seed": seed})
            outcomes += run_baseline(config, models=models, progress=progress)
    return outcomes
