"""CDVAE's generation metrics (Xie et al. 2022, `scripts/compute_metrics.py::GenEval`), beside V.S.U.N.

  struct_valid     fraction of samples with cell volume > 0.1 Å³ and all interatomic distances > 0.5 Å
  comp_valid       fraction whose composition passes SMACT charge neutrality + Pauling electronegativity
  valid            both (`validity.py` holds the rules; they are the ones V of V.S.U.N. uses)
  cov_recall       fraction of reference crystals with a sample within both fingerprint cutoffs
  cov_precision    fraction of samples within both cutoffs of some reference crystal (over all samples,
                   those whose fingerprint could not be computed count as misses, as in CDVAE)
  wdist_density    1-D Wasserstein distance between the densities (g/cm³) of the valid samples and
                   of the reference crystals
  wdist_num_elems  the same for the number of distinct elements per crystal

Fingerprints: structure = mean over sites of matminer's CrystalNNFingerprint (preset "ops", 61-d);
composition = matminer's Magpie ElementProperty (132-d), standardised feature-wise (NaN → 0).
Cutoffs are Euclidean distances between fingerprints; MP-20's are 0.4 (structure) and 10 (composition).
The reference is the test set. CDVAE standardises compositions with fixed means/stds it computed
once; here the scaler is fitted on the reference set (the same distribution for MP-20), so
COV numbers are comparable in scale but not digit for digit.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data_pipeline.record import CrystalRecord
from discovery.validity import check_validity

COV_CUTOFFS = {"mp20": {"struct": 0.4, "comp": 10.0}, "carbon": {"struct": 0.2, "comp": 4.0},
               "perovskite": {"struct": 0.2, "comp": 4.0}}  # CDVAE's published thresholds
METRICS = ("struct_valid", "comp_valid", "valid", "cov_recall", "cov_precision", "wdist_density", "wdist_num_elems")


@dataclass
class Fingerprints:
    """Per-crystal fingerprints; a row of NaN where CrystalNN failed (that crystal is skipped in COV)."""

    structure: np.ndarray  # [n, 61]
    composition: np.ndarray  # [n, 132], raw Magpie features (may hold NaN for missing element data)

    def __len__(self) -> int:
        return len(self.structure)

    @property
    def ok(self) -> np.ndarray:  # [n] bool
        return np.isfinite(self.structure).all(1)

    def take(self, rows) -> "Fingerprints":
        return Fingerprints(self.structure[rows], self.composition[rows])


def structure_fingerprint(record: CrystalRecord) -> np.ndarray:
    """Mean CrystalNN site fingerprint (61-d); NaN when CrystalNN raises (CDVAE drops those)."""
    from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

    featurizer = _cached("crystalnn", lambda: CrystalNNFingerprint.from_preset("ops"))
    structure = record.to_structure()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sites = [featurizer.featurize(structure, i) for i in range(len(structure))]
    except Exception:  # noqa: BLE001 - a crystal CrystalNN cannot read is a miss, as in CDVAE
        return np.full(len(featurizer.feature_labels()), np.nan)
    return np.mean(np.asarray(sites, dtype=np.float64), axis=0)


def composition_fingerprint(record: CrystalRecord) -> np.ndarray:
    """Magpie ElementProperty features of the composition (132-d), cached by formula."""
    return _magpie(_formula(record)).copy()


def fingerprints(records: Sequence[CrystalRecord]) -> Fingerprints:
    structure = np.array([structure_fingerprint(r) for r in records]).reshape(len(records), 61)
    composition = np.array([composition_fingerprint(r) for r in records]).reshape(len(records), 132)
    return Fingerprints(structure, composition)


class CompositionScaler:
    """Feature-wise standardisation (NaN-aware; constant features keep std 1; NaN → 0 after)."""

    def __init__(self, features: np.ndarray):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
            self.mean = np.nan_to_num(np.nanmean(features, axis=0))
            std = np.nan_to_num(np.nanstd(features, axis=0))
        self.std = np.where(std > 0, std, 1.0)

    def transform(self, features: np.ndarray) -> np.ndarray:
        return np.nan_to_num((features - self.mean) / self.std, nan=0.0)


def coverage(samples: Fingerprints, reference: Fingerprints, struct_cutoff: float, comp_cutoff: float,
             scaler: CompositionScaler | None = None) -> dict[str, float]:
    """COV-R / COV-P (and the mean nearest distances, CDVAE's AMSD / AMCD) of samples against a reference."""
    from scipy.spatial.distance import cdist

    scaler = scaler or CompositionScaler(reference.composition)
    ok = samples.ok
    if not ok.any() or not len(reference):
        return {"cov_recall": 0.0, "cov_precision": 0.0, "amsd_recall": math.nan, "amsd_precision": math.nan,
                "amcd_recall": math.nan, "amcd_precision": math.nan}
    ref_ok = reference.ok  # a reference crystal without a fingerprint can never be recalled
    struct = cdist(samples.structure[ok], np.nan_to_num(reference.structure))  # [n_ok, n_ref]
    struct[:, ~ref_ok] = np.inf
    comp = cdist(scaler.transform(samples.composition[ok]), scaler.transform(reference.composition))
    recalled = ((struct.min(0) <= struct_cutoff) & (comp.min(0) <= comp_cutoff))
    # Each distance takes its own nearest neighbour, as in CDVAE (not one neighbour within both).
    precise = (struct.min(1) <= struct_cutoff) & (comp.min(1) <= comp_cutoff)
    return {
        "cov_recall": float(recalled.mean()),
        "cov_precision": float(precise.sum() / len(samples)),
        "amsd_recall": float(struct.min(0)[ref_ok].mean()) if ref_ok.any() else math.nan,
        "amsd_precision": float(struct.min(1).mean()),
        "amcd_recall": float(comp.min(0).mean()),
        "amcd_precision": float(comp.min(1).mean()),
    }


def density(record: CrystalRecord) -> float:
    """Mass density in g/cm³ (pymatgen's `Structure.density`, as CDVAE)."""
    return float(record.to_structure().density)


def num_elements(record: CrystalRecord) -> int:
    return int(len(np.unique(record.atomic_numbers)))


def wasserstein(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(a, b)) if len(a) and len(b) else math.nan


@dataclass
class GenerationReport:
    metrics: dict[str, float]
    sample_density: list[float]  # valid samples only (CDVAE's `valid_samples`)
    reference_density: list[float]
    sample_num_elements: list[int]
    reference_num_elements: list[int]


def generation_metrics(samples: Sequence[CrystalRecord], reference: Sequence[CrystalRecord], dataset: str = "mp20",
                       sample_fp: Fingerprints | None = None, reference_fp: Fingerprints | None = None) -> GenerationReport:
    """All of CDVAE's GenEval numbers except the property model's (there is no released one here).

    Unlike CDVAE, which draws 1,000 valid samples at random before the Wasserstein distances (and
    stops if fewer exist), every valid sample is used, so the numbers depend on no seed."""
    validity = [check_validity(r) for r in samples]
    valid = [r for r, v in zip(samples, validity) if v.valid]
    n = max(len(samples), 1)
    cut = COV_CUTOFFS[dataset]
    sample_fp = sample_fp if sample_fp is not None else fingerprints(samples)
    reference_fp = reference_fp if reference_fp is not None else fingerprints(reference)
    report = GenerationReport(
        metrics={
            "struct_valid": sum(v.structural for v in validity) / n,
            "comp_valid": sum(v.compositional for v in validity) / n,
            "valid": len(valid) / n,
        },
        sample_density=[density(r) for r in valid],
        reference_density=[density(r) for r in reference],
        sample_num_elements=[num_elements(r) for r in valid],
        reference_num_elements=[num_elements(r) for r in reference],
    )
    report.metrics.update(coverage(sample_fp, reference_fp, cut["struct"], cut["comp"]))
    report.metrics["wdist_density"] = wasserstein(report.sample_density, report.reference_density)
    report.metrics["wdist_num_elems"] = wasserstein(report.sample_num_elements, report.reference_num_elements)
    report.metrics.update({"n_samples": len(samples), "n_valid": len(valid), "n_reference": len(reference)})
    return report


def markdown_table(per_run: Sequence[dict[str, float]]) -> str:
    """One row per metric: mean ± std over sampling runs (std 0 for one run)."""
    lines = ["| metric | mean | std | runs |", "| --- | --- | --- | --- |"]
    for metric in METRICS:
        values = np.array([m[metric] for m in per_run], dtype=np.float64)
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        lines.append(f"| {metric} | {np.mean(values):.4f} | {std:.4f} | {len(values)} |")
    return "\n".join(lines) + "\n"


def plot_distributions(reports: Sequence[GenerationReport], path) -> None:
    """Histograms of density and number of elements: valid samples (all runs) against the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sample_density = [d for r in reports for d in r.sample_density]
    sample_elements = [e for r in reports for e in r.sample_num_elements]
    ref_density, ref_elements = reports[0].reference_density, reports[0].reference_num_elements
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    top = max(sample_density + ref_density + [1.0])
    bins = np.linspace(0, top, 40)
    left.hist(ref_density, bins=bins, density=True, alpha=0.5, label=f"reference ({len(ref_density)})")
    left.hist(sample_density, bins=bins, density=True, alpha=0.5, label=f"valid samples ({len(sample_density)})")
    left.set_xlabel("density (g/cm³)")
    left.set_title(f"W1 = {np.mean([r.metrics['wdist_density'] for r in reports]):.3f}")
    left.legend(fontsize=8)
    most = max(sample_elements + ref_elements + [1])
    edges = np.arange(0.5, most + 1.5)
    right.set_xticks(range(1, most + 1))
    right.hist(ref_elements, bins=edges, density=True, alpha=0.5, label="reference")
    right.hist(sample_elements, bins=edges, density=True, alpha=0.5, label="valid samples")
    right.set_xlabel("number of elements")
    right.set_title(f"W1 = {np.mean([r.metrics['wdist_num_elems'] for r in reports]):.3f}")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------- featurizer caches
_FEATURIZERS: dict[str, object] = {}
_MAGPIE: dict[str, np.ndarray] = {}


def _cached(name, build):
    if name not in _FEATURIZERS:
        _FEATURIZERS[name] = build()
    return _FEATURIZERS[name]


def _formula(record: CrystalRecord) -> str:
    from pymatgen.core import Composition

    return Composition(dict(zip(*np.unique(record.atomic_numbers, return_counts=True)))).formula


def _magpie(formula: str) -> np.ndarray:
    if formula not in _MAGPIE:
        from matminer.featurizers.composition.composite import ElementProperty
        from pymatgen.core import Composition

        featurizer = _cached("magpie", lambda: ElementProperty.from_preset("magpie", impute_nan=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _MAGPIE[formula] = np.asarray(featurizer.featurize(Composition(formula)), dtype=np.float64)
    return _MAGPIE[formula]
