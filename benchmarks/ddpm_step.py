"""One DDPM training step (forward + backward + AdamW) on real MP-20 crystals, CSPNet denoiser against
the paper's Transformer and the hybrid of the two, at the CPU config's size (6 layers × 128, self-conditioning, wrapped coordinates).
The two alternate round by round on the same batch, and the ratio is the median over the rounds.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/ddpm_step.py [--atoms 1024] [--rounds 5] [--steps 5]
"""
from __future__ import annotations

import argparse
import csv
import gzip
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mp_20" / "val.csv.gz"
COMMON = {"name": "ddpm", "layers": 6, "width": 128, "heads": 4, "dropout": 0.0, "part_weights": [1, 1, 1],
          "self_condition": True, "coordinates": "wrapped"}
CONTENDERS = {"transformer (pair bias 4 + pair head; session 8's WP)": {"pair_frequencies": 4, "coordinate_head": "pair"},
              "cspnet (10 frequencies; session 9's config, ε species)": {"pair_frequencies": 10, "denoiser": "cspnet"},
              "hybrid (cspnet + a transformer layer after every second)": {"pair_frequencies": 10, "denoiser": "hybrid"},
              "cspnet, species_output posterior": {"pair_frequencies": 10, "denoiser": "cspnet", "species_output": "posterior"}}


def batch_of(atoms: int):
    from pymatgen.core import Structure

    from data_pipeline.load.collate import collate
    from data_pipeline.record import CrystalRecord

    records, total = [], 0
    with gzip.open(DATA, "rt") as handle:
        for row in csv.DictReader(handle):
            structure = Structure.from_str(row["cif"], fmt="cif")
            if total + len(structure) > atoms:
                break
            records.append(CrystalRecord(row["material_id"], "mp20", np.array(structure.atomic_numbers),
                                         structure.frac_coords, structure.lattice.matrix))
            total += len(structure)
    return collate(records), len(records), total


def step_seconds(objective, optimizer, batch, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, _ = objective.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atoms", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    from pretrain.objectives import build_objective

    torch.set_num_threads(1)
    batch, crystals, atoms = batch_of(args.atoms)
    print(f"batch: {crystals} MP-20 crystals, {atoms} atoms; threads {torch.get_num_threads()}")
    models = {}
    for name, extra in CONTENDERS.items():
        torch.manual_seed(0)
        objective = build_objective({**COMMON, **extra})
        optimizer = torch.optim.AdamW(objective.parameters(), 1e-3)
        step_seconds(objective, optimizer, batch, 2)  # warm-up
        models[name] = (objective, optimizer, sum(p.numel() for p in objective.parameters()))
    seconds = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (objective, optimizer, _) in models.items():
            seconds[name].append(step_seconds(objective, optimizer, batch, args.steps))
    baseline = next(iter(models))
    for name, (_, _, parameters) in models.items():
        ratio = np.median(np.array(seconds[baseline]) / np.array(seconds[name]))
        print(f"{name}: {parameters / 1e6:.2f} M parameters, {np.median(seconds[name]):.3f} s/step "
              f"(rounds {', '.join(f'{s:.3f}' for s in seconds[name])}), speed vs transformer {ratio:.2f}×")


if __name__ == "__main__":
    main()
