"""PDDFormer-style periodic graph transformer: the default backbone.

Architecture (shapes: N atoms, E edges, B crystals, d = width):

    Z                       → Embedding(Z)                                   h  [N, d]
    PDD rows (loader)       → Linear(k+1 → d)                                p  [N, d]
    edge lengths |r_ij|     → RBF(−0.75/|r|; bins over [−4, 0]) → Linear → Softplus
                                                                             e  [U, d]
                              (once per distinct length of the batch; gathered to edges [E, d])
    repeat num_layers times:
        NodeAttentionLayer  h ← SiLU(h + U·Norm(O·Σ_j σ(q_i ⊙ (k_j + K(e_ij))) ⊙ (v_j + V(e_ij))))
        PDDGateBlock        p ← p + h;  a, g = split(Linear_{d→2d}(Norm(p)));  h ← h + W(A a ⊙ GELU(g))
                            (between attention layers only: conv, pdd, conv, ..., pdd, conv)
    per-atom latents h [N, d];  `readout` mean-pools them per crystal [B, d]

The graph is the loader's periodic k-nearest-neighbour graph (k=25 searched within 4 Å, cutoff
growing until every atom has k neighbours; candidates tied with the k-th are all kept), receiver-
sorted with CSR offsets; every neighbour sum
goes through `pretrain.kernels.gated_aggregate`, so the fused kernels replace the native path.
Every edge feature is a function of the edge length alone, so it is computed once per distinct
length of the batch (`blocks.edge_lengths`: the loader's length table; ~7× fewer rows than edges
on MP-20) and gathered per edge. When a gradient is wanted through the geometry, lengths are
recomputed per edge from lattice and coordinates (`batch.edge_vectors()`), so gradients reach
both. The PDD rows are constants of the loader (no gradient through them).

What follows the paper and what does not is written down in `pretrain/encoders/README.md`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.encoders.base import Encoder, register_encoder
from pretrain.encoders.atom_embedding import build_atom_embedding
from pretrain.encoders.blocks import GaussianRBF, edge_lengths, gather_edges, make_norm, model_dtype
from pretrain.kernels import CSRGraph, gated_aggregate, gated_aggregate_edge_mlp, gated_aggregate_edges


class EdgeEmbedding(nn.Module):
    """ComFormer/PDDFormer edge features: RBF of −c/|r| (a bounded, short-range-sharp transform), Linear, Softplus.

    length: [E] (or [U] distinct lengths) → [E, d] ([U, d])
    """

    def __init__(self, width: int, bins: int = 256, vmin: float = -4.0, vmax: float = 0.0, scale: float = 0.75):
        super().__init__()
        self.scale = scale
        self.rbf = GaussianRBF(vmin, vmax, bins)
        self.linear = nn.Linear(bins, width)

    def forward(self, length: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.linear(self.rbf(-self.scale / length.clamp(min=1e-6))))  # [E, d]


class NodeAttentionLayer(nn.Module):
    """PDDFormer/ComFormer node-wise graph attention in the form the aggregation kernels fuse.

    Message j → i: σ(q_i ⊙ (k_j + K(e_ij))) ⊙ (v_j + V(e_ij)), summed over the receiver's edges
    (`gated_aggregate`); K and V are two-layer MLPs of the edge features (the papers' key/value
    update MLPs, restricted to the edge part so the sum stays one fused kernel).
    h: [N, d], e: [E, d] — or [U, d] per distinct length with edge_index [E] mapping edges to rows — → [N, d]
    """

    def __init__(self, width: int, norm: str = "layer"):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.key_edge = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.value_edge = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.concat = nn.Linear(width, width)
        self.norm = make_norm(norm, width)
        self.update = nn.Linear(width, width)
        # gated_aggregate divides the per-channel logit by √d (a dot-product scaling); the papers
        # normalise the logits instead, so undo it and keep the gates O(1) at initialisation.
        self.gate_scale = math.sqrt(width)

    def forward(
        self, h: torch.Tensor, e: torch.Tensor, graph: CSRGraph, edge_index: torch.Tensor | None = None,
        embed: nn.Module | None = None, fused: bool = False, edge_count: torch.Tensor | None = None,
    ):
        """With `embed`, e is the raw lengths [E] and embed(lengths) runs inside the fused op per chunk.
        fused: the K, V edge-MLP rows are gathered (or computed) inside the aggregation, no E×d tensor;
        edge_count [E]: multiplicities of merged identical edges (`CSRGraph.merge_parallel`)."""
        q = self.query(h) * self.gate_scale  # [N, d]
        k, v = self.key(h), self.value(h)  # [N, d]
        if fused and embed is None:  # tables [U, d] gathered inside the kernel
            m = gated_aggregate_edges(
                q, k, v, self.key_edge(e), self.value_edge(e), edge_index, graph, edge_count
            )  # [N, d]
            return F.silu(h + self.update(self.norm(self.concat(m))))  # [N, d]
        if fused:  # per-edge lengths: RBF → Linear → Softplus → K, V MLPs per chunk inside the op

            def edge_fn(length):
                x = embed(length)  # [Ec, d]
                return self.key_edge(x), self.value_edge(x)  # [Ec, d] each

            params = [*embed.parameters(), *self.key_edge.parameters(), *self.value_edge.parameters()]
            m = gated_aggregate_edge_mlp(q, k, v, e, edge_fn, params, graph)  # [N, d]
            return F.silu(h + self.update(self.norm(self.concat(m))))  # [N, d]
        if embed is not None:
            e = embed(e)  # [E, d]
        k_e = gather_edges(self.key_edge(e), edge_index)  # [E, d]
        v_e = gather_edges(self.value_edge(e), edge_index)  # [E, d]
        m = gated_aggregate(q, k, v, k_e, v_e, graph)  # [N, d]
        return F.silu(h + self.update(self.norm(self.concat(m))))  # [N, d]


class PDDGateBlock(nn.Module):
    """PDDFormer's PDD block: a GELU-gated update of the node state by a PDD stream.

    The PDD stream p first absorbs the node state (p ← p + h), is normalised, expanded to 2d and
    split into a value half and a GELU gate half; their product updates h residually.
    h, p: [N, d] → (h, p) [N, d]
    """

    def __init__(self, width: int, norm: str = "layer", dropout: float = 0.0):
        super().__init__()
        self.norm = make_norm(norm, width)
        self.expand = nn.Linear(width, 2 * width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = p + h  # [N, d]
        a, g = self.expand(self.norm(p)).chunk(2, dim=-1)  # [N, d] each
        h = h + self.out(self.value(a) * self.dropout(F.gelu(g)))  # [N, d]
        return h, p


@register_encoder("pddformer")
class PDDFormerEncoder(Encoder):
    """PDDFormer-style encoder: kNN periodic graph attention interleaved with PDD gating blocks.

    Args:
        width: hidden size d (paper: 256).
        num_layers: node attention layers (paper code: 3; ours 4); num_layers − 1 PDD blocks sit between them.
        rbf_bins: RBF bins for the −0.75/|r| edge transform over `rbf_range` (default 256 over [−4, 0]).
        pdd_k: PDD neighbours; the loader must build `batch.pdd` with k = pdd_k ([N, pdd_k + 1]).
        norm: 'layer' (default: per-atom, batch-independent) or 'batch' (the paper's BatchNorm1d).
        atom_features: 'learned' (a free row per element, default) or 'magpie' (element properties
            + a zero-initialised learned row: atom_embedding.py; better with few labels).
        dropout: dropout in the PDD gate (paper: 0.1; pretraining default 0).
        neighbor_rule: overrides of the loader's neighbour rule (k, cutoff, lattice_self_edges).
        activation_checkpointing: recompute each layer's E×d edge activations in the backward pass
            instead of storing them (less memory for large cells, about one more forward of compute).
        edge_fusion: compute the K, V edge features inside the fused aggregation (default): per-
            distinct-length tables gathered in the kernel, or, without the loader's length table, the
            whole RBF → MLP chain per chunk of edges. False: the unfused E×d path. Same weights.
    Input: a CrystalBatch with the graph view and `pdd`. Output: per-atom latents [N, width].
    """

    needs_graph = True
    needs_pdd = True
    pdd_k = 92
    neighbor_rule = {"kind": "knn", "k": 25, "cutoff": 4.0, "lattice_self_edges": False}

    def __init__(
        self,
        width: int = 256,
        num_layers: int = 4,
        rbf_bins: int = 256,
        rbf_range: tuple[float, float] = (-4.0, 0.0),
        pdd_k: int = 92,
        norm: str = "layer",
        dropout: float = 0.0,
        max_z: int = 100,
        atom_features: str = "learned",
        neighbor_rule: dict | None = None,
        activation_checkpointing: bool = False,
        edge_fusion: bool = True,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"pddformer needs num_layers >= 1, got {num_layers}")
        self.out_dim = width
        self.pdd_k = pdd_k
        self.activation_checkpointing = activation_checkpointing
        self.edge_fusion = edge_fusion
        self.neighbor_rule = {**type(self).neighbor_rule, **(neighbor_rule or {})}
        self.atom_embedding = build_atom_embedding(atom_features, max_z, width)
        self.pdd_embedding = nn.Linear(pdd_k + 1, width)
        self.edge_embedding = EdgeEmbedding(width, rbf_bins, *rbf_range)
        self.attention = nn.ModuleList(NodeAttentionLayer(width, norm) for _ in range(num_layers))
        self.pdd_blocks = nn.ModuleList(PDDGateBlock(width, norm, dropout) for _ in range(num_layers - 1))

    def pdd_input(self, batch, dtype: torch.dtype) -> torch.Tensor:
        """[N, k+1] PDD rows with the weight column made cell-size invariant.

        The loader's column 0 is Z_i / ΣZ over the cell, which halves in a 2×1×1 supercell; times
        the cell's atom count it becomes Z_i / mean(Z), the same for every choice of cell."""
        pdd = batch.pdd
        if pdd is None:
            raise ValueError(
                f"pddformer needs PDD rows: build the batch with BatchViews(pdd_k={self.pdd_k}) (see encoder.pdd_k)"
            )
        if pdd.shape[-1] != self.pdd_k + 1:
            raise ValueError(
                f"pddformer was built with pdd_k={self.pdd_k} ({self.pdd_k + 1} columns) but batch.pdd has "
                f"{pdd.shape[-1]} columns: build the batch with BatchViews(pdd_k={self.pdd_k})"
            )
        pdd = pdd.to(dtype)
        atoms_in_cell = batch.num_atoms[batch.batch_index].to(dtype)  # [N]
        return torch.cat([pdd[:, :1] * atoms_in_cell.unsqueeze(-1), pdd[:, 1:]], dim=-1)  # [N, k+1]

    def forward(self, batch) -> torch.Tensor:
        dtype = model_dtype(self)
        graph = CSRGraph.from_batch(batch)
        h = self.atom_embedding(batch.atomic_numbers)  # [N, d]
        p = self.pdd_embedding(self.pdd_input(batch, dtype))  # [N, d]
        lengths, edge_index = edge_lengths(batch, dtype)  # [U] distinct lengths + [E] map, or [E] and None
        # the edge MLPs run once per distinct length ([U, d]); fused without a table, inside each layer
        per_chunk = self.edge_fusion and edge_index is None
        e, embed = (lengths, self.edge_embedding) if per_chunk else (self.edge_embedding(lengths), None)
        count = None
        if self.edge_fusion and edge_index is not None:
            # identical messages (an image of one sender at one distance) are summed once, times their count
            graph, edge_index, count = graph.merge_parallel(edge_index, lengths.numel())  # E' ≈ E / 1.5 on MP-20
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(self.attention):
            args = (h, e, graph, edge_index, embed, self.edge_fusion, count)
            if recompute:
                h = checkpoint(layer, *args, use_reentrant=False)  # [N, d]
            else:
                h = layer(*args)  # [N, d]
            if i < len(self.pdd_blocks):
                h, p = self.pdd_blocks[i](h, p)
        return h  # [N, d]
