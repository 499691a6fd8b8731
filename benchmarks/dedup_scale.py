"""Structural dedup and shard writing at scale: the previous code against this one, same run, same inputs.

    python benchmarks/dedup_scale.py --polymorphs 100 --planned 3000 --copies 200 --records 5000,20000

The previous code is the data pipeline of BASE_COMMIT, extracted with `git archive` into a temp dir
and imported under another name (its `dedup.match_bucket`, its `stages.write_stage`).

1. Worst-case bucket: N distinct P1 "polymorphs" of one formula, made from a real MP-20 crystal
   (its species; random lattice 0.7–1.4× its lengths, angles 70–110°, random positions at least
   1.2 Å apart). Both matchers run in full; StructureMatcher.fit calls are counted, wall and CPU
   seconds timed. For a bigger bucket (--planned) the comparisons are *counted from the plan*:
   with no duplicates present (checked at N) the old matcher compares every pair of a space group
   (spglib, symprec 0.1) and the new one every pair the shape filter lets through inside a piece,
   plus the phase-2 tiles; the largest task's share is printed too.
2. Noisy copies: C copies of a real crystal with 0.01 Å noise: survivors of each, and how many
   space groups spglib sees among them.
3. Shard writing: R records (perturbed, relabelled MP-20 crystals encoded straight into chunk
   files), split and written by the previous direct copy and by the shuffle, inline in this process;
   file opens under the work dir are counted with an audit hook, and the shard bytes compared.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import io
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("CRYSTALFM_SHARED_DATA", ROOT.parent / "shared" / "data"))
BASE_COMMIT = "db83d54bcac3c02b02f559fe746e71a42deab4ab"
warnings.filterwarnings("ignore")


def base_module(tmp: Path, relpath: str, alias: str):
    """A module of the previous code, loaded from git under another name (its own imports resolve
    to this checkout's packages, which these two modules share unchanged: shard_writer, manifest)."""
    target = tmp / "base"
    if not target.exists():
        target.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASE_COMMIT, "data_pipeline"], check=True,
                                 capture_output=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(target)
    spec = importlib.util.spec_from_file_location(alias, target / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def mp20_structures(n: int):
    from pymatgen.core import Structure

    out = []
    with gzip.open(SHARED / "mp_20" / "val.csv.gz", "rt") as handle:
        for row in csv.DictReader(handle):
            out.append((row["material_id"], Structure.from_str(row["cif"], fmt="cif")))
            if len(out) == n:
                break
    return out


def random_polymorphs(base, n: int, seed: int = 0):
    """Distinct P1 structures with the species of `base` (module docstring)."""
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(seed)
    a0, b0, c0 = base.lattice.abc
    out = []
    while len(out) < n:
        lat = Lattice.from_parameters(*(x * rng.uniform(0.7, 1.4) for x in (a0, b0, c0)), *rng.uniform(70, 110, 3))
        frac = []
        for _ in range(len(base)):
            for _ in range(200):
                p = rng.random(3)
                if all(lat.get_distance_and_image(p, q)[0] >= 1.2 for q in frac):
                    frac.append(p)
                    break
        if len(frac) == len(base):
            out.append(Structure(lat, base.species, frac))
    return out


def record_of(structure, key):
    from data_pipeline.record import CrystalRecord

    return CrystalRecord.from_structure(structure, key=key, source="bench")


class CountFits:
    """Counts StructureMatcher.fit calls made by the previous code (patched on the class)."""

    def __enter__(self):
        from pymatgen.analysis.structure_matcher import StructureMatcher

        self.cls, self.real, self.n = StructureMatcher, StructureMatcher.fit, 0
        outer = self

        def fit(matcher, *args, **kwargs):
            outer.n += 1
            return outer.real(matcher, *args, **kwargs)

        StructureMatcher.fit = fit
        return self

    def __exit__(self, *_):
        self.cls.fit = self.real


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def bench_polymorphs(tmp: Path, args) -> None:
    from data_pipeline.build.config import MatcherConfig
    from data_pipeline.build.dedup import Candidate, match_bucket

    old = base_module(tmp, "data_pipeline/build/dedup.py", "base_dedup")
    cfg = MatcherConfig()
    name, base = next((k, s) for k, s in mp20_structures(200) if len(s) == args.sites)
    polys = random_polymorphs(base, args.polymorphs)
    records = [record_of(s, f"p{i}") for i, s in enumerate(polys)]
    print(f"\n## 1. worst-case bucket: {len(records)} distinct P1 polymorphs of {base.composition.reduced_formula} "
          f"({args.sites} sites, species of {name})")
    old_c = [old.Candidate(r.key, "record", True, r) for r in records]
    with CountFits() as counter:
        old_dropped, old_wall, old_cpu = timed(lambda: old.match_bucket(old_c, cfg, False))
    rows = [("previous: (formula, space group) buckets, all kept compared", counter.n, old_wall, old_cpu, len(old_dropped), 1)]
    for group_size in (512, 32):
        stats: dict = {}
        new_c = [Candidate(r.key, "record", True, r) for r in records]
        new_dropped, wall, cpu = timed(lambda: match_bucket(new_c, cfg, False, group_size=group_size, stats=stats))
        rows.append((f"new: shape filter, group_size {group_size} ({stats['pieces']} piece(s))", stats["fits"], wall, cpu,
                     len(new_dropped), stats["pieces"]))
    print("| matcher | fit calls | vs previous | wall s | CPU s | dropped |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, fits, wall, cpu, dropped, _ in rows:
        print(f"| {label} | {fits} | {fits / rows[0][1]:.3f}x | {wall:.1f} | {cpu:.1f} | {dropped} |")

    if args.planned:
        plan_counts(base, args.planned, cfg)


def plan_counts(base, n: int, cfg) -> None:
    """Comparisons of each matcher on n distinct polymorphs, counted from the plan (no fit run)."""
    from data_pipeline.build.dedup import TILE, could_match, pair_tiles, plan_pieces, shape_key, shape_tolerance, space_group_number

    polys = random_polymorphs(base, n, seed=1)
    records = [record_of(s, f"q{i}") for i, s in enumerate(polys)]
    t0 = time.perf_counter()
    groups: dict[int, int] = {}
    for r in records:
        sg = space_group_number(r, cfg.symprec)
        groups[sg] = groups.get(sg, 0) + 1
    t_sg = time.perf_counter() - t0
    old = sum(k * (k - 1) // 2 for k in groups.values())
    t0 = time.perf_counter()
    shapes = [shape_key(r, cfg) for r in records]
    t_shape = time.perf_counter() - t0
    tol = shape_tolerance(cfg)
    print(f"\n### planned comparisons, {n} distinct polymorphs in one formula bucket (no fit run; spglib "
          f"{t_sg:.0f} s, shape keys {t_shape:.0f} s for all)")
    print("| plan | comparisons | vs previous | tasks | most in one task |\n| --- | ---: | ---: | ---: | ---: |")
    print(f"| previous: one task, space groups {dict(sorted(groups.items()))} | {old} | 1.000x | 1 | {old} |")
    for group_size in (512, 128):
        pieces = plan_pieces(shapes, group_size, tol)
        piece_of = [0] * n
        per_piece = []
        for p, members in enumerate(pieces):
            for i in members:
                piece_of[i] = p
            per_piece.append(sum(could_match(shapes[a], shapes[b], tol) for x, b in enumerate(members) for a in members[:x]))
        tiles = pair_tiles(list(range(n)), shapes, piece_of, [True] * n, tol) if len(pieces) > 1 else []
        per_tile = [len(t) for t in tiles]
        total = sum(per_piece) + sum(per_tile)
        # Phase-1 pieces run one per task (they exceed BUCKET_BATCH); tiles are packed up to 1024 pairs a task.
        tasks = len(pieces) + math.ceil(sum(per_tile) / 1024)
        print(f"| new, group_size {group_size}: {len(pieces)} pieces + {len(tiles)} tiles of ≤{TILE}×{TILE} | {total} | "
              f"{total / old:.3f}x | {tasks} | {max(per_piece + [min(1024, max(per_tile, default=0))])} |")


def carbon24(material_id: str):
    from pymatgen.core import Structure

    with open(SHARED / "carbon_24" / "val.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r["material_id"] == material_id)
    return Structure.from_str(row["cif"], fmt="cif")


def bench_copies(tmp: Path, args) -> None:
    from data_pipeline.build.config import MatcherConfig
    from data_pipeline.build.dedup import Candidate, match_bucket, space_group_number

    sys.path.insert(0, str(ROOT / "tests" / "data_pipeline"))
    from test_dedup_scale import noisy_copies

    old = base_module(tmp, "data_pipeline/build/dedup.py", "base_dedup")
    crystals = [("mp-865981", next(s for k, s in mp20_structures(200) if k == "mp-865981")),
                ("C-13640-2755-45", carbon24("C-13640-2755-45"))]  # Carbon-24, C2/m, within 0.001 Å of R-3m
    for name, base in crystals:
        copies = noisy_copies(record_of(base, name), args.copies, 0.01)
        groups: dict[int, int] = {}
        for c in copies:
            sg = space_group_number(c)
            groups[sg] = groups.get(sg, 0) + 1
        print(f"\n## 2. {args.copies} copies of {name} ({base.composition.reduced_formula}, {len(base)} sites) with 0.01 Å noise")
        print(f"space groups at symprec 0.1: {dict(sorted(groups.items()))}")
        with CountFits() as counter:
            dropped = old.match_bucket([old.Candidate(c.key, "record", True, c) for c in copies], MatcherConfig(), False)
        print(f"previous matcher: {len(copies) - len(dropped)} survivor(s), {counter.n} fit calls")
        for group_size in (128, 32):
            stats: dict = {}
            dropped = match_bucket([Candidate(c.key, "record", True, c) for c in copies], MatcherConfig(), False,
                                   group_size=group_size, stats=stats)
            print(f"new matcher, group_size {group_size}: {len(copies) - len(dropped)} survivor(s), {stats['fits']} fit calls, "
                  f"{stats['pieces']} piece(s)")


_OPENS = {"on": False, "paths": []}


def _audit(event, a):
    if _OPENS["on"] and event == "open" and isinstance(a[0], str) and "/_work/" in a[0]:
        _OPENS["paths"].append(a[0])


def synthetic_state(tmp: Path, n: int, bases, shard_bytes: int, chunk_size: int):
    """A BuildState as the parse stage leaves it: n perturbed, relabelled MP-20 crystals in chunk files."""
    from data_pipeline.build.config import BuildConfig
    from data_pipeline.build.shard_writer import BlobWriter
    from data_pipeline.build.stages import InlineExecutor, RecordMeta, _new_state
    from data_pipeline.record import reduced_formula
    from data_pipeline.shard_format import encode_record

    out = tmp / f"synthetic{n}"
    config = BuildConfig(sources=(), shard_bytes=shard_bytes, chunk_size=chunk_size, out=str(out), executor="inline")
    state = _new_state(config, out)
    state.executor = InlineExecutor()
    (state.work / "chunks").mkdir(parents=True)
    (state.work / "shards").mkdir()
    rng = np.random.default_rng(n)
    for c in range(math.ceil(n / chunk_size)):
        path = state.work / "chunks" / f"000-{c:07d}.bin"
        with BlobWriter(path) as blob:
            for i in range(c * chunk_size, min(n, (c + 1) * chunk_size)):
                name, s = bases[i % len(bases)]
                rec = record_of(s, f"syn:{name}:{i}")
                rec = rec.replace(frac_coords=(rec.frac_coords + rng.normal(0, 0.002, rec.frac_coords.shape)) % 1.0,
                                  energy_per_atom=float(rng.normal(-5, 1)))
                sample = encode_record(rec)
                jr, ar = blob.write(sample["json"]), blob.write(sample["safetensors"])
                state.records.append(RecordMeta(sample["__key__"], rec.key, 0, rec.key, reduced_formula(rec.atomic_numbers),
                                                "", rec.num_atoms, c, jr, ar))
            blob.close()
        state.chunk_paths.append(str(path))
    state.kept = list(state.records)
    return state


def bench_shards(tmp: Path, args) -> None:
    from data_pipeline.build.stages import split_stage, write_stage

    old = base_module(tmp, "data_pipeline/build/stages.py", "base_stages")
    bases = mp20_structures(args.bases)
    sys.addaudithook(_audit)
    print(f"\n## 3. shard writing: chunk_size {args.chunk_size}, shard_bytes {args.shard_bytes}, inline (one process)")
    print("| records | chunks | shards | writer | opens under _work | vs previous | wall s | shards identical |\n"
          "| ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |")
    for n in args.records:
        state = synthetic_state(tmp, n, bases, args.shard_bytes, args.chunk_size)
        split_stage(state)
        results = {}
        for label, fn in (("previous: direct copy", old.write_stage), ("new: shuffle", write_stage)):
            state.out = tmp / f"out-{n}-{label[:3]}"
            state.out.mkdir()
            _OPENS["paths"].clear()
            _OPENS["on"] = True
            infos, wall, _ = timed(lambda: fn(state, False, print))
            _OPENS["on"] = False
            reads = [p for p in _OPENS["paths"] if ".tmp" not in p and p.endswith(".bin")]
            results[label] = (len(reads), wall, {i["file"]: i["sha256"] for i in infos}, len(infos))
        base_opens = results["previous: direct copy"][0]
        same = results["previous: direct copy"][2] == results["new: shuffle"][2]
        for label, (opens, wall, _, shards) in results.items():
            print(f"| {n} | {len(state.chunk_paths)} | {shards} | {label} | {opens} | {opens / base_opens:.3f}x | {wall:.1f} | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--polymorphs", type=int, default=100)
    parser.add_argument("--sites", type=int, default=8, help="sites of the real crystal the polymorphs copy")
    parser.add_argument("--planned", type=int, default=3000, help="bucket size counted from the plan (0: skip)")
    parser.add_argument("--copies", type=int, default=200)
    parser.add_argument("--records", type=lambda s: [int(x) for x in s.split(",")], default=[5000, 20000])
    parser.add_argument("--bases", type=int, default=1000, help="real MP-20 crystals the synthetic records perturb")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--shard-bytes", type=int, default=1 << 20)
    parser.add_argument("--only", choices=["dedup", "copies", "shards"], default=None)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"previous code: {BASE_COMMIT[:8]}; this code: "
          f"{subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only in (None, "dedup"):
            bench_polymorphs(tmp, args)
        if args.only in (None, "copies"):
            bench_copies(tmp, args)
        if args.only in (None, "shards"):
            bench_shards(tmp, args)
    print(f"\nuptime at the end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
