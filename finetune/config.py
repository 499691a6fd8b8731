"""One typed config per fine-tune run, and one per sweep. Every field has a default; unknown keys
are rejected (a typo in a YAML must not silently train something else)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crystalfm_common.config import from_dict as dataclass_from_dict

MODES = ("full", "frozen", "scratch", "baseline")
LR_SELECT = ("first_seed", "per_run")
BASELINE = "baseline"  # the composition baseline arm (finetune.baseline): no encoder at all
PROBES = ("mlp", "linear")
HEAD_INITS = ("random", "property_head")


def _coerce(config, kind, names) -> None:
    """YAML 1.1 reads `1e-4` as a string: numbers given as strings are converted (None stays None)."""
    for name in names:
        value = getattr(config, name)
        if value is None or isinstance(value, bool):
            continue
        try:
            setattr(config, name, kind(float(value)) if kind is int and isinstance(value, str) else kind(value))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None


# Fields that change where results go or how fast they come, not what is computed.
_NOT_IN_FINGERPRINT = ("out", "tracking_uri", "register", "num_workers", "device", "data_root")


@dataclass
class FinetuneConfig:
    """One fine-tune run: one task, one encoder, one label fraction, one seed."""

    task: str = "mp20_formation_energy"
    # A release directory (from `crystalfm pretrain release`), "scratch", or "baseline" (the
    # composition baseline of finetune.baseline: Magpie features + gradient boosting, no encoder).
    encoder: str = "scratch"
    # Architecture for `encoder: scratch` without a release (e.g. {"name": "pddformer", ...}).
    # With a release directory and mode "scratch", the release's own architecture is used.
    encoder_config: dict | None = None
    mode: str = "full"  # full | frozen | scratch | baseline ("scratch"/"baseline" encoders imply their mode)
    probe: str = "mlp"  # frozen mode only: "linear" (readout + one Linear) or "mlp"
    readout: str = "mean"  # mean | sum | attention
    head_hidden: list[int] = field(default_factory=lambda: [256, 256])
    dropout: float = 0.0
    # random: a fresh head. property_head: start from the release's pretraining property head for
    # the task's target (a correction MLP on top of it starts at zero: finetune/heads.py).
    head_init: str = "random"
    fraction: float = 1.0  # fraction of the task's training labels used (nested across fractions)
    seed: int = 0
    # The maximum: early stopping on validation MAE (`patience`) ends a run once it has converged.
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3  # head (and scratch encoder) learning rate
    encoder_lr: float | None = None  # full fine-tuning: encoder learning rate (default: lr)
    # Learning-rate selection on the validation split (finetune.lr_select): each candidate sets the
    # head AND encoder learning rate (one value for both, in every mode: scratch, full and frozen
    # alike); the candidate with the lowest best-epoch validation MAE is kept. Excludes encoder_lr.
    lr_grid: list[float] | None = None
    # first_seed: chosen once per (task, encoder, mode, fraction, ...) cell on `lr_select_seed` and
    # reused by the other seeds; per_run: every run chooses on its own seed.
    lr_select: str = "first_seed"
    lr_select_seed: int | None = None  # default: the sweep's first seed (a single run: its own seed)
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # cosine | constant
    warmup_epochs: float = 0.0
    grad_clip: float | None = 5.0
    # Early stopping: epochs without a better validation MAE before the run stops; None: off.
    patience: int | None = 15
    normalize: str = "standard"  # target normalisation: standard | none
    max_train: int | None = None  # cap on training crystals after the fraction (quick runs)
    max_eval: int | None = None  # cap on validation and test crystals each; None: the whole split
    max_val: int | None = None  # cap on validation crystals only; None: as max_eval
    num_workers: int = 0  # DataLoader workers building neighbour lists / tokens
    cache_views: bool = True  # PDD rows and neighbour lists computed once per crystal, reused every epoch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data_root: str | None = None  # default: $CRYSTALFM_SHARED_DATA or ../shared/data beside the repo
    out: str = "finetune_runs"  # root of the default MLflow store, artifacts and model dirs
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite:///<out>/mlflow.db
    artifact_root: str | None = None  # new experiments' artifacts; default: mlartifacts/ beside a SQLite store
    register: bool = True  # keep the best run per task registered with alias "best"
    # User CSV tasks ("csv:PATH"): name and unit of the value column.
    target_name: str | None = None
    unit: str | None = None

    def __post_init__(self):
        _coerce(self, float, ("fraction", "lr", "encoder_lr", "weight_decay", "warmup_epochs", "grad_clip", "dropout"))
        _coerce(self, int, ("seed", "epochs", "batch_size", "patience", "max_train", "max_eval", "max_val",
                             "num_workers", "lr_select_seed"))
        if self.encoder == "scratch":
            self.mode = "scratch"
        if self.encoder == BASELINE or self.mode == BASELINE:
            self.encoder, self.mode = BASELINE, BASELINE
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {self.head_init!r}")
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {self.probe!r}")
        if not 0.0 < float(self.fraction) <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.scheduler not in ("cosine", "constant"):
            raise ValueError(f"scheduler must be 'cosine' or 'constant', got {self.scheduler!r}")
        if self.encoder == "scratch" and self.encoder_config is None:
            raise ValueError(
                "encoder 'scratch' needs an architecture: give encoder_config (e.g. "
                "--encoder-config '{\"name\": \"pddformer\"}') or a release directory with --mode scratch"
            )
        self.head_hidden = [int(x) for x in self.head_hidden]
        if self.lr_grid is not None:
            if isinstance(self.lr_grid, (int, float, str)):
                self.lr_grid = [self.lr_grid]
            try:
                self.lr_grid = [float(x) for x in self.lr_grid]
            except (TypeError, ValueError):
                raise ValueError(f"lr_grid must be a list of numbers, got {self.lr_grid!r}") from None
            if not self.lr_grid or any(not x > 0 for x in self.lr_grid):
                raise ValueError(f"lr_grid must be a non-empty list of positive learning rates, got {self.lr_grid}")
            if self.encoder_lr is not None and self.mode != BASELINE:
                raise ValueError(
                    "lr_grid and encoder_lr exclude each other: each grid candidate sets the head and the encoder "
                    "learning rate together; drop encoder_lr (or lr_grid, to keep an explicit encoder_lr)"
                )
        if self.lr_select not in LR_SELECT:
            raise ValueError(f"lr_select must be one of {LR_SELECT}, got {self.lr_select!r}")

    @classmethod
    def from_dict(cls, data: dict | None) -> "FinetuneConfig":
        return dataclass_from_dict(cls, data, typed=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """What the run computes, as a short hash: every field except where it is stored and how it
        is executed. A sweep skips runs whose fingerprint already FINISHED in the store (resume)."""
        import hashlib
        import json

        fields = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def selection_seed(self) -> int:
        """The seed whose run chooses the learning rate (lr_select first_seed), or this run's own."""
        if self.lr_select == "per_run" or self.lr_select_seed is None:
            return self.seed
        return self.lr_select_seed

    @property
    def head_layers(self) -> tuple[int, ...]:
        """Hidden widths of the head: none for a linear probe."""
        return () if (self.mode == "frozen" and self.probe == "linear") else tuple(self.head_hidden)


@dataclass
class SweepConfig:
    """tasks × encoders × fractions × seeds; every run shares `train` (FinetuneConfig fields)."""

    tasks: list[str] = field(default_factory=lambda: ["mp20_formation_energy"])
    # Release directories, "scratch" and/or "baseline". Each release is run in every mode of `modes`.
    encoders: list[str] = field(default_factory=lambda: ["scratch"])
    modes: list[str] = field(default_factory=lambda: ["full"])
    fractions: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: dict = field(default_factory=dict)
    # "ray" (parallel runs on this machine or the Ray cluster in $RAY_ADDRESS) or "serial".
    backend: str = "ray"
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0  # e.g. 0.25 packs four runs on one GPU
    max_parallel: int | None = None  # default: as many as the resources allow
    compare_after: bool = True  # print and save the comparison table when the sweep ends

    def __post_init__(self):
        _coerce(self, float, ("cpus_per_run", "gpus_per_run"))
        _coerce(self, int, ("max_parallel",))
        self.fractions = [float(f) for f in self.fractions]
        self.seeds = [int(x) for x in self.seeds]

    @classmethod
    def from_dict(cls, data: dict | None) -> "SweepConfig":
        config = dataclass_from_dict(cls, data, typed=False)
        FinetuneConfig.from_dict({**config.train, "encoder": "x"})  # reject bad train keys early
        if config.backend not in ("ray", "serial"):
            raise ValueError(f"sweep backend must be 'ray' or 'serial', got {config.backend!r}")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_yaml(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
