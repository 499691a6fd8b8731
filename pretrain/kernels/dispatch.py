"""Backend choice for the aggregation ops.

Backends (same signatures, same maths as native.py):
    native     index_add / scatter_reduce composition with plain autograd (the definition)
    cpu_fused  receiver-chunked, recomputing autograd.Functions (fastest measured on CPU)
    triton     fused Triton kernels as torch custom ops (CUDA; CPU only under TRITON_INTERPRET=1)
    reference  the torch-scatter composition (baseline for benchmarks and tests; optional package)

'auto' (the default) picks per call from the tensors' device: CUDA → triton (native when triton
is missing), CPU → cpu_fused (native for tiny graphs: E × d below CPU_FUSED_MIN_ELEMENTS).
Override globally with `set_backend(name)` (from config: `kernels.backend`) or per call with
`backend=`.
"""
from __future__ import annotations

import importlib

from pretrain.kernels.graph import CSRGraph

BACKENDS = ("native", "cpu_fused", "triton", "reference")
# Measured in benchmarks/results/neighbor_scatter.md: cpu_fused beats native and the
# torch-scatter composition on CPU for all three ops at MP-20 and large-cell sizes.
CPU_DEFAULT = "cpu_fused"
# Below this many per-edge elements (E × d) the chunk bookkeeping of cpu_fused costs more than it
# saves (measured: a 4-crystal PDDFormer step, 650 edges × 32, ran 0.86× with cpu_fused), so
# 'auto' keeps the native path for tiny graphs on CPU.
CPU_FUSED_MIN_ELEMENTS = 1 << 18
_current = "auto"
_modules: dict = {}


def set_backend(name: str) -> None:
    """'auto' picks the fastest measured backend for the device; or name one of BACKENDS."""
    global _current
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown aggregation backend {name!r}; choose from {['auto', *BACKENDS]}")
    _current = name


def _module(name: str):
    if name not in _modules:
        _modules[name] = importlib.import_module(f"pretrain.kernels.{'triton_backend' if name == 'triton' else name}")
    return _modules[name]


def available_backends(device=None) -> list[str]:
    """Backends that can run on `device` in this environment."""
    out = ["native", "cpu_fused"]
    if _module("triton").available(device):
        out.append("triton")
    if _module("reference").available():
        out.append("reference")
    return out


def get_backend(device=None) -> str:
    """The backend a call on `device` would use now."""
    if _current != "auto":
        return _current
    if device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda":
        return "triton" if _module("triton").available(device) else "native"
    return CPU_DEFAULT


def _impl(backend: str | None, device, edge_elements: int = 1 << 62):
    name = backend or get_backend(device)
    if backend is None and _current == "auto" and name == "cpu_fused" and edge_elements < CPU_FUSED_MIN_ELEMENTS:
        name = "native"
    if name not in BACKENDS:
        raise ValueError(f"unknown aggregation backend {name!r}; choose from {list(BACKENDS)}")
    module = _module(name)
    if name == "triton" and not module.available(device):
        raise RuntimeError(f"aggregation backend 'triton' cannot run on {device}: {module.unavailable_reason()}")
    if name == "reference" and not module.available():
        raise RuntimeError(module.unavailable_reason())
    return module


def gather_multiply_reduce(x, edge_weight, graph: CSRGraph, reduce: str = "sum", backend: str | None = None):
    """out_i = Σ_j x_j ⊙ w_ij over receiver i's edges (or the mean). x [N, d], w [E, d] → [N, d]."""
    return _impl(backend, x.device, edge_weight.numel()).gather_multiply_reduce(x, edge_weight, graph, reduce)


def neighbor_attention(q, k, v, k_edge, v_edge, graph: CSRGraph, backend: str | None = None):
    """Per-receiver softmax attention. q, k, v [N, H, D]; k_edge, v_edge [E, H, D] → [N, H, D]."""
    return _impl(backend, q.device, k_edge.numel()).neighbor_attention(q, k, v, k_edge, v_edge, graph)


def gated_aggregate(q, k, v, k_edge, v_edge, graph: CSRGraph, backend: str | None = None):
    """Σ_j σ(q_i ⊙ k_ij / √d) ⊙ v_ij. q, k, v [N, d]; k_edge, v_edge [E, d] → [N, d]."""
    return _impl(backend, q.device, k_edge.numel()).gated_aggregate(q, k, v, k_edge, v_edge, graph)


def gated_aggregate_edges(
    q, k, v, k_table, v_table, edge_index, graph: CSRGraph, edge_count=None, backend: str | None = None
):
    """`gated_aggregate` with edge features gathered inside the op from a table: edge e uses row
    edge_index[e] of k_table, v_table [R, d] (one row per distinct edge length; None: R = E), and its
    message counts edge_count[e] times (merged identical edges; None: once).
    No E×d tensor is built by the fused backends, forward or backward. → [N, d]"""
    e_elements = graph.num_edges * q.shape[-1]
    return _impl(backend, q.device, e_elements).gated_aggregate_edges(
        q, k, v, k_table, v_table, edge_index, graph, edge_count
    )


def gated_aggregate_edge_mlp(
    q, k, v, edge_input, edge_fn, params, graph: CSRGraph, edge_index=None, backend: str | None = None
):
    """`gated_aggregate` whose edge features edge_fn(edge_input) → (k_e, v_e) are computed inside the
    op: per chunk of edges from per-edge geometry (edge_input [E] lengths, edge_index None), or once
    per row of a distinct-length table (edge_input [R], edge_index [E]) and gathered inside.
    `params` lists the tensors edge_fn reads (the fused backward returns their gradients). → [N, d]"""
    e_elements = graph.num_edges * q.shape[-1]
    return _impl(backend, q.device, e_elements).gated_aggregate_edge_mlp(
        q, k, v, edge_input, edge_fn, params, graph, edge_index
    )
