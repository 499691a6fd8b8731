"""Correctness of every aggregation backend against the native definition (all on CPU).

The Triton backend runs here under TRITON_INTERPRET=1 (which `.ci/test` sets) on small graphs;
the heavier real-data comparisons are marked slow. Each backend is also checked with fp64
gradcheck, on empty / isolated / skewed neighbourhoods, and for bit-identical repeated runs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pretrain import kernels
from pretrain.kernels import CSRGraph, native
from pretrain.kernels import reference as reference_backend
from pretrain.kernels import triton_backend

OPS = ("gmr_sum", "gmr_mean", "attention", "gated")


def _backend_params():
    params = [pytest.param("native"), pytest.param("cpu_fused")]
    params.append(
        pytest.param(
            "reference",
            marks=pytest.mark.skipif(not reference_backend.available(), reason="torch_scatter is not importable"),
        )
    )
    params.append(
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(
                not triton_backend.available("cpu"), reason="triton kernels need TRITON_INTERPRET=1 on CPU"
            ),
        )
    )
    return params


BACKENDS = _backend_params()


# ---------------------------------------------------------------------------------------------
# graphs and inputs
# ---------------------------------------------------------------------------------------------


def graph_from_degrees(degrees, generator, senders=None) -> CSRGraph:
    degrees = torch.as_tensor(degrees, dtype=torch.long)
    offsets = torch.zeros(degrees.numel() + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(degrees, 0)
    n, e = degrees.numel(), int(offsets[-1])
    if senders is None:
        senders = torch.randint(0, max(n, 1), (e,), generator=generator)
    return CSRGraph.from_offsets(torch.as_tensor(senders, dtype=torch.long), offsets).validate()


def skewed_graph(generator) -> CSRGraph:
    """A hub receiving 40 edges (three tiles of 16), isolated atoms with no edges at all, degree-1
    receivers, and a popular sender that most edges come from."""
    degrees = [40, 0, 1, 3, 0, 1, 7, 0]
    e = sum(degrees)
    senders = torch.randint(0, len(degrees), (e,), generator=generator)
    senders[::2] = 5  # skewed out-degree too
    senders[senders == 1] = 2  # atom 1 is isolated: no in- and no out-edges
    senders[senders == 4] = 3  # atom 4 likewise
    return graph_from_degrees(degrees, generator, senders)


def make_inputs(op, graph, d, heads=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, e = graph.num_nodes, graph.num_edges

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    if op.startswith("gmr"):
        return [rand(n, d), rand(e, d)]
    if op == "attention":
        hd = max(d // heads, 1)
        return [rand(n, heads, hd), rand(n, heads, hd), rand(n, heads, hd), rand(e, heads, hd), rand(e, heads, hd)]
    return [rand(n, d), rand(n, d), rand(n, d), rand(e, d), rand(e, d)]


def run(op, backend, inputs, graph):
    if op == "gmr_sum":
        return kernels.gather_multiply_reduce(*inputs, graph, "sum", backend=backend)
    if op == "gmr_mean":
        return kernels.gather_multiply_reduce(*inputs, graph, "mean", backend=backend)
    if op == "attention":
        return kernels.neighbor_attention(*inputs, graph, backend=backend)
    return kernels.gated_aggregate(*inputs, graph, backend=backend)


def forward_backward(op, backend, inputs, graph, seed=1):
    out = run(op, backend, inputs, graph)
    # drawn on the CPU (the same numbers on every device), then moved to the output's device
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    return out.detach(), grads


def assert_matches_native(op, backend, graph, d, dtype, atol, rtol=1e-5, seed=0):
    inputs = make_inputs(op, graph, d, dtype=dtype, seed=seed)
    expected, expected_grads = forward_backward(op, "native", inputs, graph)
    got, got_grads = forward_backward(op, backend, inputs, graph)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol, msg=lambda m: f"{backend} {op} forward: {m}")
    for i, (a, b) in enumerate(zip(got_grads, expected_grads)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{backend} {op} grad of input {i}: {m}")


# ---------------------------------------------------------------------------------------------
# small synthetic graphs (every backend, including the interpreted Triton kernels)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_skewed_degrees_and_isolated_atoms_match_native(backend, op):
    graph = skewed_graph(torch.Generator().manual_seed(3))
    assert_matches_native(op, backend, graph, d=6, dtype=torch.float64, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_fp32_matches_native_with_partial_feature_tiles(backend, op):
    # width 136 is not a multiple of the 128-wide feature tile: exercises the masked tail
    graph = graph_from_degrees([5, 2, 0, 3], torch.Generator().manual_seed(4))
    assert_matches_native(op, backend, graph, d=136, dtype=torch.float32, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_graph_without_edges_gives_zeros(backend, op):
    graph = graph_from_degrees([0, 0, 0], torch.Generator().manual_seed(0))
    inputs = make_inputs(op, graph, d=4)
    out, grads = forward_backward(op, backend, inputs, graph)
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize(
    "backend", [b if b.values[0] != "triton" else pytest.param("triton", marks=[*b.marks, pytest.mark.slow]) for b in BACKENDS]
)
@pytest.mark.parametrize("op", OPS)
def test_fp64_gradcheck(backend, op):
    graph = graph_from_degrees([3, 0, 2, 1, 4], torch.Generator().manual_seed(5))
    inputs = make_inputs(op, graph, d=4, heads=2)
    # the interpreted Triton kernels are slow: fast-mode gradcheck (random projections) for them
    assert torch.autograd.gradcheck(
        lambda *xs: run(op, backend, list(xs), graph), inputs, fast_mode=backend == "triton", atol=1e-7
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_repeated_runs_are_bit_identical(backend, op):
    graph = skewed_graph(torch.Generator().manual_seed(6))
    inputs = make_inputs(op, graph, d=8, dtype=torch.float32)
    first, first_grads = forward_backward(op, backend, inputs, graph)
    second, second_grads = forward_backward(op, backend, inputs, graph)
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))


def test_attention_is_softmax_weighted_mean_of_values():
    """Independent check of the definition: equal logits → the plain mean of v_ij."""
    graph = graph_from_degrees([3, 1], torch.Generator().manual_seed(0), senders=[0, 1, 1, 0])
    q = torch.zeros(2, 1, 2, dtype=torch.float64)  # zero queries → uniform attention
    v = torch.tensor([[[1.0, 2.0]], [[3.0, 5.0]]], dtype=torch.float64)
    v_edge = torch.zeros(4, 1, 2, dtype=torch.float64)
    for backend in ("native", "cpu_fused"):
        out = kernels.neighbor_attention(q, q.clone(), v, v_edge, v_edge, graph, backend=backend)
        torch.testing.assert_close(out[0, 0], (v[0, 0] + 2 * v[1, 0]) / 3)
        torch.testing.assert_close(out[1, 0], v[0, 0])


# ---------------------------------------------------------------------------------------------
# real MP-20 graphs (kNN, 25 neighbours, from the data pipeline's collate)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mp20_graph(mp20_records):
    from data_pipeline.load.collate import BatchViews, collate
    from data_pipeline.load.neighbors import NeighborRule

    batch = collate(mp20_records, BatchViews(graph=NeighborRule()))
    return CSRGraph.from_batch(batch).validate()


@pytest.mark.parametrize("backend", ["cpu_fused", BACKENDS[2]])
@pytest.mark.parametrize("op", OPS)
def test_cpu_backends_match_native_on_mp20(mp20_graph, backend, op):
    assert mp20_graph.num_edges > 20 * mp20_graph.num_nodes  # a real kNN graph, not a toy
    assert_matches_native(op, backend, mp20_graph, d=64, dtype=torch.float32, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.skipif(not triton_backend.available("cpu"), reason="triton kernels need TRITON_INTERPRET=1 on CPU")
def test_triton_matches_native_on_mp20(mp20_records, op):
    from data_pipeline.load.collate import BatchViews, collate
    from data_pipeline.load.neighbors import NeighborRule

    # two crystals only: the interpreter runs each program in Python
    graph = CSRGraph.from_batch(collate(mp20_records[:2], BatchViews(graph=NeighborRule()))).validate()
    assert_matches_native(op, "triton", graph, d=8, dtype=torch.float32, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("graph_kind", ["mp20", "skewed"])
def test_cpu_fused_chunking_does_not_change_results(mp20_graph, monkeypatch, op, graph_kind):
    """Small chunks (many chunk boundaries; kNN uniform-degree and skewed paths) change nothing."""
    from pretrain.kernels import cpu_fused

    if graph_kind == "mp20":
        graph = mp20_graph
    else:
        degrees = torch.randint(0, 30, (200,), generator=torch.Generator().manual_seed(7))
        degrees[::17] = 0
        graph = graph_from_degrees(degrees, torch.Generator().manual_seed(8))
    inputs = make_inputs(op, graph, d=16, dtype=torch.float64)
    monkeypatch.setattr(cpu_fused, "CHUNK_EDGES", 10**9)  # one chunk
    expected, expected_grads = forward_backward(op, "cpu_fused", inputs, graph)
    chunk = 40 if graph_kind == "skewed" else 200  # → 320 / 1600 edges a chunk at width 16
    monkeypatch.setattr(cpu_fused, "CHUNK_EDGES", chunk)
    assert len(graph.receiver_chunks(chunk * 128 // 16)) > 5
    got, got_grads = forward_backward(op, "cpu_fused", inputs, graph)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# dispatch and graph checks
# ---------------------------------------------------------------------------------------------


def test_auto_backend_choice_and_override():
    kernels.set_backend("auto")
    assert kernels.get_backend(torch.device("cpu")) == "cpu_fused"
    try:
        kernels.set_backend("native")
        assert kernels.get_backend(torch.device("cpu")) == "native"
        with pytest.raises(ValueError, match="unknown aggregation backend"):
            kernels.set_backend("cuda-magic")
    finally:
        kernels.set_backend("auto")
    assert set(kernels.available_backends("cpu")) >= {"native", "cpu_fused"}
    from pretrain.kernels import dispatch

    tiny, big = dispatch.CPU_FUSED_MIN_ELEMENTS - 1, dispatch.CPU_FUSED_MIN_ELEMENTS
    assert dispatch._impl(None, torch.device("cpu"), tiny).__name__.endswith(".native")
    assert dispatch._impl(None, torch.device("cpu"), big).__name__.endswith(".cpu_fused")


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    graph = graph_from_degrees([1, 1], torch.Generator().manual_seed(0), senders=[1, 0])
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="triton"):
        kernels.gather_multiply_reduce(x, torch.randn(2, 4), graph, backend="triton")


def test_csr_graph_validate_names_the_problem():
    good = graph_from_degrees([2, 1], torch.Generator().manual_seed(0), senders=[1, 0, 0])
    bad_sender = CSRGraph.from_offsets(torch.tensor([1, 0, 5]), good.offsets)
    with pytest.raises(ValueError, match="sender index out of range"):
        bad_sender.validate()
    unsorted = CSRGraph(senders=good.senders, receivers=torch.tensor([1, 0, 0]), offsets=good.offsets, num_nodes=2)
    with pytest.raises(ValueError, match="sorted by receiver"):
        unsorted.validate()


def test_by_sender_csr_lists_each_edge_once_in_order():
    graph = skewed_graph(torch.Generator().manual_seed(2))
    perm, offsets = graph.by_sender()
    assert torch.equal(torch.sort(perm).values, torch.arange(graph.num_edges))
    for j in range(graph.num_nodes):
        run_ = perm[offsets[j] : offsets[j + 1]]
        assert torch.all(graph.senders[run_] == j)
        assert torch.all(run_[1:] > run_[:-1])  # stable: edge order kept within a sender


def test_kernels_import_without_interpreter():
    """The plain-import path (a CPU machine without TRITON_INTERPRET): run in a fresh process with the
    interpreter off, so the gate is exercised even under `.ci/test`'s TRITON_INTERPRET=1."""
    import subprocess
    import sys

    code = "from pretrain import kernels; print(','.join(kernels.available_backends('cpu')))"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    backends = result.stdout.strip().split(",")
    assert "native" in backends and "triton" not in backends, backends


def test_benchmark_script_runs_and_reports_ratios(tmp_path):
    """The benchmark runs from one command; a tiny configuration keeps this fast."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "neighbor_scatter.py"
    spec = importlib.util.spec_from_file_location("neighbor_scatter_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.md"
    bench.main(["--atoms", "200", "--repeats", "1", "--widths", "32", "--sizes", "mp20", "--backends", "native", "cpu_fused", "--copy-mib", "16", "--markdown", str(out)])
    text = out.read_text()
    assert "measured copy bandwidth" in text
    for op in ("gmr", "attention", "gated"):
        assert f"### {op}, mp20" in text
    assert "| cpu_fused |" in text and "speed-up vs native" in text


def test_benchmark_end_to_end_step_runs_and_reports_memory(tmp_path, shared_data):
    """--e2e on a tiny real batch: the three paths, their time ratios and both memory columns."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "neighbor_scatter.py"
    spec = importlib.util.spec_from_file_location("neighbor_scatter_bench_e2e", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "e2e.md"
    bench.main(["--e2e", "--e2e-only", "--e2e-atoms", "40", "--e2e-models", "matformer", "--repeats", "1",
                "--copy-mib", "16", "--markdown", str(out)])
    text = out.read_text()
    assert "one matformer training step" in text and "| fused edges (default) | cpu_fused | True |" in text
    assert "saved activations MB" in text and "peak allocated MB" in text


def test_cpu_fused_refuses_double_backward_loudly():
    """Force training differentiates a gradient; the fused backward is not differentiable and must
    say so instead of returning a silently wrong second derivative."""
    graph = graph_from_degrees([2, 1], torch.Generator().manual_seed(0), senders=[1, 0, 0])
    x, w = make_inputs("gmr_sum", graph, d=3)
    out = kernels.gather_multiply_reduce(x, w, graph, backend="cpu_fused")
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|does not require grad"):
        gx.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton kernels)")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("d", [128, 256])
def test_triton_on_cuda_matches_native(mp20_graph, op, d):
    """On a GPU: the compiled kernels (pinned launch configurations) against the native path on real MP-20 graphs."""
    graph = mp20_graph.to("cuda")
    inputs = [x.detach().cuda().requires_grad_() for x in make_inputs(op, graph, d, heads=d // 32, dtype=torch.float32)]
    expected, expected_grads = forward_backward(op, "native", inputs, graph)
    got, got_grads = forward_backward(op, "triton", inputs, graph)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    again, again_grads = forward_backward(op, "triton", inputs, graph)
    assert torch.equal(got, again) and all(torch.equal(a, b) for a, b in zip(got_grads, again_grads))


# ---------------------------------------------------------------------------------------------
# edge-feature fusion: gated_aggregate_edges (table rows gathered inside) and
# gated_aggregate_edge_mlp (edge MLP run inside, per chunk), on real MP-20 graphs
# ---------------------------------------------------------------------------------------------

FUSED_OPS = ("table", "table_merged", "mlp_per_edge", "mlp_table")


def _mp20_edges(records, dtype=torch.float64):
    """(graph, per-edge lengths [E], distinct lengths [U], index [E]) of a real kNN batch (k=25)."""
    from data_pipeline.load.collate import BatchViews, collate
    from data_pipeline.load.neighbors import NeighborRule

    batch = collate(records, BatchViews(graph=NeighborRule()), dtype=dtype)
    graph = CSRGraph.from_batch(batch).validate()
    return graph, batch.edge_vectors().norm(dim=-1), batch.edge_lengths.to(dtype), batch.edge_length_index


class _EdgeMLP(torch.nn.Module):
    """RBF(|r|) → Linear → Softplus → Linear → (k_e, v_e): the shape of the encoders' edge MLPs."""

    def __init__(self, d, bins=6, hidden=5, dtype=torch.float64):
        super().__init__()
        from pretrain.encoders.blocks import GaussianRBF

        self.rbf = GaussianRBF(0.0, 6.0, bins)
        self.first = torch.nn.Linear(bins, hidden, dtype=dtype)
        self.second = torch.nn.Linear(hidden, 2 * d, dtype=dtype)

    def forward(self, length):
        return self.second(torch.nn.functional.softplus(self.first(self.rbf(length)))).chunk(2, dim=-1)


def _fused_inputs(op, graph, lengths, table, d, dtype=torch.float64, seed=0):
    """(tensors to differentiate, call(backend, *tensors)) for one fused op."""
    g = torch.Generator().manual_seed(seed)
    n = graph.num_nodes

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    q, k, v = rand(n, d), rand(n, d), rand(n, d)
    index = table[1]
    if op.startswith("table"):
        rows = table[0].numel()
        kt, vt = rand(rows, d), rand(rows, d)
        if op == "table":
            return [q, k, v, kt, vt], lambda b, *xs: kernels.gated_aggregate_edges(*xs, index, graph, backend=b)
        merged, merged_index, count = graph.merge_parallel(index, rows)  # identical edges, counted
        assert merged.num_edges < graph.num_edges and int(count.sum()) == graph.num_edges
        return [q, k, v, kt, vt], lambda b, *xs: kernels.gated_aggregate_edges(
            *xs, merged_index, merged.validate(), edge_count=count, backend=b
        )
    torch.manual_seed(seed)
    mlp = _EdgeMLP(d, dtype=dtype)
    params = list(mlp.parameters())
    rows = (lengths if op == "mlp_per_edge" else table[0]).detach().clone().requires_grad_()
    idx = None if op == "mlp_per_edge" else index

    def call(b, q, k, v, rows, *_params):  # gradcheck perturbs the parameters in place
        return kernels.gated_aggregate_edge_mlp(q, k, v, rows, mlp, params, graph, edge_index=idx, backend=b)

    return [q, k, v, rows, *params], call


FUSED_BACKENDS = [b for b in BACKENDS if b.values[0] != "native"]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", FUSED_OPS)
def test_fused_edge_ops_fp64_gradcheck_on_real_mp20(mp20_records, backend, op):
    """Every input, the distinct-length table or the per-edge lengths, and the edge MLP's weights,
    on two real MP-20 crystals (kNN k=25, ties kept)."""
    graph, lengths, table, index = _mp20_edges(mp20_records[:2])
    inputs, call = _fused_inputs(op, graph, lengths, (table, index), d=3)
    assert torch.autograd.gradcheck(
        lambda *xs: call(backend, *xs), inputs, fast_mode=backend == "triton", atol=1e-7
    )


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", FUSED_OPS)
def test_fused_edge_ops_match_native_fp32(mp20_records, backend, op):
    """float32 against the native definition: 64 crystals (Triton: 4, interpreted), width 48."""
    records = mp20_records[:4] if backend == "triton" else mp20_records
    graph, lengths, table, index = _mp20_edges(records, torch.float32)
    inputs, call = _fused_inputs(op, graph, lengths, (table, index), d=48, dtype=torch.float32)
    expected = call("native", *inputs)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    got = call(backend, *inputs)
    got_grads = torch.autograd.grad(got, inputs, grad_out)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    for i, (a, b) in enumerate(zip(got_grads, expected_grads)):
        torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-4, msg=lambda m: f"{backend} {op} grad {i}: {m}")
    again = call(backend, *inputs)
    again_grads = torch.autograd.grad(again, inputs, grad_out)
    assert torch.equal(got, again) and all(torch.equal(a, b) for a, b in zip(got_grads, again_grads))


@pytest.mark.parametrize("op", FUSED_OPS)
def test_fused_edge_ops_chunking_does_not_change_results(mp20_records, monkeypatch, op):
    """Many chunk boundaries (per-chunk partial weight gradients, summed in chunk order) change
    nothing beyond rounding."""
    from pretrain.kernels import cpu_fused

    graph, lengths, table, index = _mp20_edges(mp20_records)
    inputs, call = _fused_inputs(op, graph, lengths, (table, index), d=16)
    monkeypatch.setattr(cpu_fused, "CHUNK_EDGES", 10**9)
    expected = torch.autograd.grad(call("cpu_fused", *inputs).sum(), inputs)
    monkeypatch.setattr(cpu_fused, "CHUNK_EDGES", 100)
    assert len(graph.receiver_chunks(100 * 128 // 48)) > 5
    got = torch.autograd.grad(call("cpu_fused", *inputs).sum(), inputs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-12)


def test_merged_parallel_edges_give_the_same_sum(mp20_records):
    """Merging edges with the same receiver, sender and length row, weighted by their count, gives
    the unmerged sum (and gradients) of the native definition; MP-20 has ~1.5 edges per merged edge."""
    graph, lengths, table, index = _mp20_edges(mp20_records)
    merged, merged_index, count = graph.merge_parallel(index, table.numel())
    assert graph.num_edges / merged.num_edges > 1.2
    inputs, call = _fused_inputs("table", graph, lengths, (table, index), d=8)
    expected = torch.autograd.grad(call("native", *inputs).square().sum(), inputs)
    for backend in ("native", "cpu_fused"):
        out = kernels.gated_aggregate_edges(*inputs, merged_index, merged, edge_count=count, backend=backend)
        got = torch.autograd.grad(out.square().sum(), inputs)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_triton_launch_configs_are_pinned_per_width():
    """No autotuning: one launch configuration per width, from a fixed rule (resumed runs and reruns
    compile the same kernels and sum in the same order)."""
    if triton_backend.triton is None:
        pytest.skip("triton is not importable")
    assert triton_backend.launch_config(128) == {"BLOCK_E": 16, "num_warps": 4}
    assert triton_backend.launch_config(32) == {"BLOCK_E": 16, "num_warps": 2}
    assert triton_backend.launch_config(256) == triton_backend.launch_config(128)
    source = Path(triton_backend.__file__).read_text()
    assert "triton.autotune" not in source and "autotune(" not in source
