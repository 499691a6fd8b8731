"""Raw → shard throughput per core, against a plain baseline measured in the same run, with the
validation distance check before (vesin neighbour search on every record) and after (the exact
minimum-image pass first, the search only for records it cannot clear).

baseline   pymatgen `Structure.from_str(cif)` + `pickle.dumps` in a loop (what a quick script does)
stages     each stage timed alone on the same records: reader parse (gemmi fast path for P1 CIFs),
           validate, encode (JSON + safetensors)
task       the build's Ray task body (`build.parse_chunk`): parse + validate + encode + dedup keys +
           chunk file write
build      the whole build in one process (`executor: inline`): scan, parse, validate, dedup,
           split, write shards, manifest

Times are CPU seconds of this process (`time.process_time`, best of --repeat), so one number is
one core's cost and other jobs on the machine inflate it less than wall-clock time.

With --interleave R, R more rounds each time the baseline and then the task back to back and
report the task's speed-up round by round: on a machine whose speed drifts by 1.5x within minutes
(another job on the other core), the ratio of two measurements a second apart is steadier than
best-of-repeat figures taken tens of seconds apart.

Usage: python benchmarks/raw_to_shard.py [--n 2000] [--repeat 3] [--interleave 0]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import os
import pickle
import shutil
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CRYSTALFM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


@contextlib.contextmanager
def neighbour_search_only():
    """The validator as it was before the minimum-image pass: the neighbour search for every record."""
    from data_pipeline.build import validate as validate_module

    cheap = validate_module._clear_by_minimum_image
    validate_module._clear_by_minimum_image = lambda record: False
    try:
        yield
    finally:
        validate_module._clear_by_minimum_image = cheap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="MP-20 rows (from val.csv.gz)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--interleave", type=int, default=0, help="rounds of baseline-then-task ratios (0: none)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from pymatgen.core import Structure

    from data_pipeline.build import stages as build_module
    from data_pipeline.build.config import BuildConfig
    from data_pipeline.build.readers import open_reader
    from data_pipeline.build.validate import validate
    from data_pipeline.shard_format import encode_record

    tmp = Path(tempfile.mkdtemp(prefix="raw_to_shard_"))
    seconds: dict[str, float] = {}
    try:
        # The same N real MP-20 rows for every contender.
        with gzip.open(DATA / "mp_20" / "val.csv.gz", "rt", newline="") as src:
            rows = [row for _, row in zip(range(args.n + 1), csv.reader(src))]
        subset = tmp / "mp20_subset.csv"
        with open(subset, "w", newline="") as dst:
            csv.writer(dst).writerows(rows)
        header, body = rows[0], rows[1:]
        cifs = [row[header.index("cif")] for row in body]
        n = len(cifs)

        reader = open_reader("cdvae_csv", subset, source="mp20")
        entries = list(reader.scan())
        records = [reader.parse(e) for e in entries]
        source = {"kind": "cdvae_csv", "path": str(subset), "options": {"source": "mp20"}, "name": "mp20"}
        build_module.parse_chunk(source, entries[:20], str(tmp / "warm"), "x")  # imports, JIT, caches
        validate(records[0], distance_prefilter=False)  # imports vesin (and torch) before any timing
        for cif in cifs[:20]:
            pickle.dumps(Structure.from_str(cif, fmt="cif"))

        def whole_build():
            out = tmp / "shards"
            shutil.rmtree(out, ignore_errors=True)
            config = BuildConfig.from_dict({"sources": [{"kind": "cdvae_csv", "path": str(subset), "name": "mp20"}],
                                            "out": str(out), "executor": "inline", "chunk_size": 256})
            build_module.build(config, progress=False, log=lambda _: None)

        def task():
            build_module.parse_chunk(source, entries, str(tmp / "chunk"), "x")

        r = args.repeat
        seconds["baseline"] = best_seconds(lambda: [pickle.dumps(Structure.from_str(c, fmt="cif")) for c in cifs], r)
        seconds["parse"] = best_seconds(lambda: [reader.parse(e) for e in entries], r)
        seconds["encode"] = best_seconds(lambda: [encode_record(x) for x in records], r)
        for when, context in (("before", neighbour_search_only), ("after", contextlib.nullcontext)):
            with context():
                seconds[f"validate {when}"] = best_seconds(lambda: [validate(x) for x in records], r)
                seconds[f"task {when}"] = best_seconds(task, r)
                seconds[f"build {when}"] = best_seconds(whole_build, max(1, r - 1))
        from data_pipeline.build import validate as validate_module

        searched = sum(not validate_module._clear_by_minimum_image(x) for x in records)
        rounds = []  # (baseline seconds, task seconds), measured back to back
        for _ in range(args.interleave):
            rounds.append((best_seconds(lambda: [pickle.dumps(Structure.from_str(c, fmt="cif")) for c in cifs], 1),
                           best_seconds(task, 1)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    us = {name: 1e6 * s / n for name, s in seconds.items()}
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
          "(1/5/15 min); CPU time of one process, best of "
          f"{args.repeat}")
    print(f"structures: {n} real MP-20 CIFs (val.csv.gz); after: {searched} of them still needed the neighbour search")
    print()
    print("per-stage CPU time per structure (µs)")
    print(f"{'stage':<48} {'before':>9} {'after':>9}")
    for stage, before, after in (
        ("reader parse (gemmi P1 fast path)", us["parse"], us["parse"]),
        ("validate (distance check + the rest)", us["validate before"], us["validate after"]),
        ("encode (json + safetensors)", us["encode"], us["encode"]),
        ("task rest: dedup keys, chunk write, loop", us["task before"] - us["parse"] - us["validate before"] - us["encode"],
         us["task after"] - us["parse"] - us["validate after"] - us["encode"]),
        ("= build task (parse_chunk)", us["task before"], us["task after"]),
        ("build rest: scan, dedup, split, shards, manifest", us["build before"] - us["task before"],
         us["build after"] - us["task after"]),
        ("= whole build inline", us["build before"], us["build after"]),
    ):
        print(f"{stage:<48} {before:>9.1f} {after:>9.1f}")
    print()
    print("throughput per core against the baseline")
    print(f"{'contender':<58} {'before':>14} {'after':>14}")
    base = us["baseline"]

    def cell(t):
        return f"{1e6 / t:>6.0f}/s {base / t:>5.2f}x"

    print(f"{'baseline: pymatgen Structure.from_str + pickle.dumps':<58} {cell(base):>14} {cell(base):>14}")
    print(f"{'  reader.parse only':<58} {cell(us['parse']):>14} {cell(us['parse']):>14}")
    for label, key in (("  parse + validate", "validate"),):
        print(f"{label:<58} {cell(us['parse'] + us[key + ' before']):>14} {cell(us['parse'] + us[key + ' after']):>14}")
    print(f"{'build task: parse + validate + encode + dedup keys + write':<58} {cell(us['task before']):>14} {cell(us['task after']):>14}")
    print(f"{'whole build inline: ... + dedup + split + shards + manifest':<58} {cell(us['build before']):>14} {cell(us['build after']):>14}")

    if rounds:
        ratios = sorted(b / t for b, t in rounds)
        print()
        print(f"interleaved: build task vs baseline, {len(rounds)} rounds back to back (µs per structure: baseline / task)")
        print("  " + "  ".join(f"{1e6 * b / n:.0f}/{1e6 * t / n:.0f} = {b / t:.1f}x" for b, t in rounds))
        print(f"  median {ratios[len(ratios) // 2]:.1f}x, range {ratios[0]:.1f}-{ratios[-1]:.1f}x")


if __name__ == "__main__":
    main()
