"""The optimiser and the learning-rate schedule of a pretraining job (torchtitan's `optim` split):
AdamW or SGD with no weight decay on biases and norm scales, and a picklable per-step lr multiplier."""
from __future__ import annotations

import math

import torch

from pretrain.config import JobConfig


class LrSchedule:
    """lr multiplier per optimiser step: warmup + cosine, one-cycle, or constant (picklable)."""

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4):
        self.kind, self.total = kind, max(1, total_steps)
        self.warmup, self.min_ratio = warmup_steps, min_lr_ratio
        self.pct_start, self.div, self.final_div = pct_start, div_factor, final_div_factor

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "warmup_cosine":
            if step < self.warmup:
                return (step + 1) / self.warmup
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "one_cycle":  # cosine up from lr/div to lr, then cosine down to lr/(div*final_div)
            start, end = 1 / self.div, 1 / (self.div * self.final_div)
            rise = max(1, int(self.pct_start * self.total))
            if step < rise:
                return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * step / rise))
            progress = min(1.0, (step - rise) / max(1, self.total - rise))
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule kind {self.kind!r}")


def build_optimizer(model: torch.nn.Module, config: JobConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales (ndim < 2).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    opt = config.optim
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)
    return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: JobConfig) -> torch.optim.lr_scheduler.LambdaLR:
    sched = config.schedule
    schedule = LrSchedule(sched.kind, config.train.max_steps, sched.warmup_steps, sched.min_lr_ratio,
                          sched.pct_start, sched.div_factor, sched.final_div_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
