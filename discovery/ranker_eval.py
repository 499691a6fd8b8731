"""How well does a ranker order real crystals by stability? Spearman ρ(score, E_hull) with a bootstrap CI.

Every ranker scores the same labelled crystals (e.g. MP-20's test half with its DFT e_above_hull);
lower scores mean "more stable", so a good ranker has ρ > 0. Rankers are compared on the crystals
all of them could score (D_C leaves a crystal unscored when no reference crystal shares its
chemistry), and the bootstrap resamples those crystals with one seeded set of resamples shared by
all rankers, so their intervals are paired. The interval is the percentile interval of ρ over
the resamples.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95


@dataclass
class RankerResult:
    ranker: str
    scored: int  # crystals this ranker scored (of those with a label)
    n: int  # crystals ρ is computed on (scored by every ranker)
    spearman: float
    ci_low: float
    ci_high: float

    def row(self) -> dict:
        return asdict(self)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), as Spearman's ρ needs."""
    from scipy.stats import rankdata

    return rankdata(values, axis=-1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    denom = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(-1) / denom, np.nan)


def spearman(scores: Sequence[float], labels: Sequence[float]) -> float:
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(scores) < 3:
        return math.nan
    return float(_pearson_rows(_ranks(scores), _ranks(labels)))


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] indices drawn with replacement from a seeded generator."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def spearman_ci(scores: Sequence[float], labels: Sequence[float], indices: np.ndarray,
                confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(ρ, low, high): ρ on all crystals and the percentile interval over the bootstrap resamples."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    rho = spearman(scores, labels)
    if len(scores) < 3 or not len(indices):
        return rho, math.nan, math.nan
    boot = _pearson_rows(_ranks(scores[indices]), _ranks(labels[indices]))  # [resamples]
    boot = boot[np.isfinite(boot)]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail]) if len(boot) else (math.nan, math.nan)
    return rho, float(low), float(high)


def random_scores(n: int, seed: int) -> np.ndarray:
    """The no-skill ranker: a seeded uniform score per crystal."""
    return np.random.default_rng(seed).random(n)


def evaluate_rankers(labels: Sequence[float], scores: Mapping[str, Sequence[float]], resamples: int = 1000,
                     seed: int = 0, confidence: float = CONFIDENCE) -> list[RankerResult]:
    """ρ(score, label) of each ranker on the crystals every ranker scored, with paired bootstrap CIs."""
    labels = np.asarray(labels, dtype=np.float64)
    table = {name: np.asarray(s, dtype=np.float64) for name, s in scores.items()}
    for name, s in table.items():
        if s.shape != labels.shape:
            raise ValueError(f"ranker {name}: {len(s)} scores for {len(labels)} labels")
    common = np.isfinite(labels)
    for s in table.values():
        common &= np.isfinite(s)
    indices = bootstrap_indices(int(common.sum()), resamples, seed)
    results = []
    for name, s in table.items():
        rho, low, high = spearman_ci(s[common], labels[common], indices, confidence)
        scored = int((np.isfinite(s) & np.isfinite(labels)).sum())
        results.append(RankerResult(name, scored, int(common.sum()), rho, low, high))
    return results


def markdown_table(results: Sequence[RankerResult], confidence: float = CONFIDENCE) -> str:
    pct = f"{confidence:.0%}"
    lines = [f"| ranker | scored | n | Spearman ρ(score, E_hull) | {pct} CI |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.ranker} | {r.scored} | {r.n} | {r.spearman:.3f} | [{r.ci_low:.3f}, {r.ci_high:.3f}] |")
    return "\n".join(lines) + "\n"
