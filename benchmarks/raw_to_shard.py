"""Raw → shard throughput per core, against a plain baseline measured in the same run.

baseline   pymatgen `Structure.from_str(cif)` + `pickle.dumps` in a loop (what a quick script does)
task       the build's Ray task body (`build.parse_chunk`): reader parse (gemmi fast path for P1
           CIFs) + full validation + safetensors/JSON encoding + dedup keys + chunk file write
build      the whole build in one process (`executor: inline`): scan, parse, validate, dedup,
           split, write shards, manifest

Usage: python benchmarks/raw_to_shard.py [--n 2000] [--repeat 3]
All numbers are single-core (one process); the Ray build spreads the task over workers.
"""
from __future__ import annotations

import argparse
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


def best_rate(fn, n: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="MP-20 rows (from val.csv.gz)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from pymatgen.core import Structure

    from data_pipeline.build import stages as build_module
    from data_pipeline.build.config import BuildConfig
    from data_pipeline.build.readers import open_reader

    tmp = Path(tempfile.mkdtemp(prefix="raw_to_shard_"))
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
        source = {"kind": "cdvae_csv", "path": str(subset), "options": {"source": "mp20"}, "name": "mp20"}
        build_module.parse_chunk(source, entries[:20], str(tmp / "warm"), "x")  # imports, JIT, caches
        for cif in cifs[:20]:
            pickle.dumps(Structure.from_str(cif, fmt="cif"))

        baseline = best_rate(lambda: [pickle.dumps(Structure.from_str(c, fmt="cif")) for c in cifs], n, args.repeat)
        from data_pipeline.shard_format import encode_record
        from data_pipeline.build.validate import validate

        parse_only = best_rate(lambda: [reader.parse(e) for e in entries], n, args.repeat)
        parse_validate = best_rate(lambda: [validate(reader.parse(e)) for e in entries], n, args.repeat)
        parse_validate_encode = best_rate(
            lambda: [(validate(r), encode_record(r)) for r in map(reader.parse, entries)], n, args.repeat)
        task = best_rate(lambda: build_module.parse_chunk(source, entries, str(tmp / "chunk"), "x"), n, args.repeat)

        def whole_build():
            out = tmp / "shards"
            shutil.rmtree(out, ignore_errors=True)
            config = BuildConfig.from_dict({"sources": [{"kind": "cdvae_csv", "path": str(subset), "name": "mp20"}],
                                            "out": str(out), "executor": "inline", "chunk_size": 256})
            build_module.build(config, progress=False, log=lambda _: None)

        whole = best_rate(whole_build, n, max(1, args.repeat - 1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} (numbers are per core, one process)")
    print(f"structures: {n} real MP-20 CIFs (val.csv.gz), best of {args.repeat}")
    print(f"{'contender':<58} {'structures/s':>13} {'vs baseline':>12}")
    print(f"{'baseline: pymatgen Structure.from_str + pickle.dumps':<58} {baseline:>13.0f} {1.0:>11.2f}x")
    print(f"{'  reader.parse only (gemmi P1 fast path)':<58} {parse_only:>13.0f} {parse_only / baseline:>11.2f}x")
    print(f"{'  parse + validate':<58} {parse_validate:>13.0f} {parse_validate / baseline:>11.2f}x")
    print(f"{'  parse + validate + encode (json + safetensors)':<58} {parse_validate_encode:>13.0f} {parse_validate_encode / baseline:>11.2f}x")
    print(f"{'build task: parse + validate + encode + dedup keys + write':<58} {task:>13.0f} {task / baseline:>11.2f}x")
    print(f"{'whole build inline: ... + dedup + split + shards + manifest':<58} {whole:>13.0f} {whole / baseline:>11.2f}x")


if __name__ == "__main__":
    main()
