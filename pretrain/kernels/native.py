"""Native PyTorch backend: gather per edge, build the E×d message, reduce with index_add.

This is the readable definition of every operation; the other backends must match it.
"""
from __future__ import annotations

import math

import torch

from pretrain.kernels.graph import CSRGraph


def gather_multiply_reduce(x: torch.Tensor, edge_weight: torch.Tensor, graph: CSRGraph, reduce: str = "sum"):
    """out_i = Σ_{e ∈ seg(i)} x[senders[e]] ⊙ w[e]   (or the mean over the segment; 0 when empty).

    x: [N, d]; edge_weight: [E, d] → [N, d]
    """
    messages = x[graph.senders] * edge_weight  # [E, d]
    out = torch.zeros(graph.num_nodes, x.shape[-1], dtype=messages.dtype, device=x.device)
    out = out.index_add(0, graph.receivers, messages)
    if reduce == "mean":
        out = out / graph.degree().clamp(min=1).to(out.dtype).unsqueeze(-1)
    elif reduce != "sum":
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    return out


def neighbor_attention(q, k, v, k_edge, v_edge, graph: CSRGraph):
    """Per-receiver softmax attention over neighbours, per head.

    q, k, v: [N, H, D] (q of the receiver; k, v of the sender); k_edge, v_edge: [E, H, D]
    k_ij = k[j] + k_edge[e],  v_ij = v[j] + v_edge[e]
    α_e = softmax over e ∈ seg(i) of <q[i], k_ij> / √D;   out_i = Σ_e α_e v_ij   → [N, H, D]
    A receiver with no edges gets 0.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    k_ij = k[graph.senders] + k_edge
    v_ij = v[graph.senders] + v_edge
    logits = (q[graph.receivers] * k_ij).sum(-1) * scale  # [E, H]
    seg_max = torch.full((graph.num_nodes, q.shape[1]), float("-inf"), dtype=logits.dtype, device=q.device)
    seg_max = seg_max.scatter_reduce(0, graph.receivers.unsqueeze(-1).expand_as(logits), logits, "amax")
    weights = torch.exp(logits - seg_max[graph.receivers].detach())
    denom = torch.zeros_like(seg_max, dtype=weights.dtype).index_add(0, graph.receivers, weights)
    alpha = weights / denom[graph.receivers]
    out = torch.zeros_like(q, dtype=v_ij.dtype).index_add(0, graph.receivers, alpha.unsqueeze(-1) * v_ij)
    return out


def gated_aggregate(q, k, v, k_edge, v_edge, graph: CSRGraph):
    """Sigmoid-gated sum used by Matformer/ComFormer-style layers (per channel, no softmax).

    q, k, v: [N, d]; k_edge, v_edge: [E, d]
    g_e = sigmoid(q[i] ⊙ (k[j] + k_edge[e]) / √d);   out_i = Σ_e g_e ⊙ (v[j] + v_edge[e])   → [N, d]
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    gate = torch.sigmoid(q[graph.receivers] * (k[graph.senders] + k_edge) * scale)
    messages = gate * (v[graph.senders] + v_edge)
    out = torch.zeros(graph.num_nodes, q.shape[-1], dtype=messages.dtype, device=q.device)
    return out.index_add(0, graph.receivers, messages)


def gated_aggregate_edges(q, k, v, k_table, v_table, edge_index, graph: CSRGraph, edge_count=None):
    """`gated_aggregate` whose edge features are rows of a table: edge e uses row edge_index[e].

    q, k, v: [N, d]; k_table, v_table: [R, d] (R distinct edge lengths, say); edge_index: [E] in [0, R),
    or None when the table is per edge (R = E, row e); edge_count: [E] multiplicity of each edge
    (identical edges merged, `CSRGraph.merge_parallel`), None for 1.
    k_e = k_table[edge_index[e]], v_e = v_table[edge_index[e]];
    out_i = Σ_e c_e σ(q_i ⊙ (k_j + k_e)/√d) ⊙ (v_j + v_e)   → [N, d]   (c_e = 1: `gated_aggregate`)
    """
    k_edge = k_table if edge_index is None else k_table.index_select(0, edge_index)  # [E, d]
    v_edge = v_table if edge_index is None else v_table.index_select(0, edge_index)
    if edge_count is None:
        return gated_aggregate(q, k, v, k_edge, v_edge, graph)
    scale = 1.0 / math.sqrt(q.shape[-1])
    gate = torch.sigmoid(q[graph.receivers] * (k[graph.senders] + k_edge) * scale)
    messages = gate * (v[graph.senders] + v_edge) * edge_count.to(gate.dtype).unsqueeze(-1)
    out = torch.zeros(graph.num_nodes, q.shape[-1], dtype=messages.dtype, device=q.device)
    return out.index_add(0, graph.receivers, messages)


def gated_aggregate_edge_mlp(q, k, v, edge_input, edge_fn, params, graph: CSRGraph, edge_index=None):
    """`gated_aggregate` whose edge features are computed from edge geometry by a small MLP.

    q, k, v: [N, d]; edge_input: [R, ...] per-row geometry (the edge length, [E] or [E, 1]; or one
    row per distinct length with edge_index [E]); edge_fn(rows) → (k_rows, v_rows) [R, d] each (the
    encoder's RBF → Linear → activation → … chain); params: the tensors edge_fn reads (its weights;
    the fused backends return their gradients, autograd here reaches them directly).
    k_e, v_e = edge_fn(edge_input)[.][edge_index[e]], then `gated_aggregate` → [N, d]
    """
    k_table, v_table = edge_fn(edge_input)  # [R, d] each
    return gated_aggregate_edges(q, k, v, k_table, v_table, edge_index, graph)
