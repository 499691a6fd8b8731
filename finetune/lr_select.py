"""Learning rates chosen on the validation split, by one grid for every arm.

    fit_with_lr_grid(config, data, backbone) -> (FitResult, LrSelection)

Each candidate of `lr_grid` is one learning rate for the head and the encoder together (frozen
probes: the head's), so scratch, pretrained and frozen arms are tuned by the same rule. Every
candidate trains from the same initialisation (a fresh encoder copy, seeded) with the same early
stopping; the one with the lowest best-epoch validation MAE wins (ties: the first in the grid; a
diverged candidate counts as +inf). Never chosen on test.

`lr_select: per_run` chooses in every run on its own seed, and the winning candidate's fit is the
run. `lr_select: first_seed` chooses once per cell (everything in the config but the seed and the
places it writes to) on `lr_select_seed` (the sweep's first seed): the first run of the cell to
arrive takes a lock on `<out>/lr_selection/<task>/<cell>.json`, trains the grid on the selection
seed's data — when it *is* the selection seed, the winning fit is its result — and writes the
choice; every other run of the cell reads it and trains the chosen rate once. The file makes sweeps
resumable (a rerun reuses the choice) and shards/Ray workers on one machine agree through it; the
lock is `fcntl.flock`, so on a cluster `out` must be on a file system that honours it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from crystalfm_common.metrics import metric_name
from finetune.backbone import Backbone, load_backbone
from finetune.config import FinetuneConfig
from finetune.data import TaskData, load_task_data
from finetune.train import FitResult, fit

TRAIN_LOSS, VAL_MAE = metric_name("train", "loss"), metric_name("val", "mae")

# Fields that do not change what a run learns (or only name where it writes): left out of the cell.
_NOT_IN_CELL = ("seed", "lr", "encoder_lr", "out", "tracking_uri", "artifact_root", "register", "device", "num_workers", "data_root")


@dataclass
class LrSelection:
    grid: list[float]
    val_mae: list[float]  # best-epoch validation MAE of each candidate (inf: diverged / no finite value)
    best_epoch: list[int]
    lr: float  # the choice
    seed: int  # the seed the grid was trained on
    policy: str  # first_seed | per_run
    source: str = "this run"  # or the shared selection file this run read
    cell: str = ""
    diverged: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def tags(self) -> dict:
        return {
            "lr_selected": f"{self.lr:g}",
            "lr_select": self.policy,
            "lr_select_seed": self.seed,
            "lr_grid": json.dumps(self.grid),
            "lr_grid_val_mae": json.dumps({f"{lr:g}": _finite_or_none(m) for lr, m in zip(self.grid, self.val_mae)}),
            "lr_selection_source": self.source,
        }


def _finite_or_none(value: float):
    return value if math.isfinite(value) else None


def cell_id(config: FinetuneConfig) -> str:
    """A readable name plus a hash of every field that shapes the run except the seed."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_CELL}
    fields["lr_select_seed"] = config.selection_seed
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    encoder = "scratch" if config.encoder == "scratch" else Path(config.encoder).name
    return f"{encoder}-{config.mode}-f{config.fraction:g}-{digest}"


def selection_path(config: FinetuneConfig, task_name: str) -> Path:
    return Path(config.out).expanduser().resolve() / "lr_selection" / task_name / f"{cell_id(config)}.json"


def candidate_config(config: FinetuneConfig, lr: float) -> FinetuneConfig:
    return config.replace(lr=float(lr), encoder_lr=None, lr_grid=None)


def choose(val_mae: list[float]) -> int:
    """Index of the lowest validation MAE; non-finite values never win; ties go to the first."""
    scores = [m if math.isfinite(m) else math.inf for m in val_mae]
    return min(range(len(scores)), key=lambda i: scores[i])


# ---------------------------------------------------------------------------------------------- grid
def run_grid(
    config: FinetuneConfig, data: TaskData, first: Backbone | None, *,
    log: Callable[[dict, int], None] | None = None, progress: bool = False,
) -> tuple[LrSelection, FitResult]:
    """Train every candidate on `config.seed`; returns the selection and the winning fit."""
    if not data.val:
        raise ValueError(f"task {data.task.name}: lr_grid needs a validation split to choose on; it has none")
    maes, epochs, diverged = [], [], []
    best, best_index = None, -1
    for index, lr in enumerate(config.lr_grid):
        backbone = first if (index == 0 and first is not None) else fresh_backbone(config)
        on_epoch = None
        if log is not None:
            def on_epoch(epoch, metrics, index=index):  # live curves per candidate, beside the run's own
                log({metric_name("lr_grid", f"{index}/{k}"): v for k, v in metrics.items()
                     if k in (TRAIN_LOSS, VAL_MAE)}, epoch)
        result = fit(candidate_config(config, lr), data, backbone, on_epoch=on_epoch, progress=progress)
        mae = float(result.val.get("mae", math.nan))
        maes.append(mae if math.isfinite(mae) and not result.diverged else math.inf)
        epochs.append(result.best_epoch)
        diverged.append(bool(result.diverged))
        if choose(maes) == index:  # the new best: keep its fit, let the previous one go
            best, best_index = result, index
        del result, backbone
    selection = LrSelection(grid=list(config.lr_grid), val_mae=maes, best_epoch=epochs, lr=config.lr_grid[best_index],
                            seed=config.seed, policy=config.lr_select, cell=cell_id(config), diverged=diverged)
    return selection, best


def fresh_backbone(config: FinetuneConfig) -> Backbone:
    """The run's encoder as it starts (pretrained weights, or the seed's initialisation)."""
    return load_backbone(config.encoder, config.mode, encoder_config=config.encoder_config, seed=config.seed)


# ---------------------------------------------------------------------------------------------- a run
def fit_with_lr_grid(
    config: FinetuneConfig, data: TaskData, backbone: Backbone, *,
    log: Callable[[dict, int], None] | None = None, progress: bool = False,
) -> tuple[FitResult, LrSelection]:
    """One run under `lr_grid`: choose (or read the cell's choice), then the result at that rate.

    `backbone` must be untrained (it is this run's own copy). `log(metrics, step)` receives the
    candidates' curves (`lr_grid/<i>/...`) and, for a run that reuses a choice, its own."""
    if config.lr_select == "per_run":
        selection, result = run_grid(config, data, backbone, log=log, progress=progress)
        return result, selection

    path = selection_path(config, data.task.name)
    result = None
    with _locked(path):
        selection = read_selection(path)
        if selection is None:
            if config.selection_seed == config.seed:
                selection, result = run_grid(config, data, backbone, log=log, progress=progress)
            else:  # this seed came first: choose on the selection seed's own data and initialisation
                chooser = config.replace(seed=config.selection_seed)
                chooser_data = load_task_data(
                    data.task, root=config.data_root, fraction=config.fraction, seed=chooser.seed,
                    max_train=config.max_train, max_eval=config.max_eval, max_val=config.max_val, progress=progress,
                )
                selection, _ = run_grid(chooser, chooser_data, None, log=log, progress=progress)
            write_selection(path, selection)
        else:
            selection.source = str(path)
    if result is None:
        on_epoch = (lambda epoch, metrics: log(metrics, epoch)) if log is not None else None
        result = fit(candidate_config(config, selection.lr), data, backbone, on_epoch=on_epoch, progress=progress)
    return result, selection


def read_selection(path: Path) -> LrSelection | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data["val_mae"] = [math.inf if v is None else float(v) for v in data["val_mae"]]
    return LrSelection(**data)


def write_selection(path: Path, selection: LrSelection) -> None:
    payload = selection.to_dict()
    payload["val_mae"] = [_finite_or_none(v) for v in selection.val_mae]  # JSON has no inf
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lr-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock per cell: the runs of one cell wait while the first one trains the grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
