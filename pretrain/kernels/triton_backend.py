"""Fused Triton backend: launchers for `_triton_kernels` registered as torch custom ops.

Each op is a `torch.library.custom_op` with a fake (meta) implementation and an autograd
formula, so torch.compile treats it as one opaque node and autograd calls our fused backward
(the torchtitan `fused_swiglu` pattern). Backward ops are custom ops too, so a compiled graph
never falls back to Python.

Runs on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (for tests; slow).
Import this module only when `available()` says triton is importable.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from pretrain.kernels.graph import CSRGraph

try:  # triton is optional: the native and CPU backends work without it
    import triton

    from pretrain.kernels import _triton_kernels as K

    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # ImportError, or a triton that cannot initialise on this machine
    triton = None
    K = None
    _IMPORT_ERROR = exc

_EDGE_TILE = 16  # edges per tile off-GPU: MP-20 receivers have ~25 neighbours → two tiles


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | str | None = None) -> bool:
    """True when the kernels can run on `device`: CUDA with triton, or any device under the interpreter."""
    if triton is None:
        return False
    if device is not None and torch.device(device).type == "cuda":
        return True
    return interpreting()


def unavailable_reason() -> str:
    if triton is None:
        return f"triton could not be imported ({_IMPORT_ERROR!r})"
    return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors, slowly)"


# ---------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype):
    """fp32 accumulation for fp32/fp16/bf16 inputs; fp64 inputs accumulate in fp64 (gradcheck)."""
    return K.tl.float64 if dtype == torch.float64 else K.tl.float32


def _block_d(d: int) -> int:
    return min(128, triton.next_power_of_2(max(d, 1)))


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"triton aggregation got {device} tensors: {unavailable_reason()}")
    if device.type == "cpu" and any(t.dtype == torch.bfloat16 for t in tensors):
        raise TypeError("the Triton interpreter does not support bf16; use fp32/fp64 on CPU")


def launch_config(width: int) -> dict:
    """The one launch configuration of every kernel at feature width `width` (d, or D per head for
    attention): a fixed rule, no autotuning. Autotuning picks by timing, so two runs (or a run and
    its resume) could compile different tile sizes and sum in a different order; pinned, the same
    inputs give the same bits on the same GPU model and Triton version. BLOCK_E = 16: MP-20
    receivers have ~12–25 neighbours (one or two tiles); warps grow with the feature block.
    Retune by editing this rule (it is the only place), after measuring on the target GPU."""
    block_d = min(128, triton.next_power_of_2(max(width, 1)))
    return {"BLOCK_E": _EDGE_TILE, "num_warps": 4 if block_d >= 128 else 2}


def _kernel(name: str, width: int):
    """(kernel, its pinned launch meta-parameters) for feature width `width`."""
    return getattr(K, name), launch_config(width)


def _on_device(device: torch.device):
    """Launch on the tensors' GPU, not the current one (`finetune` with device cuda:1 would
    otherwise launch on cuda:0); nothing to select for CPU tensors under the interpreter."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grid_cols(n: int, d: int, block_d: int):
    return (n, triton.cdiv(d, block_d))


# ---------------------------------------------------------------------------------------------
# a. gather-multiply-reduce
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("crystalfm::gmr", mutates_args=())
def gmr(
    x: torch.Tensor, w: torch.Tensor, senders: torch.Tensor, receivers: torch.Tensor, offsets: torch.Tensor,
    sender_perm: torch.Tensor, sender_offsets: torch.Tensor, mean: bool,
) -> torch.Tensor:
    _check_device(x, w)
    x, w = x.contiguous(), w.contiguous()
    n, d = offsets.numel() - 1, x.shape[-1]
    out = torch.empty(n, d, dtype=torch.result_type(x, w), device=x.device)  # [N, d]
    if n and d:
        block_d = _block_d(d)
        with _on_device(x.device):
            kernel, cfg = _kernel("gmr_fwd_kernel", d)
            kernel[_grid_cols(n, d, block_d)](
                x, w, senders, offsets, out, d, MEAN=mean, ACC=_acc(out.dtype), BLOCK_D=block_d, **cfg
            )
    return out


@gmr.register_fake
def _(x, w, senders, receivers, offsets, sender_perm, sender_offsets, mean):
    # The op's dtype: result_type(x, w), as the real implementation allocates it.
    return x.new_empty(offsets.shape[0] - 1, x.shape[-1], dtype=torch.result_type(x, w))


@torch.library.custom_op("crystalfm::gmr_backward", mutates_args=())
def gmr_backward(
    grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, receivers: torch.Tensor, offsets: torch.Tensor,
    sender_perm: torch.Tensor, sender_offsets: torch.Tensor, mean: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_device(grad, x, w)
    grad, x, w = grad.contiguous(), x.contiguous(), w.contiguous()
    if mean:  # fold 1/deg(receiver) into the incoming gradient once, [N, d]
        grad = grad / (offsets[1:] - offsets[:-1]).clamp(min=1).to(grad.dtype).unsqueeze(-1)
    gx, gw = torch.empty_like(x), torch.empty_like(w)  # [N, d], [E, d]
    n, d = x.shape
    if n and d:
        block_d = _block_d(d)
        with _on_device(x.device):
            kernel, cfg = _kernel("gmr_bwd_src_kernel", d)
            kernel[_grid_cols(n, d, block_d)](
                grad, x, w, receivers, sender_perm, sender_offsets, gx, gw, d,
                ACC=_acc(x.dtype), BLOCK_D=block_d, **cfg,
            )
    return gx, gw


@gmr_backward.register_fake
def _(grad, x, w, receivers, offsets, sender_perm, sender_offsets, mean):
    return torch.empty_like(x), torch.empty_like(w)


def _gmr_setup(ctx, inputs, output):
    x, w, senders, receivers, offsets, sender_perm, sender_offsets, mean = inputs
    ctx.save_for_backward(x, w, receivers, offsets, sender_perm, sender_offsets)
    ctx.mean = mean


def _gmr_bwd(ctx, grad):
    x, w, receivers, offsets, sender_perm, sender_offsets = ctx.saved_tensors
    gx, gw = gmr_backward(grad, x, w, receivers, offsets, sender_perm, sender_offsets, ctx.mean)
    return gx, gw, None, None, None, None, None, None


gmr.register_autograd(_gmr_bwd, setup_context=_gmr_setup)


# ---------------------------------------------------------------------------------------------
# b. neighbour attention
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("crystalfm::neighbor_attention", mutates_args=())
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_edge: torch.Tensor, v_edge: torch.Tensor,
    senders: torch.Tensor, receivers: torch.Tensor, offsets: torch.Tensor,
    sender_perm: torch.Tensor, sender_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (out [N, H, D], lse [N, H] fp32/fp64: per-receiver log Σ exp(logits), kept for the backward)."""
    _check_device(q, k, v, k_edge, v_edge)
    q, k, v, k_edge, v_edge = (t.contiguous() for t in (q, k, v, k_edge, v_edge))
    n, h, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(n, h, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    if n and h and d:
        with _on_device(q.device):
            kernel, cfg = _kernel("attn_fwd_kernel", d)
            kernel[(n, h)](
                q, k, v, k_edge, v_edge, senders, offsets, out, lse, h, d, 1.0 / math.sqrt(d),
                ACC=_acc(q.dtype), BLOCK_D=triton.next_power_of_2(d), **cfg,
            )
    return out, lse


@attention.register_fake
def _(q, k, v, k_edge, v_edge, senders, receivers, offsets, sender_perm, sender_offsets):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=lse_dtype)


@torch.library.custom_op("crystalfm::neighbor_attention_backward", mutates_args=())
def attention_backward(
    grad: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_edge: torch.Tensor, v_edge: torch.Tensor,
    senders: torch.Tensor, receivers: torch.Tensor, offsets: torch.Tensor,
    sender_perm: torch.Tensor, sender_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_device(grad, q, k, v, k_edge, v_edge)
    grad, q, k, v, k_edge, v_edge = (t.contiguous() for t in (grad, q, k, v, k_edge, v_edge))
    n, h, d = q.shape
    delta = (grad.to(lse.dtype) * out.to(lse.dtype)).sum(-1).contiguous()  # [N, H] Δ_i = dO_i · O_i
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dke, dve = torch.empty_like(k_edge), torch.empty_like(v_edge)  # [E, H, D]
    if n and h and d:
        scale = 1.0 / math.sqrt(d)
        meta = dict(ACC=_acc(q.dtype), BLOCK_D=triton.next_power_of_2(d), **launch_config(d))
        with _on_device(q.device):
            K.attn_bwd_dst_kernel[(n, h)](
                q, k, v, k_edge, v_edge, grad, lse, delta, senders, offsets, dq, h, d, scale, **meta
            )
        with _on_device(q.device):
            K.attn_bwd_src_kernel[(n, h)](
                q, k, v, k_edge, v_edge, grad, lse, delta, receivers, sender_perm, sender_offsets,
                dk, dv, dke, dve, h, d, scale, **meta,
            )
    return dq, dk, dv, dke, dve


@attention_backward.register_fake
def _(grad, out, lse, q, k, v, k_edge, v_edge, senders, receivers, offsets, sender_perm, sender_offsets):
    return tuple(torch.empty_like(t) for t in (q, k, v, k_edge, v_edge))


def _attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _attention_bwd(ctx, grad_out, grad_lse):
    q, k, v, k_edge, v_edge, senders, receivers, offsets, perm, sender_offsets, out, lse = ctx.saved_tensors
    grads = attention_backward(grad_out, out, lse, q, k, v, k_edge, v_edge, senders, receivers, offsets, perm, sender_offsets)
    return (*grads, None, None, None, None, None)


attention.register_autograd(_attention_bwd, setup_context=_attention_setup)


# ---------------------------------------------------------------------------------------------
# c. sigmoid-gated aggregation
# ---------------------------------------------------------------------------------------------


def _gated_forward(q, k, v, k_table, v_table, edge_index, senders, offsets, edge_count=None):
    """Launch the gated forward; edge e reads row edge_index[e] of the tables (row e when None) and
    counts edge_count[e] times (once when None)."""
    _check_device(q, k, v, k_table, v_table)
    q, k, v, k_table, v_table = (t.contiguous() for t in (q, k, v, k_table, v_table))
    n, d = q.shape
    out = torch.empty_like(q)
    if n and d:
        block_d = _block_d(d)
        with _on_device(q.device):
            kernel, cfg = _kernel("gated_fwd_kernel", d)
            kernel[_grid_cols(n, d, block_d)](
                q, k, v, k_table, v_table, senders if edge_index is None else edge_index,
                q if edge_count is None else edge_count, senders, offsets, out, d, 1.0 / math.sqrt(d),
                HAS_INDEX=edge_index is not None, HAS_COUNT=edge_count is not None,
                ACC=_acc(q.dtype), BLOCK_D=block_d, **cfg,
            )
    return out


def _gated_backward(grad, q, k, v, k_table, v_table, edge_index, row_perm, row_offsets,
                    senders, receivers, offsets, sender_perm, sender_offsets, edge_count=None):
    """(dq, dk, dv, dk_table, dv_table): receiver programs for dq, sender programs for dk / dv (and the
    per-edge feature gradients when the table is per edge), row programs for a distinct-length table."""
    _check_device(grad, q, k, v, k_table, v_table)
    grad, q, k, v, k_table, v_table = (t.contiguous() for t in (grad, q, k, v, k_table, v_table))
    n, d = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dkt, dvt = torch.empty_like(k_table), torch.empty_like(v_table)
    has_index = edge_index is not None
    idx = edge_index if has_index else senders
    has_count = edge_count is not None
    cnt = edge_count if has_count else q
    if n and d:
        block_d, scale = _block_d(d), 1.0 / math.sqrt(d)
        meta = dict(ACC=_acc(q.dtype), BLOCK_D=block_d, **launch_config(d))
        grid = _grid_cols(n, d, block_d)
        with _on_device(q.device):
            K.gated_bwd_dst_kernel[grid](
                q, k, v, k_table, v_table, idx, cnt, grad, senders, offsets, dq, d, scale,
                HAS_INDEX=has_index, HAS_COUNT=has_count, **meta,
            )
            K.gated_bwd_src_kernel[grid](
                q, k, v, k_table, v_table, idx, cnt, grad, receivers, sender_perm, sender_offsets, dk, dv, dkt, dvt,
                d, scale, HAS_INDEX=has_index, HAS_COUNT=has_count, STORE_EDGE=not has_index, **meta,
            )
            rows = k_table.shape[0]
            if has_index and rows:
                K.gated_bwd_row_kernel[_grid_cols(rows, d, block_d)](
                    q, k, v, k_table, v_table, cnt, grad, senders, receivers, row_perm, row_offsets, dkt, dvt,
                    d, scale, HAS_COUNT=has_count, **meta,
                )
    elif has_index:
        dkt.zero_(), dvt.zero_()
    return dq, dk, dv, dkt, dvt


@torch.library.custom_op("crystalfm::gated_aggregate", mutates_args=())
def gated(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_edge: torch.Tensor, v_edge: torch.Tensor,
    senders: torch.Tensor, receivers: torch.Tensor, offsets: torch.Tensor,
    sender_perm: torch.Tensor, sender_offsets: torch.Tensor,
) -> torch.Tensor:
    return _gated_forward(q, k, v, k_edge, v_edge, None, senders, offsets)


@gated.register_fake
def _(q, k, v, k_edge, v_edge, senders, receivers, offsets, sender_perm, sender_offsets):
    return torch.empty_like(q)


@torch.library.custom_op("crystalfm::gated_aggregate_backward", mutates_args=())
def gated_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_edge: torch.Tensor, v_edge: torch.Tensor,
    senders: torch.Tensor, receivers: torch.Tensor, offsets: torch.Tensor,
    sender_perm: torch.Tensor, sender_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gated_backward(
        grad, q, k, v, k_edge, v_edge, None, None, None, senders, receivers, offsets, sender_perm, sender_offsets
    )


@gated_backward.register_fake
def _(grad, q, k, v, k_edge, v_edge, senders, receivers, offsets, sender_perm, sender_offsets):
    return tuple(torch.empty_like(t) for t in (q, k, v, k_edge, v_edge))


def _gated_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gated_bwd(ctx, grad):
    q, k, v, k_edge, v_edge, senders, receivers, offsets, perm, sender_offsets = ctx.saved_tensors
    grads = gated_backward(grad, q, k, v, k_edge, v_edge, senders, receivers, offsets, perm, sender_offsets)
    return (*grads, None, None, None, None, None)


gated.register_autograd(_gated_bwd, setup_context=_gated_setup)


# ---------------------------------------------------------------------------------------------
# d. sigmoid-gated aggregation reading a per-distinct-length edge-feature table (no E×d tensor)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("crystalfm::gated_aggregate_edges", mutates_args=())
def gated_edges(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor,
    edge_index: torch.Tensor, edge_count: torch.Tensor, row_perm: torch.Tensor, row_offsets: torch.Tensor,
    senders: torch.Tensor, receivers: torch.Tensor, offsets: torch.Tensor,
    sender_perm: torch.Tensor, sender_offsets: torch.Tensor,
) -> torch.Tensor:
    """edge_count [E]: each edge's multiplicity, in q's dtype (all ones when nothing was merged)."""
    return _gated_forward(q, k, v, k_table, v_table, edge_index, senders, offsets, edge_count)


@gated_edges.register_fake
def _(q, k, v, k_table, v_table, edge_index, edge_count, row_perm, row_offsets, senders, receivers, offsets, sender_perm, sender_offsets):
    return torch.empty_like(q)


@torch.library.custom_op("crystalfm::gated_aggregate_edges_backward", mutates_args=())
def gated_edges_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_table: torch.Tensor,
    v_table: torch.Tensor, edge_index: torch.Tensor, edge_count: torch.Tensor, row_perm: torch.Tensor,
    row_offsets: torch.Tensor, senders: torch.Tensor, receivers: torch.Tensor, offsets: torch.Tensor,
    sender_perm: torch.Tensor, sender_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gated_backward(
        grad, q, k, v, k_table, v_table, edge_index, row_perm, row_offsets,
        senders, receivers, offsets, sender_perm, sender_offsets, edge_count,
    )


@gated_edges_backward.register_fake
def _(grad, q, k, v, k_table, v_table, edge_index, edge_count, row_perm, row_offsets, senders, receivers, offsets, sender_perm, sender_offsets):
    return tuple(torch.empty_like(t) for t in (q, k, v, k_table, v_table))


def _gated_edges_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gated_edges_bwd(ctx, grad):
    grads = gated_edges_backward(grad, *ctx.saved_tensors)
    return (*grads, *([None] * 9))


gated_edges.register_autograd(_gated_edges_bwd, setup_context=_gated_edges_setup)


# ---------------------------------------------------------------------------------------------
# the backend interface (same signatures as native.py)
# ---------------------------------------------------------------------------------------------


def _csr(graph: CSRGraph):
    perm, sender_offsets = graph.by_sender()
    return graph.senders, graph.receivers, graph.offsets, perm, sender_offsets


def gather_multiply_reduce(x, edge_weight, graph: CSRGraph, reduce: str = "sum"):
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    senders, receivers, offsets, perm, sender_offsets = _csr(graph)
    return gmr(x, edge_weight, senders, receivers, offsets, perm, sender_offsets, reduce == "mean")


def neighbor_attention(q, k, v, k_edge, v_edge, graph: CSRGraph):
    return attention(q, k, v, k_edge, v_edge, *_csr(graph))[0]


def gated_aggregate(q, k, v, k_edge, v_edge, graph: CSRGraph):
    return gated(q, k, v, k_edge, v_edge, *_csr(graph))


def gated_aggregate_edges(q, k, v, k_table, v_table, edge_index, graph: CSRGraph, edge_count=None):
    if edge_index is None and edge_count is None:
        return gated_aggregate(q, k, v, k_table, v_table, graph)
    if edge_index is None:  # a per-edge table: row e
        edge_index = torch.arange(graph.num_edges, device=q.device)
    if edge_count is None:
        edge_count = torch.ones(graph.num_edges, dtype=q.dtype, device=q.device)
    row_perm, row_offsets = graph.by_row(edge_index, k_table.shape[0])
    return gated_edges(
        q, k, v, k_table, v_table, edge_index, edge_count.to(q.dtype), row_perm, row_offsets, *_csr(graph)
    )


def gated_aggregate_edge_mlp(q, k, v, edge_input, edge_fn, params, graph: CSRGraph, edge_index=None):
    # The MLP runs as torch ops on the rows it is given (one per distinct length: small; per edge:
    # E×d, the unfused cost) and the gather is fused into the kernels. An in-kernel edge MLP
    # (tl.dot per edge tile) is the next step for the per-edge case; see README.
    k_table, v_table = edge_fn(edge_input)
    return gated_aggregate_edges(q, k, v, k_table, v_table, edge_index, graph)
