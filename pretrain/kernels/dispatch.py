"""Backend choice for the aggregation ops. Only the native backend is registered so far."""
from __future__ import annotations

from pretrain.kernels import native
from pretrain.kernels.graph import CSRGraph

_BACKENDS = {"native": native}
_current = "auto"


def set_backend(name: str) -> None:
    """'auto' picks the fastest measured backend for the device; or name one explicitly."""
    global _current
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"unknown aggregation backend {name!r}; choose from {['auto', *_BACKENDS]}")
    _current = name


def get_backend(device=None) -> str:
    return "native" if _current == "auto" else _current


def _impl(backend, device):
    return _BACKENDS[backend or get_backend(device)]


def gather_multiply_reduce(x, edge_weight, graph: CSRGraph, reduce: str = "sum", backend: str | None = None):
    return _impl(backend, x.device).gather_multiply_reduce(x, edge_weight, graph, reduce)


def neighbor_attention(q, k, v, k_edge, v_edge, graph: CSRGraph, backend: str | None = None):
    return _impl(backend, q.device).neighbor_attention(q, k, v, k_edge, v_edge, graph)


def gated_aggregate(q, k, v, k_edge, v_edge, graph: CSRGraph, backend: str | None = None):
    return _impl(backend, q.device).gated_aggregate(q, k, v, k_edge, v_edge, graph)
