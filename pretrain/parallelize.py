"""DeepSpeed setup (torchtitan's `parallelize` split): the DeepSpeed config a job runs with and the
engine that wraps the objective (ZeRO stage, precision, accumulation, clipping). Model code never
imports DeepSpeed; only this module and the trainer's loop touch the engine."""
from __future__ import annotations

from typing import Any

import torch

from pretrain.config import JobConfig
from pretrain.precision import deepspeed_section


def deepspeed_config(config: JobConfig) -> dict:
    """The DeepSpeed config this job runs with (config.deepspeed is merged last)."""
    train = config.train
    ds: dict[str, Any] = {
        # Batches are packed to an atom budget, so "batch size" is one packed micro-batch per rank.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    ds.update(deepspeed_section(train.precision))  # bf16: torch autocast, fp32 weights (pretrain/precision.py)
    return _deep_merge(ds, config.deepspeed)


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def parallelize(objective: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, ds_config: dict):
    """(engine, optimizer, lr_scheduler) from `deepspeed.initialize` (imported here: it is slow to import)."""
    import deepspeed

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=objective, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config)
    return engine, optimizer, lr_scheduler
