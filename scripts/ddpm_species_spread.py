"""Does a DDPM generator's species distribution look like its training set's? For each model:
how many distinct elements N samples contain, the fraction of samples containing each of the most
common ones, and the total-variation distance between the element-occurrence distributions
(each element's share of all element occurrences) of the samples and of the training crystals.

    python scripts/ddpm_species_spread.py SHARDS MODEL [MODEL ...] [--n 200] [--seed 0]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def occurrences(records) -> collections.Counter:
    from data_pipeline.record import element_symbol

    counts = collections.Counter()
    for record in records:
        counts.update({element_symbol(int(z)) for z in record.atomic_numbers})
    return counts


def total_variation(a: collections.Counter, b: collections.Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[e] / na - b[e] / nb) for e in set(a) | set(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from ddpm_quick_validity import load

    from discovery.references import load_crystals

    training = list(load_crystals(args.shards, ("train",)))
    train_counts = occurrences(training)
    rows = [{"model": "training crystals", "n": len(training), "distinct": len(train_counts), "tv_to_training": 0.0,
             "top": [(e, round(c / len(training), 2)) for e, c in train_counts.most_common(6)]}]
    for path in args.models:
        objective, step = load(Path(path))
        samples = objective.sample(args.n, seed=args.seed, steps=64)
        counts = occurrences(samples)
        rows.append({"model": path, "step": step, "n": args.n, "distinct": len(counts),
                     "tv_to_training": round(total_variation(counts, train_counts), 3),
                     "top": [(e, round(c / args.n, 2)) for e, c in counts.most_common(6)]})
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
