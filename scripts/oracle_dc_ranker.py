"""How well could Crys-JEPA's D_C rank MP-20's test half by E_hull if the embedding were perfectly
energy-aware? R(c) as in discovery/screen.py: every reference crystal whose elements are a subset of
c's. Replaces ‖e(c) − e(r)‖² in Eq. 11 with the DFT (E_f(c) − E_f(r))² (an embedding whose
distance *is* the formation-energy difference, the limit the JEPA objective trains toward) and reports
Spearman ρ against E_hull on the crystals with a same-chemical-system reference, beside a one-sided
variant E_f(c) − min_r E_f(r) and the labels' own hull. No model; seconds.

It then asks how accurate a formation energy must be for a hull-based ranker to reach a given ρ: the
score E_f(c) + σ·z − hull_R(c), with hull_R the convex hull of the reference crystals (pymatgen, as
discovery/stability.py builds it for the CHGNet ranker) and z standard normal, for a range of σ (five
noise draws each). `--scores` adds the signed probes of a `discovery screen --evaluate` run
(ranker_scores.csv, columns jepa_probe / composition_probe = Ê_f − min_R E_f): their formation-energy
error on the test half, and the same hull score built from their Ê_f.

    python scripts/oracle_dc_ranker.py [--scores RUN/ranker_scores.csv] [--out docs/discovery_mp20/session8/oracle_dc.json]
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from discovery.references import half_of

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mp_20"


def rows(path: Path, half: str | None = None):
    with gzip.open(path, "rt") as handle:
        for row in csv.DictReader(handle):
            if half is None or half_of(row["material_id"]) == half:
                yield row


def chemsys(row) -> frozenset[str]:
    return frozenset(json.loads(row["elements"].replace("'", '"')))


def subsystems(system: frozenset[str]):
    from itertools import combinations

    return (frozenset(c) for k in range(1, len(system) + 1) for c in combinations(sorted(system), k))


def bootstrap(x, y, n=1000, seed=0):
    rng = np.random.default_rng(seed)
    values = [spearmanr(x[i], y[i])[0] for i in (rng.integers(0, len(x), len(x)) for _ in range(n))]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", default=None, help="ranker_scores.csv of `crystalfm discovery screen --evaluate`")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from discovery.stability import HullReference

    refs, pairs = defaultdict(list), []
    for row in list(rows(DATA / "train.csv.gz")) + list(rows(DATA / "val.csv.gz", "val")):
        refs[chemsys(row)].append(float(row["formation_energy_per_atom"]))
        pairs.append((row["pretty_formula"], float(row["formation_energy_per_atom"])))
    reference_hull = HullReference(pairs)
    keys, ef, hull, dc, onesided, floor, hull_energy = [], [], [], [], [], [], []
    for row in rows(DATA / "val.csv.gz", "test"):
        r = [e for sub in subsystems(chemsys(row)) for e in refs.get(sub, ())]
        if not r:
            continue
        e = float(row["formation_energy_per_atom"])
        r = np.asarray(r)
        keys.append(f"mp20:{row['material_id']}")
        ef.append(e)
        hull.append(float(row["e_above_hull"]))
        dc.append(float(np.mean((e - r) ** 2)))
        onesided.append(float(e - r.min()))
        floor.append(float(r.min()))
        hull_energy.append(e - reference_hull.e_above_hull(row["pretty_formula"], e))  # the reference hull at c
    ef, hull, dc, onesided, floor, hull_energy = map(np.asarray, (ef, hull, dc, onesided, floor, hull_energy))
    result = {"crystals": len(hull), "on_hull_fraction": float(np.mean(hull <= 1e-6))}
    for name, score in (("oracle_dc", dc), ("oracle_onesided", onesided), ("oracle_reference_hull", ef - hull_energy)):
        rho = float(spearmanr(score, hull)[0])
        result[name] = {"rho": rho, "ci95": bootstrap(score, hull)}
    # ρ of the hull score when the formation energy carries an error of σ eV/atom (5 draws each)
    noise = np.random.default_rng(0).standard_normal((5, len(ef)))
    result["hull_score_with_energy_error"] = {
        f"{sigma:g}": float(np.mean([spearmanr(ef + sigma * z - hull_energy, hull)[0] for z in noise]))
        for sigma in (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3)}
    if args.scores:  # the probes' Ê_f = score + min_R E_f, on the same crystals
        with open(args.scores) as handle:
            table = {r["key"]: r for r in csv.DictReader(handle)}
        for probe in ("jepa_probe", "composition_probe"):
            if probe not in next(iter(table.values())):
                continue
            predicted = np.array([float(table[k][probe]) for k in keys]) + floor
            result[probe] = {"formation_energy_mae": float(np.mean(np.abs(predicted - ef))),
                             "rho_onesided": float(spearmanr(predicted - floor, hull)[0]),
                             "rho_reference_hull": float(spearmanr(predicted - hull_energy, hull)[0])}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
