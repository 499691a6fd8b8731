"""One typed config per pretraining job: nested dataclasses, a YAML file, `key.sub=value` overrides.

    job = load_config("configs/pretrain_vae.yaml", ["train.max_steps=100", "train.zero_stage=3"])

Every field has a default here; YAML and overrides may only name fields that exist (unknown keys
are rejected with the closest valid name). `objective` and `deepspeed` are free maps: the
objective validates its own keys when it is built, and `deepspeed` is merged last into the
DeepSpeed config the trainer writes (an escape hatch for keys this file does not model).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from crystalfm_common.config import ConfigError, from_dict


@dataclass
class RunConfig:
    name: str = "crystalfm"  # outputs go to <root>/<name>: config, checkpoints, logs, mlflow.db
    root: str = "runs"
    seed: int = 0


@dataclass
class DataConfig:
    shards: str = ""  # a shard-set directory written by `crystalfm data build` (holds manifest.json)
    train_split: str = "train"
    val_split: str = "val"
    atom_budget: int = 4096  # atoms per micro-batch per rank (batches are packed to this)
    max_crystals: int | None = None
    num_workers: int = 0
    mode: Literal["epoch", "resampled"] = "epoch"
    shuffle_buffer: int = 1000
    skip_corrupt: bool = False


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.01  # not applied to biases and norm scales (parameters with ndim < 2)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables


@dataclass
class ScheduleConfig:
    kind: Literal["warmup_cosine", "one_cycle", "constant"] = "warmup_cosine"
    warmup_steps: int = 100  # warmup_cosine: linear warmup from 0
    min_lr_ratio: float = 0.1  # warmup_cosine: final lr = lr * min_lr_ratio
    pct_start: float = 0.3  # one_cycle: fraction of steps spent rising
    div_factor: float = 25.0  # one_cycle: initial lr = lr / div_factor
    final_div_factor: float = 1e4  # one_cycle: final lr = initial lr / final_div_factor


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimiser steps
    grad_accum: int = 1  # micro-batches per optimiser step on each rank
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 2
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPUs, gloo on CPU ranks
    log_every: int = 10
    eval_every: int = 0  # 0: no evaluation during training
    eval_batches: int = 20


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <run dir>/checkpoints
    every_steps: int = 500
    keep_last: int = 3
    resume: str = "auto"  # auto: from `latest` when it exists; none; or a checkpoint tag directory


@dataclass
class TrackingConfig:
    mlflow: bool = True
    tracking_uri: str = ""  # "": $MLFLOW_TRACKING_URI, else sqlite:///<run root>/mlflow.db
    experiment: str = "crystalfm-pretrain"
    run_name: str = ""  # default: run.name
    registry_name: str = ""  # model registry name used by `release`; default crystalfm-<objective>


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: dict = field(default_factory=lambda: {"name": "vae"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ derived paths
    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------- overrides
def apply_override(data: dict, override: str) -> None:
    """`a.b.c=value` into a nested map; value is parsed as YAML (`3`, `1e-4`, `true`, `[1, 2]`, `null`)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {override!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> JobConfig:
    """YAML file (optional) + overrides → a validated JobConfig."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (see configs/pretrain_*.yaml for examples)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for override in overrides or []:
        apply_override(data, override)
    try:
        return from_dict(JobConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None
