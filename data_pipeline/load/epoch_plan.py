"""The epoch plan: a pure function of the index and (seed, epoch, round), identical on every rank:
shard order permuted, samples shuffled in windows, packed greedily under the atom budget, and
dealt round-robin to ranks (see loader.py's docstring for the whole picture)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipeline.load.tar_index import _GlobalIndex


def pack_by_atoms(num_atoms: np.ndarray, atom_budget: int, max_crystals: int | None = None) -> np.ndarray:
    """Greedy in-order packing: [B + 1] batch boundaries so each batch's atoms ≤ atom_budget
    (a crystal larger than the budget gets a batch of its own) and crystals ≤ max_crystals."""
    n = len(num_atoms)
    cumulative = np.cumsum(num_atoms)
    bounds = [0]
    start = 0
    while start < n:
        base = cumulative[start - 1] if start else 0
        end = int(np.searchsorted(cumulative, base + atom_budget, side="right"))
        end = max(end, start + 1)
        if max_crystals is not None:
            end = min(end, start + max_crystals)
        bounds.append(end)
        start = end
    return np.asarray(bounds, dtype=np.int64)


def _shuffled_order(shard_start: np.ndarray, shard_order: np.ndarray, shuffle_buffer: int, rng) -> np.ndarray:
    """Samples of the shards in `shard_order`, shuffled inside consecutive windows."""
    pieces = [np.arange(shard_start[s], shard_start[s + 1]) for s in shard_order]
    order = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if shuffle_buffer > 1 and len(order):
        # window id + a uniform in [0, 1) as the sort key: samples stay inside their window.
        keys = np.arange(len(order)) // shuffle_buffer + rng.random(len(order))
        order = order[np.argsort(keys, kind="stable")]
    return order


@dataclass(frozen=True)
class _PlanConfig:
    atom_budget: int
    max_crystals: int | None
    shuffle_buffer: int
    seed: int
    mode: str


def _round_plan(index: _GlobalIndex, cfg: _PlanConfig, epoch: int, round_: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample order, batch bounds) of one epoch (epoch mode) or one resampling round."""
    num_shards = len(index.paths)
    shuffle = cfg.shuffle_buffer > 0
    if cfg.mode == "epoch":
        rng = np.random.default_rng([cfg.seed, epoch, 0])
        shard_order = rng.permutation(num_shards) if shuffle else np.arange(num_shards)
    else:
        rng = np.random.default_rng([cfg.seed, epoch, 1, round_])
        shard_order = rng.integers(0, num_shards, size=num_shards)
    order = _shuffled_order(index.shard_start, shard_order, cfg.shuffle_buffer, rng)
    bounds = pack_by_atoms(index.num_atoms[order], cfg.atom_budget, cfg.max_crystals)
    return order, bounds


def _rank_batches(num_global: int, rank: int, world_size: int, remainder: str) -> list[tuple[int, bool]]:
    """(global batch id, is_padding) dealt to `rank`: global batch g goes to rank g % W."""
    if remainder == "drop":
        per_rank = num_global // world_size
    else:
        per_rank = -(-num_global // world_size)
    out = []
    for j in range(per_rank):
        g = j * world_size + rank
        out.append((g % num_global, g >= num_global) if num_global else (0, True))
    return out
