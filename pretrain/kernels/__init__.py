"""Neighbour aggregation: the one place every encoder sends its message passing through.

    gather_multiply_reduce(x, w, graph, reduce)   out_i = Σ_j x_j ⊙ w_ij       (sum | mean)
    neighbor_attention(q, k, v, k_e, v_e, graph)  per-receiver softmax attention, per head
    gated_aggregate(q, k, v, k_e, v_e, graph)     out_i = Σ_j σ(q_i ⊙ k_ij/√d) ⊙ v_ij
    gated_aggregate_edges(q, k, v, k_tab, v_tab, edge_index, graph)
                                                  the same, edge features gathered inside from a
                                                  per-distinct-length table [R, d] (no E×d tensor)
    gated_aggregate_edge_mlp(q, k, v, lengths, edge_fn, params, graph, edge_index=None)
                                                  the same, edge MLP (RBF → Linear → act …) run
                                                  inside per chunk of edges and recomputed in the backward

`graph` is a receiver-sorted `CSRGraph`. The backend ('auto', 'native', 'cpu_fused', 'triton',
'reference') is chosen by `set_backend` / the `backend` argument; 'auto' uses the fused Triton
kernels on CUDA and the chunked fused CPU path on CPU. The exact maths of each op is defined (and
documented) in `native.py`; README.md explains the backends.
"""
from pretrain.kernels.dispatch import (
    BACKENDS,
    available_backends,
    gated_aggregate,
    gated_aggregate_edge_mlp,
    gated_aggregate_edges,
    gather_multiply_reduce,
    get_backend,
    neighbor_attention,
    set_backend,
)
from pretrain.kernels.graph import CSRGraph

__all__ = [
    "CSRGraph",
    "gather_multiply_reduce",
    "neighbor_attention",
    "gated_aggregate",
    "gated_aggregate_edges",
    "gated_aggregate_edge_mlp",
    "set_backend",
    "get_backend",
    "available_backends",
    "BACKENDS",
]
