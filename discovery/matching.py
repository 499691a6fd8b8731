"""Uniqueness within a set of crystals and novelty against a reference set.

pymatgen's StructureMatcher with CDVAE's metric tolerances (stol 0.5, angle_tol 10, ltol 0.3),
compared only within buckets of equal reduced formula, so cost grows with the bucket sizes and
not with the square of the set.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

MATCHER_DEFAULTS = {"stol": 0.5, "angle_tol": 10.0, "ltol": 0.3}


def _matcher(**overrides):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(**{**MATCHER_DEFAULTS, **overrides})


def uniqueness(structures: Sequence, **matcher_options) -> list[bool]:
    """True for the first occurrence of each distinct crystal, False for later duplicates."""
    matcher = _matcher(**matcher_options)
    kept: dict[str, list] = defaultdict(list)
    out = []
    for structure in structures:
        bucket = kept[structure.composition.reduced_formula]
        duplicate = any(matcher.fit(structure, other) for other in bucket)
        if not duplicate:
            bucket.append(structure)
        out.append(not duplicate)
    return out


class NoveltyIndex:
    """Reference structures bucketed by reduced formula; `is_novel` matches only within a bucket."""

    def __init__(self, reference: Sequence = (), **matcher_options):
        self._matcher = _matcher(**matcher_options)
        self._buckets: dict[str, list] = defaultdict(list)
        for structure in reference:
            self.add(structure)

    def add(self, structure) -> None:
        self._buckets[structure.composition.reduced_formula].append(structure)

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def is_novel(self, structure) -> bool:
        bucket = self._buckets.get(structure.composition.reduced_formula, ())
        return not any(self._matcher.fit(structure, other) for other in bucket)
