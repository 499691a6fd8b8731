#!/usr/bin/env bash
# GPU acceptance: what CPU runs cannot show, checked in one go on one CUDA GPU (H100/H200: ≤ 8 minutes).
#
#   benchmarks/gpu_acceptance.sh [OUT_DIR]        (default OUT_DIR: runs/gpu_acceptance)
#
#   1. kernels-cuda     the CUDA tests of the kernels, compiled by Triton (TRITON_INTERPRET unset)
#   2. kernels-bf16     compiled Triton kernels in bf16 against the fp32 native path, forward and
#                       backward, within the tolerance printed (bf16's own rounding, 2^-8 relative)
#   3. neighbor-scatter `benchmarks/neighbor_scatter.py --device cuda --e2e` (tables in OUT_DIR)
#   4. step-<objective> one bf16 trainer step (DeepSpeed ZeRO-2, one rank) of vae, latent_flow and
#                       jepa at the sizes of configs/pretrain_*.yaml (atom budget 4096, MP-20 crystals):
#                       loss, step time, peak GPU memory
#
# One line per check: `gpu_acceptance: CHECK PASS|FAIL (seconds) summary`, then a total; each
# check's full output is in OUT_DIR/CHECK.log. Exits 0 only if every check passed. Without a
# CUDA device it stops at once, non-zero, saying so. Record the results in BENCHMARKS.md.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=${1:-$ROOT/runs/gpu_acceptance}
mkdir -p "$OUT"
if [ -n "${CRYSTALFM_PYTHON:-}" ]; then PY=$CRYSTALFM_PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then PY=$VIRTUAL_ENV/bin/python
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python3); fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels, never the interpreter
export PYTHONUNBUFFERED=1

# ------------------------------------------------------------------ 0. a CUDA device, or stop now
rc=0
DEVICE=$("$PY" -c '
import sys, torch
if not torch.cuda.is_available():
    build = torch.version.cuda or "none"
    print(f"torch {torch.__version__} (CUDA build: {build}) sees no CUDA device")
    sys.exit(3)
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, torch {torch.__version__}, CUDA {torch.version.cuda}")
' 2>&1) || rc=$?
if [ $rc = 3 ]; then
  echo "gpu_acceptance: FAIL no CUDA device: $DEVICE" >&2
  echo "gpu_acceptance: run this on a machine with an NVIDIA GPU and a CUDA build of torch; nothing was checked" >&2
  exit 2
elif [ $rc != 0 ]; then
  echo "gpu_acceptance: FAIL could not ask $PY about CUDA (exit $rc):" >&2
  printf '%s\n' "$DEVICE" | tail -n 5 >&2
  exit 2
fi
echo "gpu_acceptance: device $DEVICE"

PASSED=0; FAILED=0; FAILED_NAMES=""
# check NAME TIMEOUT_S CMD...: the command's last line starting with "summary:" becomes the summary.
check() {
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.log" t0=$SECONDS rc=0
  timeout "$limit" "$@" > "$log" 2>&1 || rc=$?
  local summary
  summary=$(grep '^summary:' "$log" | tail -n 1 | sed 's/^summary: *//')
  [ $rc = 124 ] && summary="timed out after ${limit} s; ${summary}"
  if [ $rc = 0 ]; then
    PASSED=$((PASSED + 1)); echo "gpu_acceptance: $name PASS ($((SECONDS - t0)) s) $summary"
  else
    FAILED=$((FAILED + 1)); FAILED_NAMES+=" $name"
    echo "gpu_acceptance: $name FAIL ($((SECONDS - t0)) s, exit $rc) ${summary:-see $log}"
    tail -n 15 "$log" | sed 's/^/    /'
  fi
}

# ------------------------------------------------------------------ 1. compiled kernel tests
kernel_tests() {
  "$PY" -m pytest tests/pretrain/test_kernels.py -k cuda -q -rs -p no:cacheprovider || return $?
}
kernel_tests_checked() {
  local out rc=0
  out=$(kernel_tests 2>&1) || rc=$?
  printf '%s\n' "$out"
  local tally; tally=$(printf '%s\n' "$out" | grep -E '(passed|failed|error|skipped|deselected)' | tail -n 1)
  if printf '%s' "$tally" | grep -q skipped; then echo "summary: CUDA tests were skipped ($tally)"; return 1; fi
  if ! printf '%s' "$tally" | grep -q passed; then echo "summary: no CUDA test ran ($tally)"; return 1; fi
  echo "summary: $tally"
  return $rc
}
check kernels-cuda 180 kernel_tests_checked

# ------------------------------------------------------------------ 2. bf16 tolerances, compiled
check kernels-bf16 120 "$PY" - <<'PY'
import importlib.util, sys, torch
from pretrain import kernels
spec = importlib.util.spec_from_file_location("ns", "benchmarks/neighbor_scatter.py")
ns = importlib.util.module_from_spec(spec); spec.loader.exec_module(ns)
assert "triton" in kernels.available_backends(torch.device("cuda")), kernels.available_backends(torch.device("cuda"))
graph = ns.make_graph(20000, (8, 12), 25, seed=0, device="cuda")
n, e, d, heads = graph.num_nodes, graph.num_edges, 128, 4
g = torch.Generator(device="cuda").manual_seed(0)
def rand(*shape): return torch.randn(*shape, generator=g, device="cuda")
shapes = {"gmr": [(n, d), (e, d)], "attention": [(n, heads, d // heads)] * 3 + [(e, heads, d // heads)] * 2,
          "gated": [(n, d)] * 3 + [(e, d)] * 2}
def call(op, xs, backend):
    if op == "gmr": return kernels.gather_multiply_reduce(*xs, graph, "sum", backend=backend)
    if op == "attention": return kernels.neighbor_attention(*xs, graph, backend=backend)
    return kernels.gated_aggregate(*xs, graph, backend=backend)
# bf16 rounds to 2^-8 relative; sums of 25 neighbour terms and a backward pass through them keep the
# error to a few of those roundings of the output's scale: relative max error (to max |ref|) ≤ 3e-2.
TOL = 3e-2
worst, bad = 0.0, []
for op, shp in shapes.items():
    base = [rand(*s) for s in shp]
    grad_out = None
    results = {}
    for name, dtype, backend in (("ref", torch.float32, "native"), ("triton", torch.bfloat16, "triton")):
        xs = [b.to(dtype).requires_grad_() for b in base]
        out = call(op, xs, backend)
        if grad_out is None: grad_out = torch.randn(out.shape, generator=g, device="cuda")
        grads = torch.autograd.grad(out, xs, grad_out.to(out.dtype), allow_unused=True)
        results[name] = [out.float()] + [torch.zeros_like(x).float() if gr is None else gr.float() for x, gr in zip(xs, grads)]
    for i, (a, b) in enumerate(zip(results["triton"], results["ref"])):
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        worst = max(worst, err)
        label = f"{op} {'out' if i == 0 else f'grad{i}'}"
        print(f"{label}: relative max error {err:.2e}")
        if not err <= TOL: bad.append(f"{label} {err:.2e}")
print(f"summary: {'FAIL ' + ', '.join(bad) if bad else 'all'} within {TOL:g} (worst {worst:.2e}); {n} atoms, {e} edges, width {d}")
sys.exit(1 if bad else 0)
PY

# ------------------------------------------------------------------ 3. the neighbour-scatter benchmark
neighbor_scatter() {
  "$PY" benchmarks/neighbor_scatter.py --device cuda --e2e --repeats 3 --markdown "$OUT/neighbor_scatter_cuda.md" || return $?
  echo "summary: tables in $OUT/neighbor_scatter_cuda.md"
}
check neighbor-scatter 240 neighbor_scatter

# ------------------------------------------------------------------ 4. one bf16 step per objective
for objective in vae latent_flow jepa; do
  check "step-$objective" 150 "$PY" - "$objective" "$OUT" <<'PY'
import csv, gzip, os, sys, tempfile, time, warnings
from pathlib import Path
import torch
name, out = sys.argv[1], Path(sys.argv[2])
sys.path.insert(0, "tests/pretrain")
from pretrain_trainer_fixtures import Fixed
from pymatgen.core import Structure
from data_pipeline.load.collate import BatchViews, collate
from data_pipeline.record import CrystalRecord
from pretrain.config import load_config
from pretrain.objectives import build_objective
from pretrain.trainer import Trainer

run_root = tempfile.mkdtemp(prefix=f"gpu_acceptance_{name}_")
config = load_config(f"configs/pretrain_{name}.yaml", [f"run.root={run_root}", "tracking.mlflow=false",
                     "checkpoint.resume=none", "train.precision=bf16", "train.log_every=1",
                     "data.shards="])  # batches come from MP-20 below, not from a shard set
budget = config.data.atom_budget
shared = Path(os.environ.get("CRYSTALFM_SHARED_DATA", Path.cwd().parent / "shared" / "data"))
records, atoms = [], 0
with gzip.open(shared / "mp_20" / "train.csv.gz", "rt") as handle, warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for row in csv.DictReader(handle):
        r = CrystalRecord.from_structure(Structure.from_str(row["cif"], fmt="cif"), key=f"mp20:{row['material_id']}",
                                         source="mp20", formation_energy_per_atom=float(row["formation_energy_per_atom"]))
        if atoms + r.num_atoms > budget: break
        records.append(r); atoms += r.num_atoms
torch.manual_seed(0)
objective = build_objective(config.objective)
batches = [collate(records, BatchViews.from_dict(objective.batch_views())) for _ in range(3)]
trainer = Trainer(config, objective=objective, loader=Fixed(batches), log=lambda s: None)
params = sum(p.numel() for p in objective.parameters())
trainer.train_step()  # warm-up: compiles kernels, allocates optimiser state
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter(); stats = trainer.train_step(); torch.cuda.synchronize(); dt = time.perf_counter() - t0
peak = torch.cuda.max_memory_allocated() / 2**30
loss = float(stats.loss)
print(f"loss {loss:.5g}; step {dt * 1e3:.0f} ms; peak {peak:.2f} GiB")
ok = loss == loss and abs(loss) != float("inf")
print(f"summary: {'' if ok else 'NON-FINITE LOSS '}{len(records)} crystals, {atoms} atoms, {params / 1e6:.1f} M params, "
      f"bf16 step {dt * 1e3:.0f} ms, peak memory {peak:.2f} GiB, loss {loss:.4g}")
sys.stdout.flush()
os._exit(0 if ok else 1)  # skip interpreter teardown (process-group shutdown can hang after the result is out)
PY
done

echo "gpu_acceptance: $PASSED passed, $FAILED failed${FAILED_NAMES:+ ($FAILED_NAMES )}; logs in $OUT"
[ "$FAILED" = 0 ]
