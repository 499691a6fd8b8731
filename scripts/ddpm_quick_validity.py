"""Quick progress check of a DDPM generator: sample N crystals, report structural and
compositional validity, volume per atom, density and how many distinct elements appear (no CHGNet, no CrystalNN), seconds per check.

    python scripts/ddpm_quick_validity.py RUN/checkpoints/step_00001000 [--n 100] [--steps 100]
    python scripts/ddpm_quick_validity.py RELEASE_DIR ...

A checkpoint step folder is consolidated in memory (no release is written). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np


def load(path: Path):
    if (path / "meta.json").is_file():  # a trainer checkpoint step folder
        from pretrain.objectives import build_objective
        from pretrain.release import consolidate_fp32

        meta = json.loads((path / "meta.json").read_text())
        objective = build_objective(meta["objective"])
        objective.load_state_dict(consolidate_fp32(path), strict=True)
        return objective.eval(), meta.get("step")
    from pretrain.release import load_pretrained

    return load_pretrained(path), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--species", default="trained")
    parser.add_argument("--volume", default="generated", choices=("generated", "composition"))
    parser.add_argument("--corrector-lr", type=float, default=None, help="wrapped coordinates: Langevin corrector step")
    parser.add_argument("--species-temperature", type=float, default=1.0, help="scales the species part's sampling noise")
    args = parser.parse_args()
    from pymatgen.core import Element

    from data_pipeline.record import element_symbol
    from discovery.validity import compositional_validity, structural_validity

    objective, step = load(Path(args.model))
    start = time.perf_counter()
    samples = objective.sample(args.n, seed=args.seed, steps=args.steps, species=args.species, volume=args.volume,
                               corrector_lr=args.corrector_lr, species_temperature=args.species_temperature)
    sample_s = time.perf_counter() - start
    struct = [structural_validity(s)[0] for s in samples]
    comp = [compositional_validity(s)[0] for s in samples]
    elements = [len(set(s.atomic_numbers.tolist())) for s in samples]
    vpa = [s.volume / s.num_atoms for s in samples]
    masses = np.array([0.0] + [Element.from_Z(z).atomic_mass for z in range(1, 119)])
    # g/cm³ (1 amu/Å³ = 1.66054 g/cm³): the species' mass is half of the density story (session 10)
    density = [1.66054 * masses[s.atomic_numbers].sum() / s.volume for s in samples]
    print(json.dumps({"model": args.model, "step": step, "n": args.n, "sample_steps": args.steps or objective.config.steps,
                      "volume": args.volume, "seed": args.seed, "corrector_lr": args.corrector_lr,
                      "species_temperature": args.species_temperature,
                      "struct_valid": float(np.mean(struct)), "comp_valid": float(np.mean(comp)),
                      "valid": float(np.mean(np.array(struct) & np.array(comp))),
                      "elements_median": float(np.median(elements)), "elements_max": int(max(elements)),
                      "elements_histogram": np.bincount(elements).tolist(),  # index: distinct elements per crystal
                      # how many samples contain each element (validity_table.py's TV distance to the training set)
                      "element_occurrences": dict(collections.Counter(element_symbol(int(z)) for s in samples
                                                                      for z in set(s.atomic_numbers.tolist()))),
                      # species collapse shows here first (docs/discovery_mp20.md, session 6)
                      "distinct_elements": len({int(z) for s in samples for z in s.atomic_numbers}),
                      "volume_per_atom_median": float(np.median(vpa)), "density_median": float(np.median(density)),
                      "sample_s": round(sample_s, 1),
                      "total_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
