"""A small real objective and an in-memory loader for the trainer's tests (no encoder needed).

`LinearEnergy` is an encoder-free energy model on collated MP-20 records: per-atom energies from
an element embedding and the fractional coordinates, a per-atom term normalised by `norm.atoms`
and a per-crystal term normalised by `norm.crystals` (the objective contract). `ListLoader`
follows the ShardLoader API (set_epoch, batches_per_epoch, state_dict/load_state_dict) and
deliberately gives ranks batches with different numbers of crystals and atoms.

Registered as objective "linear_energy" by `register()` so releases made from it reload with
`load_pretrained`.
"""
from __future__ import annotations

import csv
import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_pipeline.load.collate import BatchViews, collate
from pretrain.objectives.base import Objective

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CRYSTALFM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def register() -> None:
    import pretrain.objectives as objectives

    objectives._MODULES.setdefault("linear_energy", "pretrain_trainer_fixtures")


class LinearEnergy(Objective):
    def __init__(self, dim: int = 8, noise: float = 0.0):
        super().__init__()
        self.noise = noise
        self.embed = nn.Embedding(101, dim)  # [Z, d]
        self.coords = nn.Linear(3, dim)
        self.head = nn.Linear(dim, 1)

    def batch_views(self) -> dict:
        return {"graph": None, "tokens": False, "pdd_k": None}

    def atom_energies(self, batch) -> torch.Tensor:
        h = self.embed(batch.atomic_numbers) + self.coords(batch.frac_coords)  # [N, d]
        if self.noise and self.training:  # a stochastic term, so exact resume must restore RNG state
            h = h + self.noise * torch.randn_like(h)
        return self.head(torch.tanh(h)).squeeze(-1)  # [N]

    def loss(self, batch, norm=None):
        from pretrain.objectives.base import LossNorm

        norm = norm or LossNorm.of(batch)
        e = self.atom_energies(batch).to(batch.frac_coords.dtype)  # [N]; losses reduced in the batch's fp32
        target = torch.nan_to_num(batch.labels["formation_energy_per_atom"])  # [B]
        per_atom = ((e - target[batch.batch_index]) ** 2).sum() / norm.atoms
        per_crystal_e = torch.zeros_like(target).index_add(0, batch.batch_index, e) / batch.num_atoms.to(e.dtype)
        per_crystal = ((per_crystal_e - target) ** 2).sum() / norm.crystals
        return per_atom + per_crystal, {"mean_energy": float(e.detach().float().mean())}

    def forward(self, batch, norm=None):
        return self.loss(batch, norm)


def build(config: dict) -> LinearEnergy:
    return LinearEnergy(**config)


def load_mp20(n: int = 64):
    from pymatgen.core import Structure

    from data_pipeline.record import CrystalRecord

    records = []
    with gzip.open(SHARED / "mp_20" / "val.csv.gz", "rt") as handle:
        for row in csv.DictReader(handle):
            structure = Structure.from_str(row["cif"], fmt="cif")
            records.append(CrystalRecord.from_structure(
                structure, key=f"mp20:{row['material_id']}", source="mp20",
                formation_energy_per_atom=float(row["formation_energy_per_atom"])))
            if len(records) == n:
                break
    return records


class ListLoader:
    """Records split over ranks; batch k of rank r holds SIZES[(k + r) % len] crystals (uneven)."""

    SIZES = (3, 1, 4, 2)

    def __init__(self, records, *, rank=0, world_size=1, views=BatchViews(), seed=0, batches=6):
        self.records, self.rank, self.world_size = list(records), rank, world_size
        self.views, self.seed, self.batches = views, seed, batches
        self.epoch, self.position = 0, 0

    def plan(self, epoch: int, rank: int) -> list[list[int]]:
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.records))
        mine = order[rank::self.world_size]
        out, start = [], 0
        for k in range(self.batches):
            size = self.SIZES[(k + rank) % len(self.SIZES)]
            out.append([int(i) for i in np.take(mine, range(start, start + size), mode="wrap")])
            start += size
        return out

    def batches_per_epoch(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self):
        plan = self.plan(self.epoch, self.rank)
        while self.position < len(plan):
            indices = plan[self.position]
            self.position += 1
            yield collate([self.records[i] for i in indices], self.views)
        self.epoch, self.position = self.epoch + 1, 0


class Fixed:
    """Yields the given batches in order (ShardLoader API)."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]

    def set_epoch(self, epoch): self.position = 0
    def state_dict(self): return {"position": self.position}
    def load_state_dict(self, state): self.position = state["position"]
