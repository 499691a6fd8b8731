"""Deterministic splits by hash of a group id.

A record's split depends only on (seed, group id, fractions): sha256 of `"{seed}:{group}"` read as a
number in [0, 1) picks the split by cumulative fraction, in the order the splits are listed. So
every frame of one MPtrj material (same group) lands in the same split, adding or removing other
records never moves a record to another split, and no state is shared between workers.
Grouping by reduced formula (`split_by: reduced_formula`) keeps every polymorph of a composition
together, the stricter choice for composition-generalisation benchmarks.
"""
from __future__ import annotations

import hashlib


def split_group(group: str, formula: str, split_by: str) -> str:
    if split_by == "group":
        return group
    if split_by == "reduced_formula":
        return formula
    raise ValueError(f"split_by must be 'group' or 'reduced_formula', got {split_by!r}")


def unit_hash(text: str, seed: int) -> float:
    """A uniform number in [0, 1) from sha256 of '{seed}:{text}' (53 bits, exact in a float)."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def assign_split(group_id: str, fractions: dict[str, float], seed: int) -> str:
    u = unit_hash(group_id, seed)
    total = 0.0
    names = list(fractions)
    for name in names:
        total += fractions[name]
        if u < total:
            return name
    # Rounding can leave u ≥ the float sum; the last split with a non-zero fraction takes it.
    return next(n for n in reversed(names) if fractions[n] > 0)


def shuffle_key(name: str, seed: int) -> bytes:
    """Order of samples inside a split: a seeded hash, so shards mix sources and materials."""
    return hashlib.sha256(f"order:{seed}:{name}".encode()).digest()[:12]
