"""Records → CrystalBatch with the requested views (graph, token, PDD features)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from crystalfm_common.config import check_keys

from data_pipeline.load.batch import TOKEN_DIM, CrystalBatch
from data_pipeline.load.neighbors import NeighborRule, compute_neighbors
from data_pipeline.record import MAX_Z, SCALAR_LABELS, CrystalRecord, lattice_polar6, pdd_features, record_pdd, with_pdd

__all__ = ["BatchViews", "NeighborCache", "collate", "distinct_lengths", "pdd_features", "record_pdd", "with_pdd"]


@dataclass(frozen=True)
class BatchViews:
    """What the loader builds for a model: a neighbour rule (graph view), tokens, PDD columns."""

    graph: NeighborRule | None = None
    tokens: bool = False
    pdd_k: int | None = None  # PDD with k neighbours → k + 1 columns per atom
    distinct_lengths: bool = True  # graph view: also the table of distinct edge lengths

    @classmethod
    def from_dict(cls, config: dict | None) -> "BatchViews":
        config = dict(config or {})
        check_keys(cls, config, "views")
        graph = config.pop("graph", None)
        if isinstance(graph, dict):
            graph = NeighborRule.from_dict(graph)
        return cls(graph=graph, **config)


class NeighborCache:
    """Neighbour lists computed once per crystal for one rule and reused by every later batch
    (a fine-tune trains many epochs over the same records). Keyed by record key; an entry is used
    only while the record's lattice and coordinates are the ones it was computed from."""

    def __init__(self, rule: NeighborRule, records: Sequence[CrystalRecord] = ()):
        self.rule = rule
        self._lists: dict[str, tuple[np.ndarray, np.ndarray, NeighborList]] = {}
        for record in records:
            self.get(record)

    def __len__(self) -> int:
        return len(self._lists)

    def get(self, record: CrystalRecord) -> NeighborList:
        entry = self._lists.get(record.key)
        if entry is not None and np.array_equal(entry[0], record.lattice) and np.array_equal(entry[1], record.frac_coords):
            return entry[2]
        nl = compute_neighbors(record.frac_coords, record.lattice, self.rule)
        self._lists[record.key] = (record.lattice, record.frac_coords, nl)
        return nl


def collate(records: Sequence[CrystalRecord], views: BatchViews = BatchViews(), dtype=torch.float32,
            neighbors: NeighborCache | None = None) -> CrystalBatch:
    """Records → batch with `views`. PDD rows the records carry are used (else computed);
    `neighbors`, a cache for the same rule as `views.graph`, replaces the per-batch search."""
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
        if neighbors is not None and neighbors.rule != views.graph:
            raise ValueError(f"neighbour cache built for {neighbors.rule}, but the batch view asks for {views.graph}")
        search = neighbors.get if neighbors is not None else (
            lambda r: compute_neighbors(r.frac_coords, r.lattice, views.graph))
        _add_graph_view(out, records, num_atoms, search, dtype, views.distinct_lengths)
    if views.pdd_k is not None:
        out.pdd = torch.from_numpy(np.concatenate([record_pdd(r, views.pdd_k) for r in records])).to(dtype)
    if views.tokens:
        _add_token_view(out, records, num_atoms, dtype)
    out.labels = _labels(records, dtype)
    return out


def _add_graph_view(out, records, num_atoms, search, dtype, distinct):
    starts = np.concatenate([[0], np.cumsum(num_atoms)[:-1]])
    src, dst, shift, dist = [], [], [], []
    for record, start in zip(records, starts):
        nl = search(record)
        src.append(nl.src + start)
        dst.append(nl.dst + start)
        shift.append(nl.shift)
        dist.append(nl.distance)
    dst_all = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    counts = np.bincount(dst_all, minlength=int(num_atoms.sum()))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    out.edge_src = torch.from_numpy(np.concatenate(src) if src else np.zeros(0, np.int64))
    out.edge_dst = torch.from_numpy(dst_all)
    out.edge_shift = torch.from_numpy(np.concatenate(shift) if shift else np.zeros((0, 3))).to(dtype)
    out.csr_offsets = torch.from_numpy(offsets)
    if distinct:
        lengths, index = distinct_lengths(np.concatenate(dist) if dist else np.zeros(0))
        out.edge_lengths = torch.from_numpy(lengths).to(dtype)
        out.edge_length_index = torch.from_numpy(index)


# Edge lengths closer than this (Å) share one entry of the batch's length table: far below the
# float32 resolution of a length (~1e-7 relative) and far above float64 noise between
# symmetry-equivalent edges (~1e-14).
LENGTH_TOLERANCE = 1e-9


def distinct_lengths(distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [U] ascending, index [E]) with distance[e] ≈ lengths[index[e]].

    Sorted distances start a new entry where they step up by more than LENGTH_TOLERANCE (a run of
    smaller steps stays one entry: on MP-20 runs span at most ~2e-9 Å); each entry
    holds the smallest distance of its run, so the table depends on the set of distances only
    (not on the order of atoms or edges)."""
    order = np.argsort(distance, kind="stable")
    ascending = distance[order]
    starts = np.ones(len(distance), dtype=bool)
    starts[1:] = np.diff(ascending) > LENGTH_TOLERANCE
    index = np.empty(len(distance), dtype=np.int64)
    index[order] = np.cumsum(starts) - 1
    return ascending[starts], index


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
