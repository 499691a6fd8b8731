"""Triton kernels for the three aggregation ops (imported only when triton is importable).

Layout: every kernel is one program per (node, feature block) or (node, head) that walks one CSR
segment in tiles of BLOCK_E edges and keeps its accumulators in registers. Nothing is atomic, so
results are bit-identical run to run.

    forward            one program per receiver i, walks its in-edges (offsets)
    backward, dst side one program per receiver i: gradient of the receiver's own input (q)
    backward, src side one program per sender j, walks its out-edges through `sender_perm`
                       (CSRGraph.by_sender): gradients of sender inputs (x / k / v) and of the
                       per-edge inputs, each edge written by exactly one program

Per-edge intermediates (k_ij, v_ij, logits, gates) are recomputed in the backward from the inputs
and the per-receiver softmax statistics (log-sum-exp, 8 bytes per receiver and head); no E×d
tensor is ever stored besides the gradients of the E×d inputs themselves.

Segment loops are `while` loops with bounds loaded from memory (the Triton interpreter rejects
`range` over loaded bounds) and masked fixed-width tiles.
"""
from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# a. gather-multiply-reduce: out_i = Σ_e x[src_e] ⊙ w_e   (mean: the launcher pre-scales)
# ---------------------------------------------------------------------------------------------


@triton.jit
def gmr_fwd_kernel(
    x_ptr, w_ptr, senders_ptr, offsets_ptr, out_ptr, d,
    MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    cmask = cols < d
    start = tl.load(offsets_ptr + i)
    end = tl.load(offsets_ptr + i + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    e0 = start
    while e0 < end:
        eids = e0 + tl.arange(0, BLOCK_E)  # [BE]
        emask = eids < end
        src = tl.load(senders_ptr + eids, mask=emask, other=0)
        m2 = emask[:, None] & cmask[None, :]
        xs = tl.load(x_ptr + src[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)  # [BE, BD]
        ws = tl.load(w_ptr + eids[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        acc += tl.sum(xs * ws, axis=0)
        e0 += BLOCK_E
    if MEAN:
        acc = acc / tl.maximum(end - start, 1).to(ACC)
    tl.store(out_ptr + i * d + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def gmr_bwd_src_kernel(
    g_ptr, x_ptr, w_ptr, receivers_ptr, perm_ptr, sender_offsets_ptr, gx_ptr, gw_ptr, d,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """g is already divided by the receiver degree for 'mean'. gx_j = Σ_{e: src=j} g[dst_e] ⊙ w_e,
    gw_e = g[dst_e] ⊙ x_j."""
    j = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    start = tl.load(sender_offsets_ptr + j)
    end = tl.load(sender_offsets_ptr + j + 1)
    xj = tl.load(x_ptr + j * d + cols, mask=cmask, other=0.0).to(ACC)  # [BD]
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    p0 = start
    while p0 < end:
        pids = p0 + tl.arange(0, BLOCK_E)
        pmask = pids < end
        eids = tl.load(perm_ptr + pids, mask=pmask, other=0)
        dst = tl.load(receivers_ptr + eids, mask=pmask, other=0)
        m2 = pmask[:, None] & cmask[None, :]
        gr = tl.load(g_ptr + dst[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)  # [BE, BD]
        ws = tl.load(w_ptr + eids[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        acc += tl.sum(gr * ws, axis=0)
        gw = gr * xj[None, :]
        tl.store(gw_ptr + eids[:, None] * d + cols[None, :], gw.to(gw_ptr.dtype.element_ty), mask=m2)
        p0 += BLOCK_E
    tl.store(gx_ptr + j * d + cols, acc.to(gx_ptr.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------------
# b. neighbour attention, per head: online softmax over the receiver's segment
#    tensors are [rows, H, D] contiguous: element (row, h, c) at row * H * D + h * D + c
# ---------------------------------------------------------------------------------------------


@triton.jit
def attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, ke_ptr, ve_ptr, senders_ptr, offsets_ptr, out_ptr, lse_ptr, H, D, scale,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row = H * D
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    base = h * D + cols  # [BD] offset inside a row
    qi = tl.load(q_ptr + i * row + base, mask=cmask, other=0.0).to(ACC)  # [BD]
    start = tl.load(offsets_ptr + i)
    end = tl.load(offsets_ptr + i + 1)
    m = tl.full([], float("-inf"), ACC)  # running max of the logits
    l = tl.zeros([], ACC)  # running Σ exp(s - m)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    e0 = start
    while e0 < end:
        eids = e0 + tl.arange(0, BLOCK_E)
        emask = eids < end
        src = tl.load(senders_ptr + eids, mask=emask, other=0)
        m2 = emask[:, None] & cmask[None, :]
        kij = tl.load(k_ptr + src[:, None] * row + base[None, :], mask=m2, other=0.0).to(ACC)
        kij += tl.load(ke_ptr + eids[:, None] * row + base[None, :], mask=m2, other=0.0).to(ACC)  # [BE, BD]
        s = tl.sum(qi[None, :] * kij, axis=1) * scale  # [BE]
        s = tl.where(emask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))  # finite: the tile holds at least one edge
        corr = tl.exp(m - m_new)
        p = tl.exp(s - m_new)  # [BE], 0 on masked lanes
        vij = tl.load(v_ptr + src[:, None] * row + base[None, :], mask=m2, other=0.0).to(ACC)
        vij += tl.load(ve_ptr + eids[:, None] * row + base[None, :], mask=m2, other=0.0).to(ACC)
        l = l * corr + tl.sum(p, axis=0)
        acc = acc * corr + tl.sum(p[:, None] * vij, axis=0)
        m = m_new
        e0 += BLOCK_E
    has_edges = l > 0
    l_safe = tl.where(has_edges, l, 1.0)
    out = tl.where(has_edges, acc / l_safe, 0.0)
    tl.store(out_ptr + i * row + base, out.to(out_ptr.dtype.element_ty), mask=cmask)
    lse = tl.where(has_edges, m + tl.log(l_safe), 0.0)
    tl.store(lse_ptr + i * H + h, lse.to(lse_ptr.dtype.element_ty))


@triton.jit
def attn_bwd_dst_kernel(
    q_ptr, k_ptr, v_ptr, ke_ptr, ve_ptr, do_ptr, lse_ptr, delta_ptr, senders_ptr, offsets_ptr, dq_ptr,
    H, D, scale, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq_i = scale Σ_e ds_e k_ij,  ds_e = p_e (dO_i·v_ij - Δ_i),  p_e = exp(s_e - lse_i)."""
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row = H * D
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    base = h * D + cols
    qi = tl.load(q_ptr + i * row + base, mask=cmask, other=0.0).to(ACC)
    doi = tl.load(do_ptr + i * row + base, mask=cmask, other=0.0).to(ACC)
    lse = tl.load(lse_ptr + i * H + h).to(ACC)
    delta = tl.load(delta_ptr + i * H + h).to(ACC)
    start = tl.load(offsets_ptr + i)
    end = tl.load(offsets_ptr + i + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    e0 = start
    while e0 < end:
        eids = e0 + tl.arange(0, BLOCK_E)
        emask = eids < end
        src = tl.load(senders_ptr + eids, mask=emask, other=0)
        m2 = emask[:, None] & cmask[None, :]
        kij = tl.load(k_ptr + src[:, None] * row + base[None, :], mask=m2, other=0.0).to(ACC)
        kij += tl.load(ke_ptr + eids[:, None] * row + base[None, :], mask=m2, other=0.0).to(ACC)
        vij = tl.load(v_ptr + src[:, None] * row + base[None, :], mask=m2, other=0.0).to(ACC)
        vij += tl.load(ve_ptr + eids[:, None] * row + base[None, :], mask=m2, other=0.0).to(ACC)
        s = tl.sum(qi[None, :] * kij, axis=1) * scale
        p = tl.where(emask, tl.exp(s - lse), 0.0)  # [BE]
        ds = p * (tl.sum(doi[None, :] * vij, axis=1) - delta)
        acc += tl.sum(ds[:, None] * kij, axis=0)
        e0 += BLOCK_E
    tl.store(dq_ptr + i * row + base, (acc * scale).to(dq_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def attn_bwd_src_kernel(
    q_ptr, k_ptr, v_ptr, ke_ptr, ve_ptr, do_ptr, lse_ptr, delta_ptr, receivers_ptr, perm_ptr,
    sender_offsets_ptr, dk_ptr, dv_ptr, dke_ptr, dve_ptr,
    H, D, scale, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per sender j: dk_ij = scale ds_e q_i, dv_ij = p_e dO_i; dk_j / dv_j are their sums over j's
    out-edges, dk_edge / dv_edge the per-edge values."""
    j = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row = H * D
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    base = h * D + cols
    kj = tl.load(k_ptr + j * row + base, mask=cmask, other=0.0).to(ACC)
    vj = tl.load(v_ptr + j * row + base, mask=cmask, other=0.0).to(ACC)
    start = tl.load(sender_offsets_ptr + j)
    end = tl.load(sender_offsets_ptr + j + 1)
    acc_k = tl.zeros([BLOCK_D], dtype=ACC)
    acc_v = tl.zeros([BLOCK_D], dtype=ACC)
    p0 = start
    while p0 < end:
        pids = p0 + tl.arange(0, BLOCK_E)
        pmask = pids < end
        eids = tl.load(perm_ptr + pids, mask=pmask, other=0)
        dst = tl.load(receivers_ptr + eids, mask=pmask, other=0)
        m2 = pmask[:, None] & cmask[None, :]
        qr = tl.load(q_ptr + dst[:, None] * row + base[None, :], mask=m2, other=0.0).to(ACC)  # [BE, BD]
        dor = tl.load(do_ptr + dst[:, None] * row + base[None, :], mask=m2, other=0.0).to(ACC)
        lse = tl.load(lse_ptr + dst * H + h, mask=pmask, other=0.0).to(ACC)  # [BE]
        delta = tl.load(delta_ptr + dst * H + h, mask=pmask, other=0.0).to(ACC)
        kij = kj[None, :] + tl.load(ke_ptr + eids[:, None] * row + base[None, :], mask=m2, other=0.0).to(ACC)
        vij = vj[None, :] + tl.load(ve_ptr + eids[:, None] * row + base[None, :], mask=m2, other=0.0).to(ACC)
        s = tl.sum(qr * kij, axis=1) * scale
        p = tl.where(pmask, tl.exp(s - lse), 0.0)
        dvij = p[:, None] * dor  # [BE, BD]
        ds = p * (tl.sum(dor * vij, axis=1) - delta)
        dkij = ds[:, None] * qr * scale
        acc_k += tl.sum(dkij, axis=0)
        acc_v += tl.sum(dvij, axis=0)
        tl.store(dke_ptr + eids[:, None] * row + base[None, :], dkij.to(dke_ptr.dtype.element_ty), mask=m2)
        tl.store(dve_ptr + eids[:, None] * row + base[None, :], dvij.to(dve_ptr.dtype.element_ty), mask=m2)
        p0 += BLOCK_E
    tl.store(dk_ptr + j * row + base, acc_k.to(dk_ptr.dtype.element_ty), mask=cmask)
    tl.store(dv_ptr + j * row + base, acc_v.to(dv_ptr.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------------
# c. sigmoid-gated aggregation: out_i = Σ_e σ(q_i ⊙ k_ij / √d) ⊙ v_ij
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _edge_rows(idx_ptr, eids, emask, HAS_INDEX: tl.constexpr):
    """Row of the edge-feature table each edge reads: idx[e] for a per-distinct-length table, else e."""
    if HAS_INDEX:
        rows = tl.load(idx_ptr + eids, mask=emask, other=0)
    else:
        rows = eids
    return rows


@triton.jit
def gated_fwd_kernel(
    q_ptr, k_ptr, v_ptr, ke_ptr, ve_ptr, idx_ptr, cnt_ptr, senders_ptr, offsets_ptr, out_ptr, d, scale,
    HAS_INDEX: tl.constexpr, HAS_COUNT: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    qi = tl.load(q_ptr + i * d + cols, mask=cmask, other=0.0).to(ACC) * scale  # [BD]
    start = tl.load(offsets_ptr + i)
    end = tl.load(offsets_ptr + i + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    e0 = start
    while e0 < end:
        eids = e0 + tl.arange(0, BLOCK_E)
        emask = eids < end
        src = tl.load(senders_ptr + eids, mask=emask, other=0)
        rows = _edge_rows(idx_ptr, eids, emask, HAS_INDEX)
        m2 = emask[:, None] & cmask[None, :]
        kij = tl.load(k_ptr + src[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        kij += tl.load(ke_ptr + rows[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        vij = tl.load(v_ptr + src[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        vij += tl.load(ve_ptr + rows[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        if HAS_COUNT:  # merged identical edges: the message counts c_e times
            vij = vij * tl.load(cnt_ptr + eids, mask=emask, other=0.0).to(ACC)[:, None]
        acc += tl.sum(_sigmoid(qi[None, :] * kij) * vij, axis=0)  # masked lanes have v_ij = 0
        e0 += BLOCK_E
    tl.store(out_ptr + i * d + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def gated_bwd_dst_kernel(
    q_ptr, k_ptr, v_ptr, ke_ptr, ve_ptr, idx_ptr, cnt_ptr, g_ptr, senders_ptr, offsets_ptr, dq_ptr, d, scale,
    HAS_INDEX: tl.constexpr, HAS_COUNT: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq_i = scale Σ_e dz_e ⊙ k_ij,  dz_e = g_i ⊙ v_ij ⊙ σ(z)(1 - σ(z))."""
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    qi = tl.load(q_ptr + i * d + cols, mask=cmask, other=0.0).to(ACC) * scale
    gi = tl.load(g_ptr + i * d + cols, mask=cmask, other=0.0).to(ACC)
    start = tl.load(offsets_ptr + i)
    end = tl.load(offsets_ptr + i + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    e0 = start
    while e0 < end:
        eids = e0 + tl.arange(0, BLOCK_E)
        emask = eids < end
        src = tl.load(senders_ptr + eids, mask=emask, other=0)
        rows = _edge_rows(idx_ptr, eids, emask, HAS_INDEX)
        m2 = emask[:, None] & cmask[None, :]
        kij = tl.load(k_ptr + src[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        kij += tl.load(ke_ptr + rows[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        vij = tl.load(v_ptr + src[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        vij += tl.load(ve_ptr + rows[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        gate = _sigmoid(qi[None, :] * kij)
        if HAS_COUNT:
            vij = vij * tl.load(cnt_ptr + eids, mask=emask, other=0.0).to(ACC)[:, None]
        dz = gi[None, :] * vij * gate * (1.0 - gate)  # [BE, BD], 0 on masked lanes (v_ij = 0)
        acc += tl.sum(dz * kij, axis=0)
        e0 += BLOCK_E
    tl.store(dq_ptr + i * d + cols, (acc * scale).to(dq_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def gated_bwd_src_kernel(
    q_ptr, k_ptr, v_ptr, ke_ptr, ve_ptr, idx_ptr, cnt_ptr, g_ptr, receivers_ptr, perm_ptr, sender_offsets_ptr,
    dk_ptr, dv_ptr, dke_ptr, dve_ptr, d, scale,
    HAS_INDEX: tl.constexpr, HAS_COUNT: tl.constexpr, STORE_EDGE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per sender j: dv_ij = g_i ⊙ σ(z), dk_ij = scale dz_e ⊙ q_i; summed into dk_j / dv_j and,
    with STORE_EDGE (per-edge features), stored per edge into dk_edge / dv_edge."""
    j = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    kj = tl.load(k_ptr + j * d + cols, mask=cmask, other=0.0).to(ACC)
    vj = tl.load(v_ptr + j * d + cols, mask=cmask, other=0.0).to(ACC)
    start = tl.load(sender_offsets_ptr + j)
    end = tl.load(sender_offsets_ptr + j + 1)
    acc_k = tl.zeros([BLOCK_D], dtype=ACC)
    acc_v = tl.zeros([BLOCK_D], dtype=ACC)
    p0 = start
    while p0 < end:
        pids = p0 + tl.arange(0, BLOCK_E)
        pmask = pids < end
        eids = tl.load(perm_ptr + pids, mask=pmask, other=0)
        dst = tl.load(receivers_ptr + eids, mask=pmask, other=0)
        rows = _edge_rows(idx_ptr, eids, pmask, HAS_INDEX)
        m2 = pmask[:, None] & cmask[None, :]
        qr = tl.load(q_ptr + dst[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC) * scale
        gr = tl.load(g_ptr + dst[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)  # 0 on masked lanes
        if HAS_COUNT:  # c_e g_i: the edge's message counts c_e times
            gr = gr * tl.load(cnt_ptr + eids, mask=pmask, other=0.0).to(ACC)[:, None]
        kij = kj[None, :] + tl.load(ke_ptr + rows[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        vij = vj[None, :] + tl.load(ve_ptr + rows[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        gate = _sigmoid(qr * kij)
        dvij = gr * gate
        dkij = gr * vij * gate * (1.0 - gate) * qr
        acc_k += tl.sum(dkij, axis=0)
        acc_v += tl.sum(dvij, axis=0)
        if STORE_EDGE:
            tl.store(dke_ptr + eids[:, None] * d + cols[None, :], dkij.to(dke_ptr.dtype.element_ty), mask=m2)
            tl.store(dve_ptr + eids[:, None] * d + cols[None, :], dvij.to(dve_ptr.dtype.element_ty), mask=m2)
        p0 += BLOCK_E
    tl.store(dk_ptr + j * d + cols, acc_k.to(dk_ptr.dtype.element_ty), mask=cmask)
    tl.store(dv_ptr + j * d + cols, acc_v.to(dv_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def gated_bwd_row_kernel(
    q_ptr, k_ptr, v_ptr, ke_ptr, ve_ptr, cnt_ptr, g_ptr, senders_ptr, receivers_ptr, row_perm_ptr, row_offsets_ptr,
    dke_ptr, dve_ptr, d, scale,
    HAS_COUNT: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per table row r (a distinct edge length): dk_table[r] = Σ_{e: idx_e = r} dk_ij and dv_table[r]
    likewise, walking r's edges through `row_perm` (stable sort of the index) and recomputing the
    gate per edge: each row written by exactly one program, in a fixed order, no atomics."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    ke = tl.load(ke_ptr + r * d + cols, mask=cmask, other=0.0).to(ACC)  # [BD], the row's own features
    ve = tl.load(ve_ptr + r * d + cols, mask=cmask, other=0.0).to(ACC)
    start = tl.load(row_offsets_ptr + r)
    end = tl.load(row_offsets_ptr + r + 1)
    acc_k = tl.zeros([BLOCK_D], dtype=ACC)
    acc_v = tl.zeros([BLOCK_D], dtype=ACC)
    p0 = start
    while p0 < end:
        pids = p0 + tl.arange(0, BLOCK_E)
        pmask = pids < end
        eids = tl.load(row_perm_ptr + pids, mask=pmask, other=0)
        dst = tl.load(receivers_ptr + eids, mask=pmask, other=0)
        src = tl.load(senders_ptr + eids, mask=pmask, other=0)
        m2 = pmask[:, None] & cmask[None, :]
        qr = tl.load(q_ptr + dst[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC) * scale
        gr = tl.load(g_ptr + dst[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)  # 0 on masked lanes
        if HAS_COUNT:
            gr = gr * tl.load(cnt_ptr + eids, mask=pmask, other=0.0).to(ACC)[:, None]
        kij = ke[None, :] + tl.load(k_ptr + src[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        vij = ve[None, :] + tl.load(v_ptr + src[:, None] * d + cols[None, :], mask=m2, other=0.0).to(ACC)
        gate = _sigmoid(qr * kij)
        acc_v += tl.sum(gr * gate, axis=0)
        acc_k += tl.sum(gr * vij * gate * (1.0 - gate) * qr, axis=0)
        p0 += BLOCK_E
    tl.store(dke_ptr + r * d + cols, acc_k.to(dke_ptr.dtype.element_ty), mask=cmask)
    tl.store(dve_ptr + r * d + cols, acc_v.to(dve_ptr.dtype.element_ty), mask=cmask)
