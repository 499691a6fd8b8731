"""The objective interface the trainer runs: `loss(batch, norm) -> (loss, metrics)`.

Normalisation contract (so uneven batches across ranks give the gradient of one big batch):
each objective sums its per-atom terms and divides by `norm.atoms`, and its per-crystal terms by
`norm.crystals`. The trainer sets `norm` to the *global* counts over all ranks and accumulation
steps of the optimiser step (and scales by world size to undo DeepSpeed's gradient averaging);
called without a norm, the counts of the batch itself are used, which is an ordinary mean.
`metrics` holds detached floats/tensors for logging only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LossNorm:
    atoms: float
    crystals: float

    @classmethod
    def of(cls, batch) -> "LossNorm":
        return cls(atoms=float(batch.num_nodes), crystals=float(batch.num_crystals))


class Objective(nn.Module):
    """An nn.Module owning every trainable part of one pretraining method."""

    def loss(self, batch, norm: LossNorm | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def forward(self, batch, norm: LossNorm | None = None):
        return self.loss(batch, norm)

    def batch_views(self) -> dict:
        """What the loader must build for this objective: {'graph': neighbour rule or None,
        'tokens': bool, 'pdd_k': int or None}."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook called by the trainer after each optimiser step (e.g. EMA target updates)."""


def require_init_source(init_from: str, source, name: str):
    """The released objective `init_from` names, loaded by the caller: objectives never import
    `pretrain.release` (it builds objectives); `pretrain.release.build_with_init` loads it first."""
    if source is None:
        raise ValueError(f"{name}.init_from: {init_from} was not loaded; build this objective with "
                         "`pretrain.release.build_with_init(config)` (the trainer does), which loads the release first")
    return source
