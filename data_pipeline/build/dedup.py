"""Deduplication keys and structural matching, bucketed and split so it scales.

Three levels, cheapest first:

* key: two records with the same sample name (the sanitised record key) are the same record;
  the later one is always dropped (keys must be unique inside a shard set).
* exact: `exact_fingerprint` hashes the lattice and the sorted (Z, fractional position) list,
  rounded, so the same structure with its atoms listed in another order hashes the same.
* structural: pymatgen's StructureMatcher (supercells, permutations, translations, small strain).

Structural matching, and why it is shaped like this:

* **Bucket by reduced formula** (computed for every record by its parse task). The matcher never
  matches two formulas.
* **A shape key instead of the space group** (`shape_key`, also computed in the parse task when
  the build matches structurally): the number of sites of the primitive cell and the three
  lattice lengths of its Niggli cell, as logs, divided by (volume per site)^(1/3) when the matcher
  scales volumes. The matcher compares exactly these reduced cells, refuses two cells of
  different site counts (no supercell attempt), and maps lattice vectors only when every length
  is within a factor (1 + ltol); so two structures whose log lengths differ by more than
  `shape_tolerance` = 2·log(1 + ltol) (one factor of margin) are never compared (`could_match`).
  Unlike spglib's space group at a fixed symprec, the key moves continuously with noise: 200
  copies of a crystal with 0.01 Å noise land in several space groups but in one or two adjacent
  shape bins, and now collapse to one record.
* **Cells and pieces.** Records are binned by (sites, floor(log length / tolerance)) for the two
  shortest lengths; a pair that `could_match` always lies in the same or adjacent bins. A formula
  bucket of at most `group_size` records is one *piece*; a bigger one is cut into pieces of whole
  bins, packed in bin order, and a bin bigger than `group_size` is cut in global record order.
  The cut depends only on the data and `group_size`, never on the number of workers.
* **Phase 1, one task per batch of pieces** (largest first): in global order each record is
  checked against the `exclude` references of its formula (→ `excluded`), then, if its source is
  `structural`, against the *representatives* kept so far in its piece (→ `structural`); else it
  becomes a representative. This is the whole algorithm for a formula bucket that is one piece.
* **Phase 2, only for formula buckets of several pieces:** the representatives of different
  pieces that `could_match` are compared in tiles (`pair_tiles`, tasks of at most TILE × TILE
  pairs, so no task holds a quadratic bucket), and the driver resolves the results in global
  order (`resolve_representatives`): a representative is dropped when it fits an earlier
  representative still kept; the first such one is what it matched. The merge is deterministic
  and independent of how the tiles were scheduled.

The same matching excludes benchmark test-set structures (`exclude` sources) from the shards.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.build import kernels
from data_pipeline.record import CrystalRecord

# Shape keys are rounded so the JSON chunk index stores exactly what the matcher planning uses.
SHAPE_DECIMALS = 6
UNKNOWN_SHAPE = (0, 0.0, 0.0, 0.0)  # reduction failed: compared with every record of its formula
TILE = 32  # representatives per side of a phase-2 tile (≤ TILE² comparisons per task)


def exact_fingerprint(record: CrystalRecord, length_decimals: int = 4, frac_decimals: int = 5) -> str:
    """sha256 over the rounded lattice and the sorted, rounded (Z, frac) rows (32 hex chars)."""
    if 0 <= length_decimals <= 15 and 0 <= frac_decimals <= 15:
        # the same two tables, back to back, from one compiled call (kernels.fingerprint_tables)
        finite, tables = kernels.fingerprint_tables(record.atomic_numbers, record.frac_coords, record.lattice,
                                                    float(10**length_decimals), float(10**frac_decimals))
        if finite:
            return hashlib.sha256(tables.astype("<f8", copy=False).tobytes()).hexdigest()[:32]
    return _exact_fingerprint_numpy(record, length_decimals, frac_decimals)


def _exact_fingerprint_numpy(record: CrystalRecord, length_decimals: int, frac_decimals: int) -> str:
    """exact_fingerprint in numpy: the reference, and the path for NaN/Inf (lexsort's order) and odd decimals."""
    lattice = record.lattice.round(length_decimals) + 0.0  # + 0.0 folds -0.0
    rows = np.empty((record.num_atoms, 4), dtype=np.float64)  # [N, 4]: Z, x, y, z
    rows[:, 0] = record.atomic_numbers
    rows[:, 1:] = record.frac_coords.round(frac_decimals) % 1.0 + 0.0
    rows = rows[np.lexsort(rows.T[::-1])]  # by Z, then x, y, z (lexsort's last key is the first)
    sha = hashlib.sha256(lattice.astype("<f8", copy=False).tobytes())
    sha.update(rows.astype("<f8", copy=False).tobytes())
    return sha.hexdigest()[:32]


def space_group_number(record: CrystalRecord, symprec: float = 0.1) -> int:
    """International space-group number from spglib; 0 when spglib finds none (a diagnostic:
    the structural matching no longer buckets by it, see the module docstring)."""
    import spglib

    cell = (record.lattice, record.frac_coords, record.atomic_numbers)
    try:
        dataset = spglib.get_symmetry_dataset(cell, symprec=symprec)
    except Exception:  # noqa: BLE001 - spglib raises on odd cells; 0 keeps them in their own bucket
        return 0
    return int(dataset.number) if dataset is not None else 0


# ---------------------------------------------------------------------------- shape keys
def make_matcher(matcher_cfg):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(
        ltol=matcher_cfg.ltol,
        stol=matcher_cfg.stol,
        angle_tol=matcher_cfg.angle_tol,
        primitive_cell=matcher_cfg.primitive_cell,
        scale=matcher_cfg.scale,
    )


def reduced_structure(record: CrystalRecord, matcher_cfg):
    """The primitive, Niggli-reduced structure StructureMatcher compares (its own reduction)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher._get_reduced_structure(_bare_structure(record), matcher_cfg.primitive_cell, True)


def shape_of_reduced(reduced, scale: bool) -> tuple:
    """(sites, log a, log b, log c) of a reduced cell, lengths sorted, scale-free when `scale`."""
    lengths = np.sort(np.asarray(reduced.lattice.abc, dtype=np.float64))
    n = len(reduced)
    if scale:
        lengths = lengths / (reduced.lattice.volume / n) ** (1.0 / 3.0)
    return (int(n), *(round(float(math.log(x)), SHAPE_DECIMALS) for x in lengths))


def shape_key(record: CrystalRecord, matcher_cfg) -> tuple:
    """The record's shape key (module docstring); UNKNOWN_SHAPE when the reduction fails."""
    try:
        return shape_of_reduced(reduced_structure(record, matcher_cfg), matcher_cfg.scale)
    except Exception:  # noqa: BLE001 - an odd cell is still matched, against its whole formula
        return UNKNOWN_SHAPE


def shape_tolerance(matcher_cfg) -> float:
    """Largest |Δ log length| of two cells the matcher could fit: log(1 + ltol), doubled as margin."""
    return 2.0 * math.log1p(matcher_cfg.ltol)


def could_match(a: tuple, b: tuple, tol: float) -> bool:
    """False only when StructureMatcher cannot fit the two cells (different site counts or lengths)."""
    if a[0] == 0 or b[0] == 0:
        return True
    return a[0] == b[0] and max(abs(a[1] - b[1]), abs(a[2] - b[2]), abs(a[3] - b[3])) <= tol


def shape_bin(shape: tuple, tol: float) -> tuple:
    """(sites, bin of log a, bin of log b): pairs that could match are in the same or adjacent bins."""
    if shape[0] == 0:
        return (0, 0, 0)
    return (shape[0], math.floor(shape[1] / tol), math.floor(shape[2] / tol))


# ---------------------------------------------------------------------------- planning (driver)
def plan_pieces(shapes: list[tuple], group_size: int, tol: float) -> list[list[int]]:
    """Cut one formula bucket's records (positions in global order, with their shapes) into pieces.

    At most `group_size` records: one piece. Otherwise whole bins packed in bin order up to
    `group_size`; a bin bigger than that is cut in global order. Each piece lists positions in
    global order. Records of unknown shape go with the first piece (they are compared against
    every representative in phase 2 anyway)."""
    if len(shapes) <= group_size:
        return [list(range(len(shapes)))]
    bins: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        bins.setdefault(shape_bin(shape, tol), []).append(i)
    pieces: list[list[int]] = []
    current: list[int] = []
    for key in sorted(bins):
        members = bins[key]
        if len(members) > group_size:
            pieces.extend(members[s:s + group_size] for s in range(0, len(members), group_size))
            continue
        if current and len(current) + len(members) > group_size:
            pieces.append(sorted(current))
            current = []
        current.extend(members)
    if current:
        pieces.append(sorted(current))
    return pieces


def pair_tiles(reps: list[int], shapes: list[tuple], piece_of: list[int], structural: list[bool],
               tol: float, tile: int = TILE) -> list[list[tuple[int, int]]]:
    """Phase-2 work: every (earlier rep a, later structural rep b) of different pieces that could
    match, as tiles of at most tile × tile pairs. reps: positions in global order."""
    tiles = []
    blocks = [reps[s:s + tile] for s in range(0, len(reps), tile)]
    for bi, later in enumerate(blocks):
        for ai in range(bi + 1):
            pairs = [(a, b) for b in later if structural[b] for a in blocks[ai]
                     if a < b and piece_of[a] != piece_of[b] and could_match(shapes[a], shapes[b], tol)]
            if pairs:
                tiles.append(pairs)
    return tiles


def resolve_representatives(reps: list[int], structural: list[bool], fits: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """Greedy in global order over phase-1 representatives: b is dropped when it fits an earlier
    representative that is still kept (the first such one). Returns [(b, matched a)]."""
    kept: list[int] = []
    dropped = []
    for b in reps:
        hit = next((a for a in kept if (a, b) in fits), None) if structural[b] else None
        if hit is None:
            kept.append(b)
        else:
            dropped.append((b, hit))
    return dropped


# ---------------------------------------------------------------------------- matching (tasks)
@dataclass(frozen=True)
class Candidate:
    """One structure in a formula bucket, in global build order.

    role: 'ref' (an exclude-source structure), or 'record' with `structural` True when its source
    asks for structural dedup (records of other sources are kept and serve as references).
    shape: the parse task's shape key (computed here when None).
    """

    name: str
    role: str
    structural: bool
    record: CrystalRecord
    shape: tuple | None = None


@dataclass
class PairMatcher:
    """StructureMatcher with each structure reduced once (not once per pair) and fits counted."""

    matcher_cfg: object
    fits: int = 0
    _matcher: object = None
    _reduced: dict = field(default_factory=dict)
    _shapes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._matcher = make_matcher(self.matcher_cfg)
        self.tol = shape_tolerance(self.matcher_cfg)

    def reduced(self, key, record: CrystalRecord):
        if key not in self._reduced:
            self._reduced[key] = reduced_structure(record, self.matcher_cfg)
        return self._reduced[key]

    def shape(self, key, candidate: Candidate) -> tuple:
        if candidate.shape is not None:
            return tuple(candidate.shape)
        if key not in self._shapes:
            self._shapes[key] = shape_key(candidate.record, self.matcher_cfg)
        return self._shapes[key]

    def fit(self, ka, a: Candidate, kb, b: Candidate) -> bool:
        """Does a (the later structure) fit b? Skipped (False) when the shapes rule it out."""
        if not could_match(self.shape(ka, a), self.shape(kb, b), self.tol):
            return False
        self.fits += 1
        return self._matcher.fit(self.reduced(ka, a.record), self.reduced(kb, b.record), skip_structure_reduction=True)


def match_piece(records: list[Candidate], refs: list[Candidate], check_exclude: bool,
                pm: PairMatcher, keys: list | None = None) -> list[tuple[int, str, int]]:
    """Phase 1 on one piece: [(record position, 'excluded' | 'structural', matched position)], the
    matched position indexing `refs` for 'excluded' and `records` for 'structural'. keys: the
    matcher's cache key of each record (default its position)."""
    keys = keys if keys is not None else [("rec", i) for i in range(len(records))]
    reps: list[int] = []
    dropped = []
    for i, c in enumerate(records):
        if check_exclude:
            hit = next((j for j, r in enumerate(refs) if pm.fit(keys[i], c, ("ref", j), r)), None)
            if hit is not None:
                dropped.append((i, "excluded", hit))
                continue
        if c.structural:
            hit = next((j for j in reps if pm.fit(keys[i], c, keys[j], records[j])), None)
            if hit is not None:
                dropped.append((i, "structural", hit))
                continue
        reps.append(i)
    return dropped


def match_bucket(candidates: list[Candidate], matcher_cfg, check_exclude: bool, group_size: int | None = None,
                 stats: dict | None = None) -> list[tuple[str, str, str]]:
    """Resolve one reduced-formula bucket in-process (both phases); [(name, how, matched_name)].

    how is 'excluded' (matches a ref) or 'structural' (matches an earlier kept record). Records are
    visited in the given (global) order, so the first of a set of duplicates is the one kept.
    `group_size` (None: one piece) cuts the bucket as the build does; `stats` gets the fit count."""
    pm = PairMatcher(matcher_cfg)
    refs = [c for c in candidates if c.role == "ref"]
    records = [c for c in candidates if c.role != "ref"]
    shapes = [pm.shape(("rec", i), c) for i, c in enumerate(records)]
    pieces = plan_pieces(shapes, group_size or max(1, len(records)), pm.tol)
    piece_of = [0] * len(records)
    dropped_at: dict[int, tuple[str, str]] = {}
    for p, piece in enumerate(pieces):
        for i in piece:
            piece_of[i] = p
        local = [records[i] for i in piece]
        for i, how, j in match_piece(local, refs, check_exclude, pm, keys=[("rec", k) for k in piece]):
            dropped_at[piece[i]] = (how, refs[j].name if how == "excluded" else local[j].name)
    if len(pieces) > 1:
        structural = [c.structural for c in records]
        reps = [i for i in range(len(records)) if i not in dropped_at]
        fits = set()
        for tile in pair_tiles(reps, shapes, piece_of, structural, pm.tol):
            for a, b in tile:
                if pm.fit(("rec", b), records[b], ("rec", a), records[a]):
                    fits.add((a, b))
        for b, a in resolve_representatives(reps, structural, fits):
            dropped_at[b] = ("structural", records[a].name)
    if stats is not None:
        stats["fits"] = stats.get("fits", 0) + pm.fits
        stats["pieces"] = stats.get("pieces", 0) + len(pieces)
    return [(records[i].name, *dropped_at[i]) for i in sorted(dropped_at)]


def _bare_structure(record: CrystalRecord):
    """A pymatgen Structure without site properties (forces, magmoms are not part of identity)."""
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(record.lattice), record.atomic_numbers.tolist(), record.frac_coords)
