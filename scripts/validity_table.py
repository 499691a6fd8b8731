"""Mean ± sample std over sampling runs of ddpm_quick_validity.py's JSON lines, one row per
(model, volume, sampling steps, species temperature): a markdown table for docs/discovery_mp20.md.

The last column is the 1-D Wasserstein distance between the samples' number of distinct elements
per crystal (all runs of the row pooled) and the MP-20 training crystals' (CDVAE's wdist_num_elems,
against the training set, not the test set, so a sampling option can be chosen by it honestly), then the
total-variation distance between the element-occurrence distributions (each element's share of all
element occurrences) of the samples and of the training crystals (scripts/ddpm_species_spread.py's TV).

    python scripts/validity_table.py runs/discovery_mp20/validity600.jsonl [...]
"""
from __future__ import annotations

import csv
import gzip
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mp_20" / "train.csv.gz"


def training_elements() -> tuple[np.ndarray, Counter] | None:
    """(histogram of distinct elements per crystal, element occurrences) of MP-20's training crystals."""
    if not TRAIN.is_file():
        return None
    with gzip.open(TRAIN, "rt") as handle:
        systems = [json.loads(row["elements"].replace("'", '"')) for row in csv.DictReader(handle)]
    return np.bincount([len(s) for s in systems]).astype(float), Counter(e for s in systems for e in s)


def total_variation(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[e] / na - b[e] / nb) for e in set(a) | set(b))


def wasserstein_of_histograms(a, b) -> float:
    """W1 between two distributions on 0, 1, 2, … given as (unnormalised) histograms: Σ_k |F_a(k) − F_b(k)|."""
    size = max(len(a), len(b))
    a, b = (np.pad(np.asarray(h, dtype=float), (0, size - len(h))) for h in (a, b))
    return float(np.abs(np.cumsum(a / a.sum()) - np.cumsum(b / b.sum())).sum())


def main() -> None:
    groups = defaultdict(list)
    for path in sys.argv[1:]:
        for line in open(path):
            if line.strip():
                row = json.loads(line)
                key = (row["model"], row.get("volume", "generated"), row["sample_steps"], row.get("species_temperature", 1.0))
                groups[key].append(row)
    train = training_elements()
    print("| model | volume | species temperature | runs × n | struct. validity | comp. validity | both | median elements "
          "| median volume/atom (Å³) | median density (g/cm³) | W1(elements) to training | species TV to training |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (model, volume, _, temperature), rows in groups.items():
        def cell(key):
            values = np.array([r[key] for r in rows])
            return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
        elements = "–".join(sorted({f"{r['elements_median']:g}" for r in rows}))
        vpa = [r["volume_per_atom_median"] for r in rows]
        densities = [r["density_median"] for r in rows if "density_median" in r]  # rows before session 10 lack it
        density = f"{min(densities):.2f}–{max(densities):.2f}" if len(densities) == len(rows) else "–"
        histograms = [r["elements_histogram"] for r in rows if "elements_histogram" in r]
        w1 = tv = "–"
        if train is not None and len(histograms) == len(rows):
            pooled = np.zeros(max(len(h) for h in histograms))
            for h in histograms:
                pooled[: len(h)] += h
            w1 = f"{wasserstein_of_histograms(pooled, train[0]):.3f}"
        if train is not None and all("element_occurrences" in r for r in rows):
            tv = f"{total_variation(sum((Counter(r['element_occurrences']) for r in rows), Counter()), train[1]):.3f}"
        print(f"| {model} | {volume} | {temperature:g} | {len(rows)} × {rows[0]['n']} | {cell('struct_valid')} | "
              f"{cell('comp_valid')} | {cell('valid')} | {elements} | {min(vpa):.1f}–{max(vpa):.1f} | {density} | {w1} | {tv} |")


if __name__ == "__main__":
    main()
