"""Reference backend: the unfused torch-scatter composition most GNN codebases use.

gather per edge (index_select) → build the E×d message → torch_scatter.scatter into receivers,
with autograd through every step. It is the baseline the benchmark measures ratios against and a
second, independent implementation for the correctness tests. Needs the optional `torch_scatter`.
"""
from __future__ import annotations

import math

import torch

from pretrain.kernels.graph import CSRGraph

try:
    import torch_scatter

    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # not installed, or built against another torch
    torch_scatter = None
    _IMPORT_ERROR = exc


def available() -> bool:
    return torch_scatter is not None


def unavailable_reason() -> str:
    return f"torch_scatter could not be imported ({_IMPORT_ERROR!r}); pip install --no-build-isolation torch-scatter"


def _require():
    if torch_scatter is None:
        raise RuntimeError(unavailable_reason())


def gather_multiply_reduce(x, edge_weight, graph: CSRGraph, reduce: str = "sum"):
    _require()
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    messages = x.index_select(0, graph.senders) * edge_weight  # [E, d]
    return torch_scatter.scatter(messages, graph.receivers, dim=0, dim_size=graph.num_nodes, reduce=reduce)


def neighbor_attention(q, k, v, k_edge, v_edge, graph: CSRGraph):
    _require()
    k_ij = k.index_select(0, graph.senders) + k_edge  # [E, H, D]
    v_ij = v.index_select(0, graph.senders) + v_edge
    logits = (q.index_select(0, graph.receivers) * k_ij).sum(-1) / math.sqrt(q.shape[-1])  # [E, H]
    alpha = torch_scatter.scatter_softmax(logits, graph.receivers, dim=0, dim_size=graph.num_nodes)
    return torch_scatter.scatter(alpha.unsqueeze(-1) * v_ij, graph.receivers, dim=0, dim_size=graph.num_nodes)


def gated_aggregate(q, k, v, k_edge, v_edge, graph: CSRGraph):
    _require()
    k_ij = k.index_select(0, graph.senders) + k_edge  # [E, d]
    v_ij = v.index_select(0, graph.senders) + v_edge
    gate = torch.sigmoid(q.index_select(0, graph.receivers) * k_ij / math.sqrt(q.shape[-1]))
    return torch_scatter.scatter(gate * v_ij, graph.receivers, dim=0, dim_size=graph.num_nodes)


def gated_aggregate_edges(q, k, v, k_table, v_table, edge_index, graph: CSRGraph, edge_count=None):
    _require()
    k_edge = k_table if edge_index is None else k_table.index_select(0, edge_index)  # [E, d]
    v_edge = v_table if edge_index is None else v_table.index_select(0, edge_index)
    if edge_count is None:
        return gated_aggregate(q, k, v, k_edge, v_edge, graph)
    k_ij = k.index_select(0, graph.senders) + k_edge  # [E, d]
    v_ij = (v.index_select(0, graph.senders) + v_edge) * edge_count.to(v_edge.dtype).unsqueeze(-1)
    gate = torch.sigmoid(q.index_select(0, graph.receivers) * k_ij / math.sqrt(q.shape[-1]))
    return torch_scatter.scatter(gate * v_ij, graph.receivers, dim=0, dim_size=graph.num_nodes)


def gated_aggregate_edge_mlp(q, k, v, edge_input, edge_fn, params, graph: CSRGraph, edge_index=None):
    k_table, v_table = edge_fn(edge_input)  # [R, d]: the dense edge MLP, as GNN code usually runs it
    return gated_aggregate_edges(q, k, v, k_table, v_table, edge_index, graph)
