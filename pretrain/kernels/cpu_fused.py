"""Fused CPU backend: the same maths as native.py, run in cache-sized receiver chunks.

Why it is faster on CPU than the unfused composition. The unfused form allocates several E×d
tensors per op (gathered sources, messages, their gradients) and autograd keeps the gathered
ones alive until the backward. On a CPU each fresh E×d allocation is first-touched page by
page, and each pass over it streams E×d through DRAM. Here the edges are walked in chunks of
whole receivers (`CSRGraph.receiver_chunks`) whose per-edge temporaries (a few MiB) stay in
cache; a custom autograd.Function saves only the inputs (plus a per-receiver log-sum-exp for
attention) and the backward recomputes the per-edge intermediates chunk by chunk. The only
E×d tensors allocated are the gradients of the E×d inputs, which the caller asked for.

Segment sums use a reshape-sum when every receiver has the same degree (kNN graphs without ties
at the k-th distance), else
`index_add_` on the chunk-local (sorted) receiver index. Sender-side gradients accumulate with
`index_add_` in edge order, so results are deterministic.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from pretrain.kernels.graph import CSRGraph

# Edges per chunk: a chunk's temporaries (about 4 tensors of CHUNK_EDGES × d) should sit in
# L2/L3. Measured on the 2-core dev machine (benchmarks/neighbor_scatter.py --sweep-chunk).
CHUNK_EDGES = 8192


def _chunk_edges(d: int) -> int:
    # keep a chunk's temporaries near 4 MiB at fp32 whatever the width
    return max(1, CHUNK_EDGES * 128 // max(d, 1))


def _segment_sum(messages: torch.Tensor, local_receivers: torch.Tensor, num_receivers: int, degree: int | None):
    """[Ec, ...] → [Rc, ...] sum over each receiver's run of edges (edges sorted by receiver)."""
    if degree is not None:
        return messages.view(num_receivers, degree, *messages.shape[1:]).sum(1)
    out = messages.new_zeros(num_receivers, *messages.shape[1:])
    return out.index_add_(0, local_receivers, messages)


class _Chunk:
    """Index views of one receiver chunk."""

    __slots__ = ("r0", "r1", "e0", "e1", "senders", "receivers", "local", "degree")

    def __init__(self, graph: CSRGraph, r0: int, r1: int, e0: int, e1: int):
        self.r0, self.r1, self.e0, self.e1 = r0, r1, e0, e1
        self.senders = graph.senders[e0:e1]  # [Ec]
        self.receivers = graph.receivers[e0:e1]  # [Ec]
        self.local = self.receivers - r0  # [Ec] in [0, Rc)
        self.degree = graph.uniform_degree()

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    def segment_sum(self, messages):
        return _segment_sum(messages, self.local, self.rows, self.degree)

    def expand(self, per_receiver: torch.Tensor) -> torch.Tensor:
        """Rows r0:r1 of a per-receiver tensor [N, ...] repeated for each edge → [Ec, ...]."""
        return self.expand_local(per_receiver[self.r0 : self.r1])

    def expand_local(self, block: torch.Tensor) -> torch.Tensor:
        """A chunk-local per-receiver tensor [Rc, ...] repeated for each edge → [Ec, ...]."""
        if self.degree is not None:
            return block.unsqueeze(1).expand(self.rows, self.degree, *block.shape[1:]).reshape(-1, *block.shape[1:])
        return block.index_select(0, self.local)

    def mul_by_receiver(self, edge_values: torch.Tensor, per_receiver: torch.Tensor, out=None) -> torch.Tensor:
        """edge_values [Ec, ...] ⊙ per_receiver[receiver of each edge] (broadcasting trailing dims);
        with a uniform degree this broadcasts [Rc, 1, ...] against [Rc, k, ...] instead of
        materialising the repeat."""
        block = per_receiver[self.r0 : self.r1]
        if self.degree is None:
            return torch.mul(edge_values, block.index_select(0, self.local), out=out)
        grouped = edge_values.view(self.rows, self.degree, *edge_values.shape[1:])
        if out is not None:
            out = out.view(self.rows, self.degree, *out.shape[1:])
        result = torch.mul(grouped, block.unsqueeze(1), out=out)
        return result.view(-1, *result.shape[2:])


def _chunks(graph: CSRGraph, d: int):
    return [_Chunk(graph, *c) for c in graph.receiver_chunks(_chunk_edges(d))]


# ---------------------------------------------------------------------------------------------
# a. gather-multiply-reduce
# ---------------------------------------------------------------------------------------------


class _GatherMultiplyReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, graph: CSRGraph, mean: bool):
        chunks = _chunks(graph, x.shape[-1])
        out = x.new_empty(graph.num_nodes, x.shape[-1])  # [N, d]; the chunks cover every receiver
        for c in chunks:
            messages = x.index_select(0, c.senders).mul_(w[c.e0 : c.e1])  # [Ec, d], in cache
            out[c.r0 : c.r1] = c.segment_sum(messages)
        if mean:
            out /= graph.degree().clamp(min=1).to(out.dtype).unsqueeze(-1)
        ctx.save_for_backward(x, w)
        ctx.graph, ctx.mean, ctx.chunks = graph, mean, chunks
        return out

    @staticmethod
    @once_differentiable  # double backward (force training) is refused loudly: use 'native'
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        graph, chunks = ctx.graph, ctx.chunks
        if ctx.mean:
            grad = grad / graph.degree().clamp(min=1).to(grad.dtype).unsqueeze(-1)  # [N, d]
        need_x, need_w = ctx.needs_input_grad[:2]
        gx = torch.zeros_like(x) if need_x else None
        gw = torch.empty_like(w) if need_w else None
        for c in chunks:
            if need_w:  # gw_e = g[receiver] ⊙ x[sender]
                c.mul_by_receiver(x.index_select(0, c.senders), grad, out=gw[c.e0 : c.e1])
            if need_x:  # gx_j += g[receiver] ⊙ w_e
                gx.index_add_(0, c.senders, c.mul_by_receiver(w[c.e0 : c.e1], grad))
        return gx, gw, None, None


@torch.compiler.disable  # a Python loop over chunks: keep dynamo from unrolling it
def gather_multiply_reduce(x, edge_weight, graph: CSRGraph, reduce: str = "sum"):
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    return _GatherMultiplyReduce.apply(x, edge_weight, graph, reduce == "mean")


# ---------------------------------------------------------------------------------------------
# b. neighbour attention (per-receiver softmax; saves lse [N, H] only)
# ---------------------------------------------------------------------------------------------


class _NeighborAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_edge, v_edge, graph: CSRGraph):
        n, h, d = q.shape
        scale = 1.0 / math.sqrt(d)
        chunks = _chunks(graph, h * d)
        out = q.new_zeros(n, h, d)  # [N, H, D]
        lse = q.new_zeros(n, h)  # [N, H]
        for c in chunks:
            k_ij = k.index_select(0, c.senders).add_(k_edge[c.e0 : c.e1])  # [Ec, H, D]
            logits = c.mul_by_receiver(k_ij, q, out=k_ij).sum(-1).mul_(scale)  # [Ec, H]
            seg_max = torch.full((c.rows, h), float("-inf"), dtype=q.dtype)
            seg_max.scatter_reduce_(0, c.local.unsqueeze(-1).expand_as(logits), logits, "amax")
            p = (logits - c.expand_local(seg_max)).exp_()  # [Ec, H]
            denom = c.segment_sum(p)  # [Rc, H], ≥ 1 for receivers with edges
            v_ij = v.index_select(0, c.senders).add_(v_edge[c.e0 : c.e1])
            out[c.r0 : c.r1] = c.segment_sum(p.unsqueeze(-1) * v_ij) / denom.clamp(min=1e-30).unsqueeze(-1)
            lse[c.r0 : c.r1] = torch.where(denom > 0, seg_max + denom.clamp(min=1e-30).log(), 0.0)
        ctx.save_for_backward(q, k, v, k_edge, v_edge, out, lse)
        ctx.graph, ctx.chunks = graph, chunks
        return out

    @staticmethod
    @once_differentiable  # double backward (force training) is refused loudly: use 'native'
    def backward(ctx, grad):
        q, k, v, k_edge, v_edge, out, lse = ctx.saved_tensors
        scale = 1.0 / math.sqrt(q.shape[-1])
        delta = (grad * out).sum(-1)  # [N, H]  Δ_i = dO_i · O_i
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dke, dve = torch.empty_like(k_edge), torch.empty_like(v_edge)  # [E, H, D]
        for c in ctx.chunks:
            k_ij = k.index_select(0, c.senders).add_(k_edge[c.e0 : c.e1])  # [Ec, H, D]
            v_ij = v.index_select(0, c.senders).add_(v_edge[c.e0 : c.e1])
            p = (c.mul_by_receiver(k_ij, q).sum(-1).mul_(scale) - c.expand(lse)).exp_()  # [Ec, H] α_e
            c.mul_by_receiver(p.unsqueeze(-1), grad, out=dve[c.e0 : c.e1])  # dv_ij = α_e dO_i
            ds = p * (c.mul_by_receiver(v_ij, grad).sum(-1) - c.expand(delta))  # [Ec, H]
            dq[c.r0 : c.r1] = c.segment_sum(ds.unsqueeze(-1) * k_ij) * scale
            c.mul_by_receiver(ds.mul_(scale).unsqueeze(-1), q, out=dke[c.e0 : c.e1])  # dk_ij
            dk.index_add_(0, c.senders, dke[c.e0 : c.e1])
            dv.index_add_(0, c.senders, dve[c.e0 : c.e1])
        return dq, dk, dv, dke, dve, None


@torch.compiler.disable  # a Python loop over chunks: keep dynamo from unrolling it
def neighbor_attention(q, k, v, k_edge, v_edge, graph: CSRGraph):
    return _NeighborAttention.apply(q, k, v, k_edge, v_edge, graph)


# ---------------------------------------------------------------------------------------------
# c. sigmoid-gated aggregation
# ---------------------------------------------------------------------------------------------


def _edge_rows(table: torch.Tensor, index: torch.Tensor | None, c: "_Chunk") -> torch.Tensor:
    """The chunk's per-edge rows [Ec, d] of an edge-feature table: a view of rows e0:e1 when the
    table is per edge (index None), else gathered through the chunk's slice of `index` (in cache)."""
    if index is None:
        return table[c.e0 : c.e1]
    return table.index_select(0, index[c.e0 : c.e1])


def _gated_chunk_forward(c: "_Chunk", q_scaled, k, v, k_edge, v_edge, count=None):
    """Σ over the chunk's edges of c_e σ(q_i ⊙ k_ij) ⊙ v_ij → [Rc, d] (q already scaled by 1/√d;
    count: the chunk's edge multiplicities [Ec, 1] or None)."""
    k_ij = k.index_select(0, c.senders).add_(k_edge)  # [Ec, d]
    gate = c.mul_by_receiver(k_ij, q_scaled, out=k_ij).sigmoid_()
    messages = gate.mul_(v.index_select(0, c.senders).add_(v_edge))
    if count is not None:
        messages.mul_(count)
    return c.segment_sum(messages)  # [Rc, d]


def _gated_chunk_backward(
    c: "_Chunk", grad, q_scaled, k, v, k_edge, v_edge, scale, dq, dke_out=None, dve_out=None, count=None
):
    """One chunk of the gated backward: writes dq rows r0:r1 and returns (dk_ij, dv_ij) [Ec, d]
    (into dke_out / dve_out when given). count: edge multiplicities [Ec, 1] or None."""
    k_ij = k.index_select(0, c.senders).add_(k_edge)  # [Ec, d]
    v_ij = v.index_select(0, c.senders).add_(v_edge)
    gate = c.mul_by_receiver(k_ij, q_scaled).sigmoid_()
    dve = c.mul_by_receiver(gate, grad, out=dve_out)  # dv_ij = g_i ⊙ σ
    if count is not None:
        v_ij.mul_(count)  # c_e v_ij: the gate's gradient counts the edge c_e times
        dve.mul_(count)
    dz = gate.mul_(1.0 - gate).mul_(v_ij)  # [Ec, d] σ(1-σ) ⊙ v_ij (reuses gate's memory)
    dz = c.mul_by_receiver(dz, grad, out=dz)  # ∂L/∂z
    dq[c.r0 : c.r1] = c.segment_sum(dz * k_ij) * scale
    dke = c.mul_by_receiver(dz, q_scaled, out=dke_out)  # dk_ij
    return dke, dve


class _GatedAggregate(torch.autograd.Function):
    """Edge features are rows of (k_table, v_table): per edge (index None, [E, d]) or per distinct
    length (index [E] → rows of [R, d]); with an index no E×d tensor exists in forward or backward,
    and the table gradients are summed with `index_add_` chunk after chunk (a fixed order)."""

    @staticmethod
    def forward(ctx, q, k, v, k_table, v_table, index, count, graph: CSRGraph):
        n, d = q.shape
        scale = 1.0 / math.sqrt(d)
        chunks = _chunks(graph, d)
        out = q.new_zeros(n, d)  # [N, d]
        q_scaled = q * scale  # [N, d]
        if count is not None:
            count = count.to(q.dtype).unsqueeze(-1)  # [E, 1]
        for c in chunks:
            k_edge, v_edge = _edge_rows(k_table, index, c), _edge_rows(v_table, index, c)  # [Ec, d]
            cnt = None if count is None else count[c.e0 : c.e1]
            out[c.r0 : c.r1] = _gated_chunk_forward(c, q_scaled, k, v, k_edge, v_edge, cnt)
        ctx.save_for_backward(q, k, v, k_table, v_table, index, count)
        ctx.graph, ctx.chunks = graph, chunks
        return out

    @staticmethod
    @once_differentiable  # double backward (force training) is refused loudly: use 'native'
    def backward(ctx, grad):
        q, k, v, k_table, v_table, index, count = ctx.saved_tensors
        scale = 1.0 / math.sqrt(q.shape[-1])
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        per_edge = index is None
        # per edge: [E, d] written slice by slice; per row: [R, d] summed over the chunks in order
        dkt = torch.empty_like(k_table) if per_edge else torch.zeros_like(k_table)
        dvt = torch.empty_like(v_table) if per_edge else torch.zeros_like(v_table)
        q_scaled = q * scale  # [N, d]
        for c in ctx.chunks:
            k_edge, v_edge = _edge_rows(k_table, index, c), _edge_rows(v_table, index, c)
            cnt = None if count is None else count[c.e0 : c.e1]
            if per_edge:
                dke, dve = _gated_chunk_backward(
                    c, grad, q_scaled, k, v, k_edge, v_edge, scale, dq, dkt[c.e0 : c.e1], dvt[c.e0 : c.e1], cnt
                )
            else:
                dke, dve = _gated_chunk_backward(c, grad, q_scaled, k, v, k_edge, v_edge, scale, dq, count=cnt)
                rows = index[c.e0 : c.e1]
                dkt.index_add_(0, rows, dke)
                dvt.index_add_(0, rows, dve)
            dk.index_add_(0, c.senders, dke)
            dv.index_add_(0, c.senders, dve)
        return dq, dk, dv, dkt, dvt, None, None, None


@torch.compiler.disable  # a Python loop over chunks: keep dynamo from unrolling it
def gated_aggregate(q, k, v, k_edge, v_edge, graph: CSRGraph):
    return _GatedAggregate.apply(q, k, v, k_edge, v_edge, None, None, graph)


@torch.compiler.disable
def gated_aggregate_edges(q, k, v, k_table, v_table, edge_index, graph: CSRGraph, edge_count=None):
    return _GatedAggregate.apply(q, k, v, k_table, v_table, edge_index, edge_count, graph)


# ---------------------------------------------------------------------------------------------
# d. gated aggregation with the edge MLP inside: per chunk, geometry → edge features → message
# ---------------------------------------------------------------------------------------------


class _GatedAggregateEdgeMLP(torch.autograd.Function):
    """Per-edge geometry (edge_input [E, ...]) → edge_fn per chunk → gated sum. Nothing E×d is kept:
    the forward runs edge_fn chunk by chunk without autograd; the backward reruns it per chunk with
    autograd, pulls the chunk's (dk_e, dv_e) back through it with `torch.autograd.grad`, and sums
    the weight gradients chunk after chunk (per-chunk partial sums, fixed-order reduction)."""

    @staticmethod
    def forward(ctx, q, k, v, edge_input, graph: CSRGraph, edge_fn, *params):
        n, d = q.shape
        scale = 1.0 / math.sqrt(d)
        chunks = _chunks(graph, 3 * d)  # the MLP's hidden rows live in cache beside the message
        out = q.new_zeros(n, d)  # [N, d]
        q_scaled = q * scale
        with torch.no_grad():
            for c in chunks:
                k_edge, v_edge = edge_fn(edge_input[c.e0 : c.e1])  # [Ec, d] each, in cache
                out[c.r0 : c.r1] = _gated_chunk_forward(c, q_scaled, k, v, k_edge, v_edge)
        ctx.save_for_backward(q, k, v, edge_input)
        # the weights themselves (leaf tensors edge_fn reads), not saved copies: autograd.grad
        # in the backward differentiates the recomputed chunk with respect to them
        ctx.graph, ctx.chunks, ctx.edge_fn, ctx.params = graph, chunks, edge_fn, params
        device = q.device.type  # the backward recomputes under the forward's autocast state
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return out

    @staticmethod
    @once_differentiable  # double backward (force training) is refused loudly: use 'native'
    def backward(ctx, grad):
        q, k, v, edge_input = ctx.saved_tensors
        params = ctx.params
        scale = 1.0 / math.sqrt(q.shape[-1])
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        need_input = ctx.needs_input_grad[3]
        d_input = torch.zeros_like(edge_input) if need_input else None
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[6:]) if need]
        d_params = [None] * len(wanted)
        q_scaled = q * scale
        for c in ctx.chunks:
            rows = edge_input[c.e0 : c.e1].detach().requires_grad_(need_input)
            device, enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                k_edge, v_edge = ctx.edge_fn(rows)  # [Ec, d], recomputed as in the forward
            dke, dve = _gated_chunk_backward(c, grad, q_scaled, k, v, k_edge.detach(), v_edge.detach(), scale, dq)
            dk.index_add_(0, c.senders, dke)
            dv.index_add_(0, c.senders, dve)
            targets = ([rows] if need_input else []) + wanted
            if targets:
                got = torch.autograd.grad((k_edge, v_edge), targets, (dke, dve), allow_unused=True)
                if need_input:
                    d_input[c.e0 : c.e1] = got[0]
                    got = got[1:]
                for i, g in enumerate(got):  # chunk order: a fixed summation order
                    if g is not None:
                        d_params[i] = g if d_params[i] is None else d_params[i].add_(g)
        it = iter(d_params)
        grads = [next(it) if need else None for need in ctx.needs_input_grad[6:]]
        return (dq, dk, dv, d_input, None, None, *grads)


@torch.compiler.disable
def gated_aggregate_edge_mlp(q, k, v, edge_input, edge_fn, params, graph: CSRGraph, edge_index=None):
    if edge_index is not None:
        # one row per distinct length: the MLP on R ≪ E rows with plain autograd (a small [R, d]
        # table), then the gather fused into the sum: still no E×d tensor
        k_table, v_table = edge_fn(edge_input)
        return _GatedAggregate.apply(q, k, v, k_table, v_table, edge_index, None, graph)
    return _GatedAggregateEdgeMLP.apply(q, k, v, edge_input, graph, edge_fn, *params)
