"""Matformer-style periodic graph transformer (Yan et al., NeurIPS 2022), an alternative backbone.

Architecture (shapes: N atoms, E edges, H heads, d = width, each head d wide as in Matformer):

    Z                  → Embedding(Z)                                          h [N, d]
    |r_ij|             → RBF(bins over [0, 8] Å) → Linear → Softplus → Linear  e [U, d]
                         (once per distinct length of the batch, gathered per edge; see blocks.edge_lengths)
    repeat num_layers times (MatformerLayer):
        q, k, v = Linear(h) → [N, H, d];   k_e, v_e = Linear(e) → [E, H, d]
        aggregation='gated'     m_i = Σ_j σ(q_i ⊙ (k_j + k_e)) ⊙ (v_j + v_e)   (per channel; Matformer's gate)
        aggregation='attention' m_i = Σ_j softmax_j(<q_i, k_j + k_e>/√d) (v_j + v_e)   (per head)
        h ← Softplus(h + Norm(Linear_{Hd→d}(m)))
    per-atom latents h [N, d];  `readout` mean-pools them per crystal [B, d]

Graph: the loader's 12-nearest-neighbour periodic graph searched within 8 Å (ties at the 12th kept). Every neighbour sum goes
through `pretrain.kernels` (gated_aggregate / neighbor_attention). Differences from the paper are in
`pretrain/encoders/README.md`.
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
from pretrain.kernels import CSRGraph, gated_aggregate, gated_aggregate_edge_mlp, gated_aggregate_edges, neighbor_attention


class DistanceEmbedding(nn.Module):
    """Matformer's edge features: Gaussian RBF of the distance, Linear, Softplus, Linear.  length: [E] → [E, d]"""

    def __init__(self, width: int, bins: int = 128, cutoff: float = 8.0):
        super().__init__()
        self.rbf = GaussianRBF(0.0, cutoff, bins)
        self.mlp = nn.Sequential(nn.Linear(bins, width), nn.Softplus(), nn.Linear(width, width))

    def forward(self, length: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.rbf(length))  # [E, d]


class MatformerLayer(nn.Module):
    """One Matformer node update. h: [N, d], e: [E, d] (or [U, d] with edge_index [E]) → [N, d]"""

    def __init__(self, width: int, heads: int = 4, aggregation: str = "gated", norm: str = "layer"):
        super().__init__()
        if aggregation not in ("gated", "attention"):
            raise ValueError(f"matformer aggregation must be 'gated' or 'attention', got {aggregation!r}")
        self.heads, self.width, self.aggregation = heads, width, aggregation
        inner = heads * width
        self.query = nn.Linear(width, inner)
        self.key = nn.Linear(width, inner)
        self.value = nn.Linear(width, inner)
        self.key_edge = nn.Linear(width, inner)
        self.value_edge = nn.Linear(width, inner)
        self.concat = nn.Linear(inner, width)
        self.norm = make_norm(norm, width)
        # gated_aggregate scales the per-channel logit by 1/√(Hd); Matformer normalises the logits
        # (LayerNorm) instead, so undo the scaling to keep gates O(1) at initialisation.
        self.gate_scale = math.sqrt(inner)

    def forward(
        self, h: torch.Tensor, e: torch.Tensor, graph: CSRGraph, edge_index: torch.Tensor | None = None,
        embed: nn.Module | None = None, fused: bool = False, edge_count: torch.Tensor | None = None,
    ):
        """e: edge features [U, d] (rows per distinct length, edge_index [E]) or [E, d]; with `embed`,
        e is the raw lengths [E] and embed(lengths) → [E, d] runs inside the fused op, per chunk.
        fused: the edge linears' rows are gathered inside the aggregation (no E×H·d tensor);
        edge_count [E]: multiplicities of merged identical edges (`CSRGraph.merge_parallel`), gated only."""
        n, H, d = h.shape[0], self.heads, self.width
        q, k, v = self.query(h), self.key(h), self.value(h)  # [N, H·d]
        if fused and self.aggregation == "gated":
            if embed is None:  # tables [U, H·d]: the gather happens inside the kernel
                m = gated_aggregate_edges(
                    q * self.gate_scale, k, v, self.key_edge(e), self.value_edge(e), edge_index, graph, edge_count
                )  # [N, H·d]
            else:  # per-edge lengths: RBF → MLP → key/value linears per chunk inside the op

                def edge_fn(length):
                    x = embed(length)  # [Ec, d]
                    return self.key_edge(x), self.value_edge(x)  # [Ec, H·d] each

                params = [*embed.parameters(), *self.key_edge.parameters(), *self.value_edge.parameters()]
                m = gated_aggregate_edge_mlp(q * self.gate_scale, k, v, e, edge_fn, params, graph)  # [N, H·d]
            return F.softplus(h + self.norm(self.concat(m)))  # [N, d]
        if embed is not None:
            e = embed(e)  # [E, d]
        k_e = gather_edges(self.key_edge(e), edge_index)  # [E, H·d]
        v_e = gather_edges(self.value_edge(e), edge_index)  # [E, H·d]
        if self.aggregation == "gated":
            m = gated_aggregate(q * self.gate_scale, k, v, k_e, v_e, graph)  # [N, H·d]
        else:
            m = neighbor_attention(
                q.view(n, H, d), k.view(n, H, d), v.view(n, H, d),
                k_e.view(-1, H, d), v_e.view(-1, H, d), graph,
            ).reshape(n, H * d)  # [N, H·d]
        return F.softplus(h + self.norm(self.concat(m)))  # [N, d]


@register_encoder("matformer")
class MatformerEncoder(Encoder):
    """Matformer-style encoder.

    Args:
        width: hidden size d (Matformer: 128).  num_layers: 5.  heads: 4 (each d wide, as in Matformer).
        rbf_bins: 128 Gaussians over [0, rbf_cutoff = 8] Å.
        aggregation: 'gated' (Matformer's sigmoid gate, default) or 'attention' (softmax per head).
        norm: 'layer' (default, batch-independent) or 'batch' (the paper's BatchNorm1d).
        atom_features: 'learned' (a free row per element, default) or 'magpie' (element properties
            + a zero-initialised learned row: atom_embedding.py; better with few labels).
        neighbor_rule: overrides of the loader's neighbour rule (k, cutoff, lattice_self_edges).
        activation_checkpointing: recompute each layer's activations in the backward pass (less memory).
        edge_fusion: compute the edge features inside the fused aggregation (gated only; default):
            per-distinct-length tables gathered in the kernel, or, without the loader's length table,
            the whole RBF → MLP chain per chunk of edges. False: the unfused E×d path. Same weights.
    Input: a CrystalBatch with the graph view. Output: per-atom latents [N, width].
    """

    needs_graph = True
    neighbor_rule = {"kind": "knn", "k": 12, "cutoff": 8.0, "lattice_self_edges": False}

    def __init__(
        self,
        width: int = 128,
        num_layers: int = 5,
        heads: int = 4,
        rbf_bins: int = 128,
        rbf_cutoff: float = 8.0,
        aggregation: str = "gated",
        norm: str = "layer",
        max_z: int = 100,
        atom_features: str = "learned",
        neighbor_rule: dict | None = None,
        activation_checkpointing: bool = False,
        edge_fusion: bool = True,
    ):
        super().__init__()
        self.out_dim = width
        self.activation_checkpointing = activation_checkpointing
        self.edge_fusion = edge_fusion
        self.neighbor_rule = {**type(self).neighbor_rule, **(neighbor_rule or {})}
        self.atom_embedding = build_atom_embedding(atom_features, max_z, width)
        self.edge_embedding = DistanceEmbedding(width, rbf_bins, rbf_cutoff)
        self.layers = nn.ModuleList(MatformerLayer(width, heads, aggregation, norm) for _ in range(num_layers))

    def forward(self, batch) -> torch.Tensor:
        dtype = model_dtype(self)
        graph = CSRGraph.from_batch(batch)
        h = self.atom_embedding(batch.atomic_numbers)  # [N, d]
        lengths, edge_index = edge_lengths(batch, dtype)  # [U] distinct lengths + [E] map, or [E] and None
        # the edge MLPs run once per distinct length ([U, d]); fused without a table, inside each layer
        per_chunk = self.edge_fusion and edge_index is None
        e, embed = (lengths, self.edge_embedding) if per_chunk else (self.edge_embedding(lengths), None)
        count = None
        if self.edge_fusion and edge_index is not None and self.layers[0].aggregation == "gated":
            # identical messages (an image of one sender at one distance) are summed once, times their count
            graph, edge_index, count = graph.merge_parallel(edge_index, lengths.numel())  # E' ≈ E / 1.4 on MP-20
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            args = (h, e, graph, edge_index, embed, self.edge_fusion, count)
            if recompute:
                h = checkpoint(layer, *args, use_reentrant=False)  # [N, d]
            else:
                h = layer(*args)  # [N, d]
        return h
