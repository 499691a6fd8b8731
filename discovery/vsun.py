"""V.S.U.N.: valid, stable, unique and novel fractions of a generator's samples.

Definitions (Crys-JEPA appendix; CDVAE's matcher tolerances):
  V  valid: volume > 0.1 Å³, all distances > 0.5 Å, SMACT-valid composition (`validity.py`);
  S  stable: after a CHGNet relaxation, energy above the reference hull < 0.1 eV/atom
     (`stability.py` explains the energy footing); a crystal whose relaxation failed or
     exploded is not stable, and says so in its row;
  U  unique: not a StructureMatcher duplicate of an earlier sample of the same run;
  N  novel: matches no crystal of the reference set.
U and N compare relaxed structures where a relaxation succeeded (else the generated one).
S.U.N. = S ∧ U ∧ N; V.S.U.N. = V ∧ S ∧ U ∧ N. Fractions are over all samples of a run; over
several runs (repeated sampling) they are reported as mean ± std.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from data_pipeline.record import CrystalRecord
from discovery.matching import NoveltyIndex, uniqueness
from discovery.relax import RelaxConfig, RelaxResult, relax_records
from discovery.stability import STABLE_THRESHOLD, HullReference, formation_energy_per_atom
from discovery.validity import check_validity

METRICS = ("V", "S", "U", "N", "SUN", "VSUN")


@dataclass
class CrystalVerdict:
    key: str
    run: int
    formula: str
    valid: bool
    validity_reason: str
    relax_status: str
    energy_per_atom: float
    formation_energy_per_atom: float
    e_above_hull: float
    stable: bool
    unique: bool
    novel: bool

    @property
    def sun(self) -> bool:
        return self.stable and self.unique and self.novel

    @property
    def vsun(self) -> bool:
        return self.valid and self.sun

    def row(self) -> dict:
        return {**asdict(self), "SUN": self.sun, "VSUN": self.vsun}


def evaluate_run(
    samples: Sequence[CrystalRecord],
    hull: HullReference,
    novelty: NoveltyIndex,
    elemental: dict[str, float],
    relax: RelaxConfig = RelaxConfig(),
    num_workers: int = 1,
    run: int = 0,
    relaxed: Sequence[RelaxResult] | None = None,
) -> list[CrystalVerdict]:
    """Judge one sampling run. Only valid crystals are relaxed (the rest cannot count anyway)."""
    validity = [check_validity(r) for r in samples]
    if relaxed is None:
        to_relax = [r for r, v in zip(samples, validity) if v.valid]
        done = iter(relax_records(to_relax, relax, num_workers=num_workers))
        relaxed = [next(done) if v.valid else RelaxResult(r.key, "skipped_invalid") for r, v in zip(samples, validity)]
    structures = [
        (res.record if res.usable and res.record is not None else rec).to_structure() for rec, res in zip(samples, relaxed)
    ]
    unique = uniqueness(structures)
    verdicts = []
    for rec, val, res, structure, is_unique in zip(samples, validity, relaxed, structures, unique):
        composition = structure.composition
        ef = e_hull = math.nan
        if res.usable and math.isfinite(res.energy_per_atom):
            try:
                ef = formation_energy_per_atom(composition, res.energy_per_atom, elemental)
                e_hull = hull.e_above_hull(composition, ef)
            except KeyError as exc:  # element without a reference energy: cannot be judged stable
                res.message = str(exc)
        verdicts.append(
            CrystalVerdict(
                key=rec.key,
                run=run,
                formula=composition.reduced_formula,
                valid=val.valid,
                validity_reason=val.reason,
                relax_status=res.status + (f": {res.message}" if res.message else ""),
                energy_per_atom=res.energy_per_atom,
                formation_energy_per_atom=ef,
                e_above_hull=e_hull,
                stable=bool(math.isfinite(e_hull) and e_hull < STABLE_THRESHOLD),
                unique=is_unique,
                novel=novelty.is_novel(structure),
            )
        )
    return verdicts


def fractions(verdicts: Sequence[CrystalVerdict]) -> dict[str, float]:
    n = max(len(verdicts), 1)
    return {
        "V": sum(v.valid for v in verdicts) / n,
        "S": sum(v.stable for v in verdicts) / n,
        "U": sum(v.unique for v in verdicts) / n,
        "N": sum(v.novel for v in verdicts) / n,
        "SUN": sum(v.sun for v in verdicts) / n,
        "VSUN": sum(v.vsun for v in verdicts) / n,
    }


def summarize(verdicts: Sequence[CrystalVerdict]) -> dict[str, dict[str, float]]:
    """{metric: {mean, std, runs}} over the sampling runs present in `verdicts`."""
    runs = sorted({v.run for v in verdicts})
    per_run = [fractions([v for v in verdicts if v.run == r]) for r in runs]
    return {
        m: {
            "mean": float(np.mean([f[m] for f in per_run])) if per_run else math.nan,
            "std": float(np.std([f[m] for f in per_run], ddof=1)) if len(per_run) > 1 else 0.0,
            "runs": len(per_run),
        }
        for m in METRICS
    }


def write_table(rows: Sequence[dict], path) -> None:
    """Rows of dicts → CSV (columns from the first row); an empty table still gets a file."""
    import csv
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def markdown_summary(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| metric | mean | std | runs |", "| --- | --- | --- | --- |"]
    for metric, s in summary.items():
        lines.append(f"| {metric} | {s['mean']:.3f} | {s['std']:.3f} | {s['runs']} |")
    return "\n".join(lines) + "\n"


def plot_stability_vs_novelty(verdicts: Sequence[CrystalVerdict], path) -> None:
    """Scatter of energy above hull against novelty (jittered), coloured by validity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(5, 4))
    for valid, colour in ((True, "tab:blue"), (False, "tab:red")):
        chosen = [v for v in verdicts if v.valid == valid and math.isfinite(v.e_above_hull)]
        x = np.array([float(v.novel) for v in chosen]) + rng.uniform(-0.15, 0.15, len(chosen))
        ax.scatter(x, [v.e_above_hull for v in chosen], s=12, c=colour, label="valid" if valid else "invalid")
    ax.axhline(STABLE_THRESHOLD, color="k", ls="--", lw=1, label=f"stable < {STABLE_THRESHOLD} eV/atom")
    ax.set_xticks([0, 1], ["known", "novel"])
    ax.set_ylabel("E above hull (eV/atom, CHGNet)")
    ax.set_title("Stability against novelty")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
