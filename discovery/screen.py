"""Crys-JEPA stability screening (paper Eq. 11) and the rankers it is compared with.

For a candidate c with chemical system X (its set of elements), the reference set R(c) is every
training crystal whose elements are a subset of X. The screening score is

    D_C(c) = (1 / |R(c)|) Σ_{r ∈ R(c)} ‖ e(c) − e(r) ‖²

with e(·) the JEPA embedding. JEPA was trained so that embedding distance tracks formation-energy
difference, so a small D_C means "close to known, mostly stable, crystals of the same chemistry".
Candidates with an empty R(c) are reported as unscored, never guessed. Lower D_C ranks first.

Reference embeddings are computed once per reference crystal and the subset sums
(Σ e, Σ ‖e‖², count) are cached by chemical system, so D_C costs O(d) per candidate:
    Σ_r ‖e_c − e_r‖² = |R| ‖e_c‖² − 2 e_c·Σ e_r + Σ ‖e_r‖².
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Sequence

import numpy as np

from data_pipeline.record import CrystalRecord


def chemical_system(record: CrystalRecord) -> frozenset[int]:
    return frozenset(int(z) for z in np.unique(record.atomic_numbers))


def subsystem_values(by_system: dict, system: frozenset[int]) -> list:
    """The values of `by_system` (keyed by exact chemical system) of every system ⊆ `system`: the subsets are
    enumerated when the system is small (typical), else the keys are scanned."""
    elements = sorted(system)
    if len(elements) <= 8:
        subsets = (frozenset(c) for k in range(1, len(elements) + 1) for c in combinations(elements, k))
        return [by_system[s] for s in subsets if s in by_system]
    return [v for s, v in by_system.items() if s <= system]


class ReferenceEmbeddings:
    """Reference crystals' embeddings grouped by exact chemical system, with per-system sums."""

    def __init__(self, records: Sequence[CrystalRecord], embeddings: np.ndarray):
        if len(records) != len(embeddings):
            raise ValueError(f"{len(records)} reference records but {len(embeddings)} embeddings")
        groups: dict[frozenset[int], list[int]] = defaultdict(list)
        for i, record in enumerate(records):
            groups[chemical_system(record)].append(i)
        emb = np.asarray(embeddings, dtype=np.float64)
        # per exact system: (count, Σ e, Σ ‖e‖²)
        self._exact = {s: (len(ix), emb[ix].sum(0), float((emb[ix] ** 2).sum())) for s, ix in groups.items()}
        self._cache: dict[frozenset[int], tuple[int, np.ndarray, float]] = {}
        self.dim = emb.shape[1] if emb.ndim == 2 else 0

    def subset_sums(self, system: frozenset[int]) -> tuple[int, np.ndarray, float]:
        """(|R|, Σ e_r, Σ ‖e_r‖²) over reference crystals whose elements ⊆ system; cached."""
        if system not in self._cache:
            count, total, squares = 0, np.zeros(self.dim), 0.0
            for n, s_e, s_sq in subsystem_values(self._exact, system):
                count, total, squares = count + n, total + s_e, squares + s_sq
            self._cache[system] = (count, total, squares)
        return self._cache[system]

    def distance(self, record: CrystalRecord, embedding: np.ndarray) -> tuple[float, int]:
        """(D_C, |R|); D_C is NaN when no reference crystal shares the chemistry."""
        count, total, squares = self.subset_sums(chemical_system(record))
        if count == 0:
            return math.nan, 0
        e = np.asarray(embedding, dtype=np.float64)
        return float((count * e @ e - 2 * e @ total + squares) / count), count


@dataclass
class ScreenRow:
    key: str
    score: float  # D_C (or another ranker's score); lower is better; NaN = unscored
    references: int
    rank: int | None = None
    kept: bool = False


def rank_candidates(keys: Sequence[str], scores: Sequence[float], references: Sequence[int], keep_fraction: float) -> list[ScreenRow]:
    """Rank scored candidates (ascending score), keep the top `keep_fraction` of the scored ones."""
    rows = [ScreenRow(k, float(s), int(n)) for k, s, n in zip(keys, scores, references)]
    scored = sorted((r for r in rows if math.isfinite(r.score)), key=lambda r: (r.score, r.key))
    keep = max(1, math.ceil(keep_fraction * len(scored))) if scored else 0
    for rank, row in enumerate(scored):
        row.rank, row.kept = rank + 1, rank < keep
    return rows


def jepa_scores(
    candidates: Sequence[CrystalRecord], candidate_embeddings: np.ndarray, reference: ReferenceEmbeddings
) -> tuple[list[float], list[int]]:
    out = [reference.distance(r, e) for r, e in zip(candidates, candidate_embeddings)]
    return [d for d, _ in out], [n for _, n in out]


def embed_records(objective, records: Sequence[CrystalRecord], batch_size: int = 64) -> np.ndarray:
    """[n, d] pooled encoder embeddings of records (JEPA: the [CLS] output) in eval mode."""
    import torch

    from data_pipeline.load.collate import BatchViews, collate

    views = BatchViews.from_dict(objective.batch_views())
    encoder = objective.encoder.eval()
    kind = "cls" if getattr(encoder, "needs_tokens", False) else "mean"
    chunks = []
    with torch.no_grad():
        for start in range(0, len(records), batch_size):
            batch = collate(records[start : start + batch_size], views)
            chunks.append(encoder.embed(batch, kind=kind).double().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, getattr(encoder, "out_dim", 0)))


def fingerprint_embeddings(records: Sequence[CrystalRecord], k: int = 32) -> np.ndarray:
    """A structure-fingerprint baseline ranker: the AMD (average minimum distance) vector, k=32."""
    import amd

    rows = []
    for record in records:
        periodic_set = amd.PeriodicSet(record.cart_coords, record.lattice, types=record.atomic_numbers)
        rows.append(np.asarray(amd.AMD(periodic_set, k), dtype=np.float64))
    return np.stack(rows) if rows else np.zeros((0, k))


def chgnet_scores(candidates: Sequence[CrystalRecord], reference: Sequence[CrystalRecord], elemental: dict[str, float],
                  relaxer=None) -> list[float]:
    """The force-field baseline: CHGNet single-point energy (no relaxation) as a formation energy,
    above the hull of the reference crystals' formation energies (eV/atom); NaN when unscorable."""
    import sys

    from discovery.relax import CHGNetRelaxer
    from discovery.stability import HullReference, formation_energy_per_atom

    hull, relaxer = HullReference.from_records(reference), relaxer or CHGNetRelaxer()
    scores = []
    for record, energy in zip(candidates, relaxer.single_points(list(candidates))):
        composition = record.to_structure().composition
        try:
            if not math.isfinite(energy):
                raise ValueError("CHGNet gave no energy")
            scores.append(hull.e_above_hull(composition, formation_energy_per_atom(composition, energy, elemental)))
        except (KeyError, ValueError) as exc:  # an unscorable candidate is reported, not guessed
            print(f"{record.key}: not scored ({exc})", file=sys.stderr)
            scores.append(math.nan)
    return scores


ScoreFn = Callable[[Sequence[CrystalRecord]], np.ndarray]


# ---------------------------------------------------------------------------- signed (one-sided) rankers
class ReferenceMinimumEnergy:
    """The lowest DFT formation energy (eV/atom) among the reference crystals whose elements are a
    subset of a chemical system, R(c) of Eq. 11; cached by system."""

    def __init__(self, records: Sequence[CrystalRecord]):
        self._exact: dict[frozenset[int], tuple[float, int]] = {}  # system → (min E_f, count)
        for record in records:
            energy = record.formation_energy_per_atom
            if energy is None or not math.isfinite(energy):
                continue
            system = chemical_system(record)
            lowest, count = self._exact.get(system, (math.inf, 0))
            self._exact[system] = (min(energy, lowest), count + 1)
        if not self._exact:
            raise ValueError("the reference crystals carry no formation_energy_per_atom label: a signed ranker needs "
                             "reference energies (MP-20's CSVs and shards built from them have them)")
        self._cache: dict[frozenset[int], tuple[float, int]] = {}

    def minimum(self, system: frozenset[int]) -> tuple[float, int]:
        """(min E_f over R(system), |R|); NaN and 0 when no reference shares the chemistry."""
        if system not in self._cache:
            values = subsystem_values(self._exact, system)
            self._cache[system] = (min(v[0] for v in values), sum(v[1] for v in values)) if values else (math.nan, 0)
        return self._cache[system]


def composition_features(records: Sequence[CrystalRecord]) -> np.ndarray:
    """[n, 100] element fractions: the composition-only features of the baseline energy probe."""
    from data_pipeline.record import MAX_Z

    out = np.zeros((len(records), MAX_Z))
    for i, record in enumerate(records):
        np.add.at(out[i], np.asarray(record.atomic_numbers) - 1, 1.0 / len(record.atomic_numbers))
    return out


class EnergyProbe:
    """A ridge regression from features (a JEPA embedding, or element fractions) to the DFT formation
    energy per atom, fit on the reference crystals; the ridge strength is chosen by 5-fold CV."""

    def __init__(self, features: np.ndarray, energies: Sequence[float]):
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        energies = np.asarray(energies, dtype=np.float64)
        known = np.isfinite(energies)
        if known.sum() < 10:
            raise ValueError(f"an energy probe needs ≥ 10 reference crystals with a formation energy, got {int(known.sum())}")
        self.model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15), cv=5))
        self.model.fit(np.asarray(features, dtype=np.float64)[known], energies[known])

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict(np.asarray(features, dtype=np.float64))


def probe_scores(candidates: Sequence[CrystalRecord], candidate_features: np.ndarray, reference: Sequence[CrystalRecord],
                 reference_features: np.ndarray) -> tuple[list[float], list[int]]:
    """The signed stability score Ê_f(c) − min_{r ∈ R(c)} E_f(r) (eV/atom; lower is more stable): the probe's
    formation energy of the candidate above the lowest known one of its chemistry. Unlike D_C it is one-sided,
    so a crystal below its references ranks first instead of as far off as one above them (docs/discovery_mp20.md,
    session 8: D_C with exact energies ranks MP-20's test half at ρ ≈ 0). NaN (unscored) without a reference."""
    energies = [r.formation_energy_per_atom if r.formation_energy_per_atom is not None else math.nan for r in reference]
    probe = EnergyProbe(reference_features, energies)
    floor = ReferenceMinimumEnergy(reference)
    predicted = probe.predict(candidate_features)
    scores, counts = [], []
    for record, energy in zip(candidates, predicted):
        lowest, count = floor.minimum(chemical_system(record))
        scores.append(float(energy - lowest))
        counts.append(count)
    return scores, counts
