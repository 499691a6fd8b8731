"""Records → CrystalBatch with the requested views (graph, token, PDD features)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from crystalfm_common.config import check_keys

from data_pipeline.load.batch import TOKEN_DIM, CrystalBatch
from data_pipeline.load.neighbors import NeighborRule, compute_neighbors
from data_pipeline.record import MAX_Z, SCALAR_LABELS, CrystalRecord, lattice_polar6


@dataclass(frozen=True)
class BatchViews:
    """What the loader builds for a model: a neighbour rule (graph view), tokens, PDD columns."""

    graph: NeighborRule | None = None
    tokens: bool = False
    pdd_k: int | None = None  # PDD with k neighbours → k + 1 columns per atom

    @classmethod
    def from_dict(cls, config: dict | None) -> "BatchViews":
        config = dict(config or {})
        check_keys(cls, config, "views")
        graph = config.pop("graph", None)
        if isinstance(graph, dict):
            graph = NeighborRule.from_dict(graph)
        return cls(graph=graph, **config)


def pdd_features(record: CrystalRecord, k: int) -> np.ndarray:
    """[N, k+1] per-atom pointwise distance distribution rows (average-minimum-distance).

    Column 0 (amd's weight column, 1/N for an uncollapsed PDD) is replaced by Z_i / ΣZ so the
    row also says which element sits there (the PDDFormer input); columns 1..k are the atom's
    sorted distances to its k nearest periodic neighbours (Å). `lexsort=False` keeps row i on atom i
    (amd sorts rows lexicographically by default, which would hand atoms other atoms' rows).
    Distances include the atom's own periodic images and exclude itself. amd JIT-compiles on its
    first call in a process (seconds): the loader warms it once per worker (`loader.warm_pdd`).
    """
    import amd

    periodic_set = amd.PeriodicSet(record.cart_coords, record.lattice, types=record.atomic_numbers)
    pdd = np.asarray(amd.PDD(periodic_set, k, lexsort=False, collapse=False), dtype=np.float64)
    z = record.atomic_numbers.astype(np.float64)
    pdd[:, 0] = z / z.sum()
    return pdd


def collate(records: Sequence[CrystalRecord], views: BatchViews = BatchViews(), dtype=torch.float32) -> CrystalBatch:
    num_atoms = np.array([r.num_atoms for r in records], dtype=np.int64)
    batch_index = np.repeat(np.arange(len(records)), num_atoms)
    out = CrystalBatch(
        keys=[r.key for r in records],
        atomic_numbers=torch.from_numpy(np.concatenate([r.atomic_numbers for r in records])),
        frac_coords=torch.from_numpy(np.concatenate([r.frac_coords for r in records])).to(dtype),
        lattice=torch.from_numpy(np.stack([r.lattice for r in records])).to(dtype),
        num_atoms=torch.from_numpy(num_atoms),
        batch_index=torch.from_numpy(batch_index),
    )
    if views.graph is not None:
        _add_graph_view(out, records, num_atoms, views.graph, dtype)
    if views.pdd_k is not None:
        out.pdd = torch.from_numpy(np.concatenate([pdd_features(r, views.pdd_k) for r in records])).to(dtype)
    if views.tokens:
        _add_token_view(out, records, num_atoms, dtype)
    out.labels = _labels(records, dtype)
    return out


def _add_graph_view(out, records, num_atoms, rule, dtype):
    starts = np.concatenate([[0], np.cumsum(num_atoms)[:-1]])
    src, dst, shift = [], [], []
    for record, start in zip(records, starts):
        nl = compute_neighbors(record.frac_coords, record.lattice, rule)
        src.append(nl.src + start)
        dst.append(nl.dst + start)
        shift.append(nl.shift)
    dst_all = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    counts = np.bincount(dst_all, minlength=int(num_atoms.sum()))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    out.edge_src = torch.from_numpy(np.concatenate(src) if src else np.zeros(0, np.int64))
    out.edge_dst = torch.from_numpy(dst_all)
    out.edge_shift = torch.from_numpy(np.concatenate(shift) if shift else np.zeros((0, 3))).to(dtype)
    out.csr_offsets = torch.from_numpy(offsets)


def _add_token_view(out, records, num_atoms, dtype):
    """tokens [B, L, 109] = [frac (3) ‖ one-hot(Z) (100) ‖ polar6 (6)], zero on padding; mask [B, L]."""
    longest = int(num_atoms.max()) if len(num_atoms) else 0
    mask = np.arange(longest)[None, :] < num_atoms[:, None]  # [B, L]
    crystal, slot = np.nonzero(mask)  # [N] each, in atom concatenation order
    numbers = np.concatenate([r.atomic_numbers for r in records]) if records else np.zeros(0, np.int64)
    if len(numbers) and (numbers.min() < 1 or numbers.max() > MAX_Z):
        bad = next(r for r in records if r.atomic_numbers.min() < 1 or r.atomic_numbers.max() > MAX_Z)
        raise ValueError(f"{bad.key}: atomic numbers must be in 1..{MAX_Z} for the token view")
    tokens = np.zeros((len(records), longest, TOKEN_DIM), dtype=np.float64)
    tokens[crystal, slot, :3] = np.concatenate([r.frac_coords for r in records]) if records else 0.0
    tokens[crystal, slot, 3 + numbers - 1] = 1.0
    polar = lattice_polar6(np.stack([r.lattice for r in records])) if records else np.zeros((0, 6))  # [B, 6]
    tokens[crystal, slot, 3 + MAX_Z :] = polar[crystal]
    out.tokens = torch.from_numpy(tokens).to(dtype)
    out.token_mask = torch.from_numpy(mask)


def _labels(records, dtype) -> dict[str, torch.Tensor]:
    labels: dict[str, torch.Tensor] = {}
    names = list(SCALAR_LABELS) + sorted({k for r in records for k in r.properties})
    for name in names:
        values = [getattr(r, name, None) if name in SCALAR_LABELS else r.properties.get(name) for r in records]
        if any(v is not None for v in values):
            labels[name] = torch.tensor([np.nan if v is None else v for v in values], dtype=dtype)
    if any(r.forces is not None for r in records):
        forces = [r.forces if r.forces is not None else np.full((r.num_atoms, 3), np.nan) for r in records]
        labels["forces"] = torch.from_numpy(np.concatenate(forces)).to(dtype)
    if any(r.stress is not None for r in records):
        labels["stress"] = torch.from_numpy(
            np.stack([r.stress if r.stress is not None else np.full((3, 3), np.nan) for r in records])
        ).to(dtype)
    return labels
