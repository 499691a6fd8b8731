"""Neighbour-scatter benchmark: every aggregation backend against the torch-scatter composition.

For each op (gather–multiply–reduce, neighbour attention, sigmoid-gated aggregation), batch kind
(MP-20-like: ~10 atoms per crystal; large-cell: ~200 atoms per crystal; 25 neighbours per atom)
and width (128, 256), it measures in one process:

    forward time and forward+backward time (best of --repeats)
    saved activation memory: bytes autograd keeps for the backward beyond the inputs (exact,
        via saved_tensors_hooks); peak memory growth during forward+backward (CUDA: allocator
        peak; CPU: the process's peak RSS, VmHWM reset through /proc/self/clear_refs)
    achieved bandwidth: the op's minimal DRAM traffic (each E×d input read once per pass, each
        E×d gradient written once, N×d terms included) / time, as a fraction of the device's copy
        bandwidth measured in the same run

and prints each backend's ratio against the torch-scatter composition ("reference"; the native
path stands in when torch_scatter is missing, and the table says so).

    python benchmarks/neighbor_scatter.py                     # CPU, all ops, both sizes and widths
    python benchmarks/neighbor_scatter.py --device cuda       # GPU (triton path included)
    python benchmarks/neighbor_scatter.py --quick             # small batch, for a smoke run
    python benchmarks/neighbor_scatter.py --e2e               # + Matformer and PDDFormer training steps (10k MP-20
                                                              #   atoms, default sizes): torch-scatter composition vs
                                                              #   fused sum on dense edges vs fused edges; time,
                                                              #   saved activations, allocator peak
    python benchmarks/neighbor_scatter.py --sweep-chunk       # cpu_fused chunk size sweep
    ... --markdown out.md                                     # also write the tables as markdown
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import kernels  # noqa: E402
from pretrain.kernels import CSRGraph  # noqa: E402
from pretrain.kernels import cpu_fused  # noqa: E402

OPS = ("gmr", "attention", "gated")
SIZES = {"mp20": (8, 12), "large": (180, 220)}  # atoms per crystal (uniform range)
NEIGHBOURS = 25
HEAD_DIM = 32


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------


def make_graph(total_atoms: int, atoms_per_crystal: tuple[int, int], k: int, seed: int, device) -> CSRGraph:
    """Crystals of random size until `total_atoms`; every atom receives k edges from atoms of its
    own crystal (drawn with replacement, as periodic images repeat atoms). Receiver-sorted."""
    g = torch.Generator().manual_seed(seed)
    sizes, n = [], 0
    while n < total_atoms:
        sizes.append(int(torch.randint(atoms_per_crystal[0], atoms_per_crystal[1] + 1, (1,), generator=g)))
        n += sizes[-1]
    sizes = torch.tensor(sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    crystal = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # [N]
    local = (torch.rand(n, k, generator=g) * sizes[crystal].unsqueeze(-1)).long()  # [N, k]
    senders = (starts[crystal].unsqueeze(-1) + local).reshape(-1)  # [E]
    offsets = torch.arange(n + 1) * k
    return CSRGraph.from_offsets(senders, offsets).to(device)


def make_inputs(op: str, graph: CSRGraph, d: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, e = graph.num_nodes, graph.num_edges

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_()

    if op == "gmr":
        return [rand(n, d), rand(e, d)]
    if op == "attention":
        h = d // HEAD_DIM
        return [rand(n, h, HEAD_DIM) for _ in range(3)] + [rand(e, h, HEAD_DIM) for _ in range(2)]
    return [rand(n, d) for _ in range(3)] + [rand(e, d) for _ in range(2)]


def call(op: str, backend: str, inputs, graph):
    if op == "gmr":
        return kernels.gather_multiply_reduce(*inputs, graph, "sum", backend=backend)
    if op == "attention":
        return kernels.neighbor_attention(*inputs, graph, backend=backend)
    return kernels.gated_aggregate(*inputs, graph, backend=backend)


def floor_bytes(op: str, n: int, e: int, d: int, elem: int) -> int:
    """Minimal DRAM traffic of forward + backward: E×d inputs read in each pass, E×d gradients
    written once, per-node tensors read/written once per pass."""
    if op == "gmr":  # fwd: w, x, out; bwd: w, x, g, gx, gw
        return elem * (2 * e * d + e * d + 6 * n * d)
    # fwd: k_e, v_e, q, k, v, out; bwd: k_e, v_e, q, k, v, g, (out), dk_e, dv_e, dq, dk, dv
    return elem * (4 * e * d + 2 * e * d + 13 * n * d)


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical DRAM peak."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


class SavedBytes:
    """Bytes of tensors autograd saves for the backward, excluding the inputs' own storage."""

    def __init__(self, inputs):
        self.exclude = {t.untyped_storage().data_ptr() for t in inputs}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _rss_reset_and_read() -> int | None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return _proc_status("VmRSS")
    except OSError:
        return None


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(op, backends, graph, d, dtype, device, repeats):
    """Time every backend on the same inputs, round-robin (so a load spike from other processes
    hits all backends alike), best of `repeats`; then measure memory one backend at a time."""
    inputs = make_inputs(op, graph, d, dtype, device)
    with torch.no_grad():
        grad_out = torch.randn_like(call(op, "native", inputs, graph))

    def clear():
        for x in inputs:
            x.grad = None

    for backend in backends:  # warm-up: Triton compiles, CSR caches fill
        clear()
        call(op, backend, inputs, graph).backward(grad_out)
    fwd = {b: math.inf for b in backends}
    total = dict(fwd)
    for _ in range(repeats):
        for backend in backends:
            clear()
            sync(device)
            t0 = time.perf_counter()
            out = call(op, backend, inputs, graph)
            sync(device)
            t1 = time.perf_counter()
            out.backward(grad_out)
            sync(device)
            t2 = time.perf_counter()
            fwd[backend], total[backend] = min(fwd[backend], t1 - t0), min(total[backend], t2 - t0)
            del out
    elem = torch.finfo(dtype).bits // 8
    results = {}
    for backend in backends:
        clear()
        saved = SavedBytes(inputs)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            out = call(op, backend, inputs, graph)
        del out
        clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call(op, backend, inputs, graph).backward(grad_out)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _rss_reset_and_read()
            call(op, backend, inputs, graph).backward(grad_out)
            peak = None if base is None else max(_proc_status("VmHWM") - base, 0)
        results[backend] = {
            "fwd": fwd[backend],
            "total": total[backend],
            "saved": saved.total,
            "peak": peak,
            "floor": floor_bytes(op, graph.num_nodes, graph.num_edges, d, elem),
        }
    clear()
    return results


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------


def fmt_mb(x):
    return "n/a" if x is None else f"{x / 2**20:.0f}"


def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def table(results, baseline, copy_bw, title):
    head = (
        f"### {title}\n\n| backend | fwd ms | fwd+bwd ms | speed-up vs {baseline} | saved MB | saved ratio "
        f"| peak MB | peak ratio | GB/s | of copy BW |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    base = results[baseline]
    for name, r in results.items():
        gbs = r["floor"] / r["total"] / 1e9
        rows.append(
            f"| {name} | {r['fwd'] * 1e3:.1f} | {r['total'] * 1e3:.1f} | {base['total'] / r['total']:.2f}x "
            f"| {fmt_mb(r['saved'])} | {ratio(r['saved'], base['saved'])} | {fmt_mb(r['peak'])} "
            f"| {ratio(r['peak'], base['peak'])} | {gbs:.1f} | {gbs * 1e9 / copy_bw:.0%} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# end to end: one Matformer and one PDDFormer training step at default sizes, three paths
# ---------------------------------------------------------------------------------------------

# (label, aggregation backend, edge_fusion): the torch-scatter composition (dense E×d edge tensors,
# torch_scatter sums), the path before edge fusion (fused sums on E×d edge tensors), and fused edges
# (edge features gathered or computed inside the aggregation; no E×d tensor).
E2E_PATHS = (
    ("torch-scatter composition", "reference", False),
    ("fused sum, dense edges (before)", "cpu_fused", False),
    ("fused edges (default)", "cpu_fused", True),
)
E2E_MODELS = {
    "matformer": {"name": "matformer"},  # width 128, 5 layers, 4 heads, k=12
    "pddformer": {"name": "pddformer"},  # width 256, 4 layers, k=25, PDD k=92
}


def _allocator_peak(fn) -> int:
    """Peak bytes of tensors alive at once during fn() above those alive before it, from the torch
    profiler's memory records: each op's own allocations (self_cpu_memory_usage, placed at the op's
    start) and every free ('[memory]' events, negative), replayed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        ((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage),
        key=lambda t: t[0],
    )
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def _saved_activation_bytes(model, batch) -> int:
    """Bytes autograd keeps between forward and backward, parameters excluded (activation memory)."""
    saved = SavedBytes(list(model.parameters()))
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        out = model(batch)
    del out
    return saved.total


def e2e(device, atoms: int, repeats: int, models=tuple(E2E_MODELS), paths=E2E_PATHS) -> str:
    """Time fwd+bwd of one training step (loss on the mean-pooled readout) per model and path, in one
    process, round-robin over the paths (a load spike hits all alike), best of `repeats`; then the
    saved activation bytes and the allocator peak of one step per path."""
    from data_pipeline.load.collate import BatchViews, collate
    from data_pipeline.load.neighbors import NeighborRule
    from pretrain.encoders import build_encoder
    from pretrain.encoders.blocks import edge_lengths

    shared = Path(os.environ.get("CRYSTALFM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (shared / "mp_20" / "val.csv.gz").exists():
        return f"(end-to-end skipped: MP-20 not found under {shared})"
    records = _mp20_records(shared, atoms)
    paths = [p for p in paths if p[1] in kernels.available_backends(device) or p[1] == "native"]
    sections = []
    for name in models:
        torch.manual_seed(0)
        model = build_encoder(E2E_MODELS[name]).to(device)
        views = BatchViews(graph=NeighborRule(**model.neighbor_rule), pdd_k=model.pdd_k if model.needs_pdd else None)
        batch = collate(records, views).to(device)
        lengths, index = edge_lengths(batch, torch.float32)
        width = model.out_dim
        edge_width = width * getattr(model.layers[0], "heads", 1) if name == "matformer" else width

        def step(backend, fusion):
            kernels.set_backend(backend)
            model.edge_fusion = fusion
            try:
                loss = model.readout(model(batch), batch).pow(2).mean()
                loss.backward()
            finally:
                kernels.set_backend("auto")
            model.zero_grad(set_to_none=True)

        times = {p: math.inf for p in paths}
        for p in paths:  # warm-up (CSR caches, first-touch of the allocator)
            step(p[1], p[2])
        for _ in range(repeats):
            for p in paths:
                sync(device)
                t0 = time.perf_counter()
                step(p[1], p[2])
                sync(device)
                times[p] = min(times[p], time.perf_counter() - t0)
        memory = {}
        for p in paths:
            kernels.set_backend(p[1])
            model.edge_fusion = p[2]
            try:
                saved = _saved_activation_bytes(model, batch)
            finally:
                kernels.set_backend("auto")
            memory[p] = (saved, _allocator_peak(lambda: step(p[1], p[2])))
        base = paths[0]
        lines = [
            f"### End to end: one {name} training step, default size (width {width}, "
            f"{batch.num_crystals} MP-20 crystals, "
            f"{batch.num_nodes} atoms, {batch.num_edges} edges, {lengths.numel()} distinct lengths; "
            f"one E×{edge_width} fp32 edge tensor = {batch.num_edges * edge_width * 4 / 2**20:.0f} MB)\n",
            f"| path | backend | edge_fusion | fwd+bwd ms | speed-up vs {base[0]} | saved activations MB | ratio "
            f"| peak allocated MB | ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in paths:
            saved, peak = memory[p]
            lines.append(
                f"| {p[0]} | {p[1]} | {p[2]} | {times[p] * 1e3:.0f} | {times[base] / times[p]:.2f}x "
                f"| {saved / 2**20:.0f} | {saved / max(memory[base][0], 1):.2f} | {peak / 2**20:.0f} "
                f"| {peak / max(memory[base][1], 1):.2f} |"
            )
        sections.append("\n".join(lines))
        print("\n" + sections[-1], flush=True)
        del model, batch
    return "\n\n".join(sections)


def _mp20_records(shared: Path, atoms: int):
    """The first MP-20 validation crystals, in file order, until they hold `atoms` atoms."""
    import csv
    import gzip
    import warnings

    from pymatgen.core import Structure

    from data_pipeline.record import CrystalRecord

    records, total = [], 0
    with gzip.open(shared / "mp_20" / "val.csv.gz", "rt") as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for row in csv.DictReader(handle):
            structure = Structure.from_str(row["cif"], fmt="cif")
            records.append(CrystalRecord.from_structure(structure, key=f"mp20:{row['material_id']}", source="mp20"))
            total += len(structure)
            if total >= atoms:
                break
    return records


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--atoms", type=int, default=None, help="atoms per batch (default: 10000 CPU, 200000 CUDA)")
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend available on the device")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="2000 atoms, 1 repeat: a smoke run")
    parser.add_argument("--e2e", action="store_true", help="also time a Matformer and a PDDFormer training step per path")
    parser.add_argument("--e2e-atoms", type=int, default=10_000, help="atoms of the MP-20 batch of the --e2e step")
    parser.add_argument("--e2e-only", action="store_true", help="skip the per-op tables (with --e2e)")
    parser.add_argument("--e2e-models", nargs="+", default=list(E2E_MODELS), choices=list(E2E_MODELS))
    parser.add_argument("--sweep-chunk", action="store_true", help="time cpu_fused at several chunk sizes")
    parser.add_argument("--copy-mib", type=int, default=256, help="buffer size of the copy-bandwidth probe")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    atoms = 2000 if args.quick else (args.atoms or (200_000 if device.type == "cuda" else 10_000))
    repeats = 1 if args.quick else args.repeats
    available = kernels.available_backends(device)
    if device.type == "cpu" and "triton" in available:
        available.remove("triton")  # the interpreter is for correctness, not speed
    backends = args.backends or available
    baseline = "reference" if "reference" in backends else "native"
    backends = [baseline] + [b for b in backends if b != baseline]

    copy_bw = copy_bandwidth(device, args.copy_mib << 20)
    header = [
        f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
        f"threads: {torch.get_num_threads()}, torch {torch.__version__}, dtype {args.dtype}",
        f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        f"measured copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write of a {args.copy_mib} MiB buffer)",
        f"baseline: {baseline}" + ("" if baseline == "reference" else " (torch_scatter not importable: native stands in)"),
        f"command: python benchmarks/neighbor_scatter.py {' '.join(argv if argv is not None else sys.argv[1:])}",
    ]
    print("\n".join(header), flush=True)
    sections = ["\n".join(f"- {line}" for line in header)]

    if args.sweep_chunk:
        graph = make_graph(atoms, SIZES["mp20"], NEIGHBOURS, 0, device)
        lines = ["### cpu_fused chunk size (gmr, width 128, mp20)\n", "| CHUNK_EDGES | fwd+bwd ms |", "|---|---|"]
        default = cpu_fused.CHUNK_EDGES
        for chunk in (1024, 2048, 4096, 8192, 16384, 32768, 131072):
            cpu_fused.CHUNK_EDGES = chunk
            r = measure("gmr", ["cpu_fused"], graph, 128, dtype, device, repeats)["cpu_fused"]
            lines.append(f"| {chunk} | {r['total'] * 1e3:.1f} |")
            print(lines[-1], flush=True)
        cpu_fused.CHUNK_EDGES = default
        sections.append("\n".join(lines))

    for size in [] if args.e2e_only else args.sizes:
        graph = make_graph(atoms, SIZES[size], NEIGHBOURS, 0, device)
        for d in args.widths:
            for op in args.ops:
                results = measure(op, backends, graph, d, dtype, device, repeats)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                shape = f"{graph.num_nodes} atoms, {graph.num_edges} edges"
                title = f"{op}, {size} ({shape}), width {d}" + (f", {d // HEAD_DIM} heads" if op == "attention" else "")
                text = table(results, baseline, copy_bw, title)
                print("\n" + text, flush=True)
                sections.append(text)

    if args.e2e:
        paths = E2E_PATHS if device.type == "cpu" else tuple(
            (label, "triton" if backend == "cpu_fused" else backend, fusion) for label, backend, fusion in E2E_PATHS
        )
        if baseline != "reference":  # no torch_scatter: the native composition stands in
            paths = (("native composition (torch_scatter missing)", "native", False), *paths[1:])
        text = e2e(device, 500 if args.quick else args.e2e_atoms, repeats, tuple(args.e2e_models), paths)
        sections.append(text)

    if args.markdown:
        args.markdown.write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
