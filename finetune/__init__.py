"""Fine-tuning released encoders on property tasks: heads, MLflow comparison, prediction.

Public API (imported lazily, so `crystalfm finetune tasks` does not load torch):
    FinetuneConfig, SweepConfig        typed run / sweep configs
    get_task, available_tasks          the task registry (and csv:PATH user tasks)
    load_task_data                     a task's deterministic split, fraction and seed applied
    run_finetune                       one run end to end (data → fit → model dir → MLflow)
    run_sweep                          tasks × encoders × modes × fractions × seeds
    compare                            the MLflow comparison table
    load_model, predict_paths          a fine-tuned model directory, and prediction from files
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "FinetuneConfig": "finetune.config",
    "SweepConfig": "finetune.config",
    "get_task": "finetune.tasks",
    "available_tasks": "finetune.tasks",
    "load_task_data": "finetune.data",
    "run_finetune": "finetune.run",
    "run_sweep": "finetune.sweep",
    "compare": "finetune.compare",
    "load_model": "finetune.model_dir",
    "predict_paths": "finetune.predict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'finetune' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
