"""Metric names: one rule for metrics.jsonl, MLflow and the model cards of every stage.

A name is `<group>/<name>`; MLflow's UI draws one chart section per group (the part before the
first "/"), so what a reader compares sits together and the counters do not come first:

    train/       the optimisation: loss (and the objective's own terms), lr, grad_norm
    val/         validation numbers (val/loss; fine-tuning: val/mae, val/rmse, val/r2 per epoch,
                 val/best_mae... once, at the best epoch, which the registry chooses on)
    test/        held-out numbers, logged once (fine-tuning: test/mae, test/rmse, test/r2)
    throughput/  rates, time and memory: crystals_per_s, atoms_per_s, data_wait_frac, mem_gb_*, *_seconds
    run/         one number per run: counts (n_train...), best_epoch, epochs_run, diverged, lr_selected
    lr_grid/     fine-tuning's learning-rate candidates: lr_grid/<i>/train/loss, lr_grid/<i>/val/mae

Every series has exactly one name: code builds names with `metric_name`, never by hand.
"""
from __future__ import annotations

from typing import Iterable, Mapping

GROUPS = ("train", "val", "test", "throughput", "run", "lr_grid")


def metric_name(group: str, name: str) -> str:
    """`metric_name("val", "mae") == "val/mae"`; an unknown group or an empty name is a bug."""
    if group not in GROUPS:
        raise ValueError(f"metric group {group!r} is not one of {GROUPS} (crystalfm_common/metrics.py)")
    if not name or name.startswith("/"):
        raise ValueError(f"metric name {name!r} in group {group!r} is empty")
    return f"{group}/{name}"


def grouped(group: str, metrics: Mapping[str, float], *, prefix: str = "", skip: Iterable[str] = ()) -> dict[str, float]:
    """{"mae": 0.1} → {"val/mae": 0.1} (with `prefix="best_"`: {"val/best_mae": 0.1}); keys in `skip` dropped."""
    skip = set(skip)
    return {metric_name(group, f"{prefix}{k}"): v for k, v in metrics.items() if k not in skip}


def group_of(key: str) -> str | None:
    """The group of a full metric name, None when it has none of ours."""
    head = key.split("/", 1)[0]
    return head if "/" in key and head in GROUPS else None


def is_grouped(key: str) -> bool:
    return group_of(key) is not None


def split_metrics(metrics: Mapping[str, float], group: str) -> dict[str, float]:
    """The members of one group without the prefix: {"test/mae": 0.1, "val/mae": 0.2} → {"mae": 0.1}."""
    head = f"{group}/"
    return {k[len(head):]: v for k, v in metrics.items() if k.startswith(head)}
