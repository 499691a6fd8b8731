"""Crys-JEPA's context view: the same crystal, moved.

`augment_batch` applies, per crystal, a random fractional translation t ~ U[0, 1)³ (coordinates
wrapped back into the cell), a Haar-uniform rotation R (Shoemake's method, u ~ U[0, 1)³) acting on
the lattice as L → L Rᵀ, and a random re-ordering of the atoms (the reference code re-sorts the
translated atoms, which scrambles their order). The result describes the same crystal — a test
checks it with pymatgen's StructureMatcher — and `params` [B, 6] = (t ‖ u) are what the JEPA
predictor is conditioned on.

Every view the batch carries is updated consistently: the graph view's image shifts absorb the
wrap of each atom (s' = s + k_src − k_dst) and edges are re-sorted by receiver (the table of
distinct edge lengths is unchanged, its per-edge index re-sorted with them); PDD rows, forces
(rotated too) and stress (R S Rᵀ) follow their atoms; the token view is rebuilt.

On the token view the rotation acts trivially: its lattice features are the rotation-invariant
polar factor S of L (S(L Rᵀ) = S(L)) and fractional coordinates do not change under rotation, so
the context tokens differ from the original ones only by the translation and the order. The
reference code instead writes upper-triangle(S Rᵀ) into the context tokens, a rotated, no longer
symmetric matrix of which the upper triangle keeps only part — `context_lattice='rotated_triu'`
reproduces that; the default 'polar' keeps the token view's meaning. The rotation still matters
for any encoder that reads Cartesian geometry from `batch.lattice`.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from data_pipeline.record import MAX_Z
from pretrain.objectives.dit import pad_atoms
from pretrain.objectives.geometry import polar_matrix, polar6, random_rotation, upper_triangle

CONTEXT_LATTICE = ("polar", "rotated_triu")


def random_translation(n: int, generator: torch.Generator | None = None, device=None, dtype=torch.float32):
    """[n, 3] fractional translations, uniform on the unit cell."""
    return torch.rand(n, 3, generator=generator, device=device, dtype=dtype)


def random_permutation(batch, generator: torch.Generator | None = None) -> torch.Tensor:
    """[N] new → old atom index, shuffling atoms within each crystal (crystals stay contiguous)."""
    noise = torch.rand(batch.num_nodes, generator=generator, device=batch.batch_index.device, dtype=torch.float64)
    return torch.argsort(batch.batch_index.to(torch.float64) + noise)


def augment_batch(
    batch,
    translation: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
    permutation: torch.Tensor | None = None,
    context_lattice: str = "polar",
):
    """The moved copy of `batch`: translation [B, 3] (fractional), rotation [B, 3, 3], permutation [N]
    (new → old, crystals contiguous); None skips that part."""
    if context_lattice not in CONTEXT_LATTICE:
        raise ValueError(f"context_lattice must be one of {CONTEXT_LATTICE}, got {context_lattice!r}")
    n, bi = batch.num_nodes, batch.batch_index
    dtype = batch.frac_coords.dtype

    # translate and wrap: f' = f + t − k, k = floor(f + t)
    frac = batch.frac_coords
    wrap = torch.zeros_like(frac)
    if translation is not None:
        moved = frac + translation.to(dtype)[bi]  # [N, 3]
        wrap = torch.floor(moved)
        frac = moved - wrap

    lattice = batch.lattice
    if rotation is not None:
        lattice = lattice @ rotation.to(lattice.dtype).transpose(-1, -2)  # L Rᵀ: [B, 3, 3]

    perm = torch.arange(n, device=bi.device) if permutation is None else permutation  # new → old
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=perm.device)  # old → new

    changes = {
        "atomic_numbers": batch.atomic_numbers[perm],
        "frac_coords": frac[perm],
        "lattice": lattice,
    }
    if batch.pdd is not None:
        changes["pdd"] = batch.pdd[perm]
    labels = dict(batch.labels)
    if "forces" in labels:
        forces = labels["forces"]
        if rotation is not None:
            forces = torch.einsum("ni,nji->nj", forces, rotation.to(forces.dtype)[bi])  # R f per atom
        labels["forces"] = forces[perm]
    if "stress" in labels and rotation is not None:
        r = rotation.to(labels["stress"].dtype)
        labels["stress"] = r @ labels["stress"] @ r.transpose(-1, -2)
    changes["labels"] = labels

    if batch.edge_src is not None:
        shift = batch.edge_shift + wrap[batch.edge_src] - wrap[batch.edge_dst]  # keeps every edge vector
        src, dst = inverse[batch.edge_src], inverse[batch.edge_dst]
        order = torch.argsort(dst, stable=True)
        counts = torch.bincount(dst, minlength=n)
        offsets = torch.zeros(n + 1, dtype=torch.long, device=dst.device)
        offsets[1:] = torch.cumsum(counts, 0)
        changes.update(edge_src=src[order], edge_dst=dst[order], edge_shift=shift[order], csr_offsets=offsets)
        if batch.edge_length_index is not None:  # lengths do not move: the table stays, its index follows the edges
            changes["edge_length_index"] = batch.edge_length_index[order]

    if batch.tokens is not None:
        if context_lattice == "rotated_triu" and rotation is not None:
            lattice_features = upper_triangle(polar_matrix(batch.lattice) @ rotation.to(dtype).transpose(-1, -2))
        else:
            lattice_features = polar6(lattice)  # [B, 6] (equal to the original's: S is rotation-invariant)
        onehot = F.one_hot((changes["atomic_numbers"] - 1).clamp(min=0), MAX_Z).to(batch.tokens.dtype)
        onehot = onehot * (changes["atomic_numbers"] > 0).unsqueeze(-1).to(onehot.dtype)  # masked species stay hidden
        per_atom = torch.cat([changes["frac_coords"], onehot, lattice_features.to(dtype)[bi]], dim=-1)  # [N, 109]
        tokens, mask = pad_atoms(per_atom.to(batch.tokens.dtype), bi, batch.num_atoms)
        changes.update(tokens=tokens, token_mask=mask)
    return replace(batch, **changes)


def random_context(batch, generator: torch.Generator | None = None, translate=True, rotate=True, permute=True,
                   context_lattice: str = "polar"):
    """(context batch, params [B, 6] = translation ‖ Shoemake uniforms); a skipped part has zeros."""
    b, device, dtype = batch.num_crystals, batch.frac_coords.device, batch.frac_coords.dtype
    t = random_translation(b, generator, device, dtype) if translate else None
    if rotate:
        r, u = random_rotation(b, generator, device, dtype)
    else:
        r, u = None, None
    perm = random_permutation(batch, generator) if permute else None
    view = augment_batch(batch, t, r, perm, context_lattice)
    zeros = torch.zeros(b, 3, device=device, dtype=dtype)
    params = torch.cat([t if t is not None else zeros, u if u is not None else zeros], dim=-1)  # [B, 6]
    return view, params
