"""The Triton kernels as torch custom ops: schema, fake (meta) and autograd registrations checked by
`torch.library.opcheck`, and a torch.compile trace that keeps each op as one node (no graph
break). Runs under TRITON_INTERPRET=1 on CPU (set by `.ci/test`) with tiny graphs."""
from __future__ import annotations

import pytest
import torch

from pretrain import kernels
from pretrain.kernels import CSRGraph, triton_backend

pytestmark = pytest.mark.skipif(
    not triton_backend.available("cpu"), reason="triton kernels need TRITON_INTERPRET=1 on CPU"
)


@pytest.fixture
def graph():
    offsets = torch.tensor([0, 3, 3, 5, 6])
    return CSRGraph.from_offsets(torch.tensor([1, 2, 3, 0, 0, 2]), offsets).validate()


def _csr(graph):
    perm, sender_offsets = graph.by_sender()
    return graph.senders, graph.receivers, graph.offsets, perm, sender_offsets


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.slow
def test_opcheck_gather_multiply_reduce(graph):
    for mean in (False, True):
        args = (_rand(4, 5), _rand(6, 5), *_csr(graph), mean)
        torch.library.opcheck(triton_backend.gmr, args)


@pytest.mark.slow
def test_opcheck_neighbor_attention(graph):
    args = (_rand(4, 2, 3), _rand(4, 2, 3), _rand(4, 2, 3), _rand(6, 2, 3), _rand(6, 2, 3), *_csr(graph))
    torch.library.opcheck(triton_backend.attention, args)


def test_opcheck_gated_aggregate(graph):
    args = (_rand(4, 5), _rand(4, 5), _rand(4, 5), _rand(6, 5), _rand(6, 5), *_csr(graph))
    torch.library.opcheck(triton_backend.gated, args)


def test_opcheck_gated_aggregate_edges(graph):
    """The table-gather op: edges read rows of a 3-row table, each row reached by 1–3 edges and one by
    none (its gradient is 0)."""
    index = torch.tensor([2, 0, 2, 0, 2, 1])
    index[index == 1] = 0  # row 1 unused
    row_perm, row_offsets = graph.by_row(index, 3)
    count = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    args = (_rand(4, 5), _rand(4, 5), _rand(4, 5), _rand(3, 5), _rand(3, 5), index, count, row_perm, row_offsets, *_csr(graph))
    torch.library.opcheck(triton_backend.gated_edges, args)


def test_compiled_layer_keeps_the_fused_op_and_matches_eager(graph):
    """torch.compile (aot_eager: no C++ toolchain needed) traces through the custom op with
    fullgraph=True, i.e. the fake registration is enough and there is no graph break."""
    torch._dynamo.reset()
    q, k, v = _rand(4, 5), _rand(4, 5), _rand(4, 5)
    k_edge, v_edge = _rand(6, 5), _rand(6, 5)

    def layer(q, k, v, k_edge, v_edge):
        return torch.tanh(kernels.gated_aggregate(q, k, v, k_edge, v_edge, graph, backend="triton")).sum()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    inputs = (q, k, v, k_edge, v_edge)
    eager_loss = layer(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    compiled_loss = compiled(*inputs)
    compiled_grads = torch.autograd.grad(compiled_loss, inputs)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_gmr_fake_has_the_ops_dtype(graph):
    """The fake (meta) output dtype is result_type(x, w), like the real op (fp32 x, fp64 w → fp64)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w = torch.randn(4, 5, dtype=torch.float32), torch.randn(6, 5, dtype=torch.float64)
    real = triton_backend.gmr(x, w, *_csr(graph), False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = triton_backend.gmr(x, w, *_csr(graph), False)
    assert real.dtype == fake.dtype == torch.float64 and fake.shape == real.shape
