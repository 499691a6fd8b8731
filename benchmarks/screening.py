"""Screening cost per crystal: Crys-JEPA embedding vs CHGNet single point vs CHGNet relaxation,
all measured in this run on the same real MP-20 crystals; plus DDPM generation throughput.

    python benchmarks/screening.py [--n 32] [--relax-n 4] [--relax-steps 50]

The JEPA encoder is the paper's default size (8 layers, width 512, 16 heads), randomly
initialised (the cost does not depend on the weights). Ratios are printed against the CHGNet
relaxation measured here. The paper reports JEPA ≈ 7× faster than CHGNet on a GPU; the issue's aim
on CPU is JEPA ≥ 50× cheaper than a relaxation.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CRYSTALFM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def load_records(n: int):
    from pymatgen.core import Structure

    from data_pipeline.record import CrystalRecord

    out = []
    with gzip.open(SHARED / "mp_20" / "val.csv.gz", "rt") as handle:
        for row in csv.DictReader(handle):
            out.append(CrystalRecord.from_structure(Structure.from_str(row["cif"], fmt="cif"), key=row["material_id"], source="mp20"))
            if len(out) == n:
                break
    return out


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--relax-n", type=int, default=4)
    parser.add_argument("--relax-steps", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    records = load_records(args.n)

    from discovery.relax import CHGNetRelaxer, RelaxConfig
    from discovery.screen import embed_records
    from pretrain.objectives import build_objective

    jepa = build_objective({"name": "jepa"}).eval()
    embed_records(jepa, records[:2])  # warm-up
    jepa_b1 = timed(lambda: [embed_records(jepa, [r]) for r in records], 2) / len(records)
    jepa_batched = timed(lambda: embed_records(jepa, records, batch_size=len(records)), 2) / len(records)

    relaxer = CHGNetRelaxer(RelaxConfig(steps=args.relax_steps, fmax=0.05))
    relaxer.single_point(records[0])  # warm-up
    single = timed(lambda: [relaxer.single_point(r) for r in records], 1) / len(records)
    steps = []
    start = time.perf_counter()
    for r in records[: args.relax_n]:
        steps.append(relaxer.relax(r).steps)
    relax = (time.perf_counter() - start) / args.relax_n

    from discovery.relax import relax_records

    ray_n = max(4, args.relax_n)
    ray_times = {}
    for workers in (1, 2):
        start = time.perf_counter()
        relax_records(records[:ray_n], RelaxConfig(steps=args.relax_steps, fmax=0.05), num_workers=workers, progress=False)
        ray_times[workers] = time.perf_counter() - start

    ddpm = build_objective({"name": "ddpm", "layers": 12, "width": 1024, "heads": 8})
    ddpm.atom_counts[[4, 6, 8, 12]] = 1.0  # MP-20-like sizes (an untrained histogram)
    gen_steps = 16
    gen = timed(lambda: ddpm.sample(16, seed=0, steps=gen_steps), 1) / 16

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"crystals: {len(records)} MP-20 (val), relaxations: {args.relax_n} × ≤{args.relax_steps} FIRE steps "
          f"(mean {sum(steps) / len(steps):.1f} steps)")
    print(f"{'method':<34} {'s/crystal':>10} {'vs relaxation':>14}")
    for name, cost in (("JEPA embedding, batch 1", jepa_b1), (f"JEPA embedding, batch {len(records)}", jepa_batched),
                       ("CHGNet single point", single), ("CHGNet relaxation", relax)):
        print(f"{name:<34} {cost:>10.4f} {relax / cost:>13.1f}×")
    print(f"relaxations of {ray_n} crystals: 1 worker {ray_times[1]:.1f} s (in-process), 2 Ray workers "
          f"{ray_times[2]:.1f} s → speed-up {ray_times[1] / ray_times[2]:.2f}× (includes Ray start and model loads)")
    print(f"DDPM generation (paper size, {gen_steps} denoising steps, batch 16): {1 / gen:.2f} crystals/s "
          f"({gen / gen_steps * 256:.2f} s/crystal extrapolated to T=256)")


if __name__ == "__main__":
    main()
