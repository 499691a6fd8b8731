"""The batch a model sees: built by the loader from records, never stored twice.

One `CrystalBatch` carries the per-crystal basics plus one or both views:

graph view (for periodic graph encoders)
    atoms are concatenated over crystals; edges are sorted by receiver, with CSR offsets, so
    edge e of receiver i lies in [csr_offsets[i], csr_offsets[i+1]).
    The edge vector from receiver to sender is recomputed differentiably:
        r_e = pos[edge_src[e]] + edge_shift[e] @ lattice[crystal(e)] - pos[edge_dst[e]]
    and, as constants of the loader, the table of distinct edge lengths (`edge_lengths`,
    `edge_length_index`; see `pretrain.encoders.blocks.edge_lengths`).

token view (for transformers: JEPA encoder, DiT)
    tokens[b, j] = [frac coords (3) ‖ one-hot(Z) (MAX_Z=100) ‖ lattice polar factor (6)] = 109-d,
    padded to the longest crystal of the batch; token_mask marks real atoms.

Shapes below: B crystals, N atoms in all, E edges, L = longest crystal.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

TOKEN_DIM = 3 + 100 + 6


@dataclass
class CrystalBatch:
    keys: list[str]
    atomic_numbers: torch.Tensor  # [N] long
    frac_coords: torch.Tensor  # [N, 3]
    lattice: torch.Tensor  # [B, 3, 3] rows are lattice vectors (Å)
    num_atoms: torch.Tensor  # [B] long
    batch_index: torch.Tensor  # [N] long: crystal of each atom
    # graph view (None when not requested)
    edge_src: torch.Tensor | None = None  # [E] long, sender j
    edge_dst: torch.Tensor | None = None  # [E] long, receiver i (sorted ascending)
    edge_shift: torch.Tensor | None = None  # [E, 3] integer image offsets, in lattice units (float dtype)
    csr_offsets: torch.Tensor | None = None  # [N + 1] long
    # the batch's distinct edge lengths (Å, ascending; lengths within 1e-9 Å count as one) and the
    # length of each edge: |r_e| = edge_lengths[edge_length_index[e]]. Symmetric crystals repeat a
    # few lengths many times (MP-20, k=25: ~7 edges per distinct length), so an encoder whose edge
    # features depend on the length alone computes them once per distinct length.
    edge_lengths: torch.Tensor | None = None  # [U]
    edge_length_index: torch.Tensor | None = None  # [E] long
    pdd: torch.Tensor | None = None  # [N, k + 1] pointwise distance distribution rows (optional)
    # token view (None when not requested)
    tokens: torch.Tensor | None = None  # [B, L, TOKEN_DIM]
    token_mask: torch.Tensor | None = None  # [B, L] bool, True for real atoms
    # labels: scalar ones as [B] (NaN where missing), forces as [N, 3], stress as [B, 3, 3]
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    # True for a batch the loader added only so every rank runs the same number of steps (a copy
    # of a real batch): give it weight 0 (multiply its loss by `weight`, count none of its atoms).
    padding: bool = False

    @property
    def weight(self) -> float:
        """1.0 for a real batch, 0.0 for a padding batch."""
        return 0.0 if self.padding else 1.0

    @property
    def num_crystals(self) -> int:
        return int(self.num_atoms.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @property
    def num_edges(self) -> int:
        return 0 if self.edge_src is None else int(self.edge_src.shape[0])

    def cart_coords(self) -> torch.Tensor:
        """[N, 3] Cartesian positions (Å), in the batch's dtype even under autocast (which would
        lower this einsum to bf16 and round positions by ~0.02 Å in a 10 Å cell)."""
        with torch.autocast(self.frac_coords.device.type, enabled=False):
            return torch.einsum("ni,nij->nj", self.frac_coords, self.lattice[self.batch_index])

    def edge_vectors(self) -> torch.Tensor:
        """[E, 3] receiver → sender vectors (Å), differentiable in coords and lattice; in the
        batch's dtype even under autocast (see cart_coords)."""
        if self.edge_src is None:
            raise ValueError("this batch has no graph view: build it with a neighbour rule")
        pos = self.cart_coords()
        cell = self.lattice[self.batch_index[self.edge_dst]]
        with torch.autocast(pos.device.type, enabled=False):
            return pos[self.edge_src] + torch.einsum("ei,eij->ej", self.edge_shift, cell) - pos[self.edge_dst]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "CrystalBatch":
        """Move tensors to a device; floating tensors also to `dtype` when given."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, dtype=dtype if (dtype and value.is_floating_point()) else None)
            elif isinstance(value, dict):
                value = {
                    k: v.to(device, dtype=dtype if (dtype and v.is_floating_point()) else None) for k, v in value.items()
                }
            out[f.name] = value
        return CrystalBatch(**out)

    def pin_memory(self) -> "CrystalBatch":
        """Page-locked copies of every tensor (torch's DataLoader calls this with pin_memory=True)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.pin_memory()
            elif isinstance(value, dict):
                value = {k: v.pin_memory() for k, v in value.items()}
            out[f.name] = value
        return CrystalBatch(**out)
