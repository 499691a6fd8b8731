"""CIF → arrays throughput: the gemmi fast path (`data_pipeline.build.cif_fast`) vs pymatgen's CifParser.

Both parse the same real CIFs (MP-20 validation, MPTS-52, GNoME by_id) on one core in this
process; the ratio is structures/s of the fast path (with its pymatgen fallbacks counted in) over
pymatgen's. CPU time (time.process_time) is reported beside wall time, because wall time on a
shared machine includes other people's work.

    python benchmarks/cif_parse.py [--n 1000]
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CRYSTALFM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def load_cifs(n: int) -> dict[str, list[str]]:
    sets = {}
    for name, path in (("mp_20/val", DATA / "mp_20" / "val.csv.gz"), ("mpts_52/val", DATA / "mpts_52" / "val.csv.gz")):
        with gzip.open(path, "rt", newline="") as handle:
            sets[name] = [row["cif"] for _, row in zip(range(n), csv.DictReader(handle))]
    sets["gnome/by_id"] = [p.read_text() for p in sorted((DATA / "gnome" / "by_id").glob("*.CIF"))[:n]]
    return sets


def timed(fn, items) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for item in items:
        fn(item)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="CIFs per data set")
    args = parser.parse_args(argv)

    from data_pipeline.build.cif_fast import element_tables, parse_cif_pymatgen, parse_p1_cif
    from data_pipeline.build.readers._common import arrays_from_cif

    element_tables()  # one-time table build, as in a long-running worker
    sets = load_cifs(args.n)
    for texts in sets.values():  # warm both paths
        arrays_from_cif(texts[0]), parse_cif_pymatgen(texts[0])

    print("| CIFs | n | fast path served | fast (structures/s, CPU) | pymatgen (structures/s, CPU) | ratio (CPU) | ratio (wall) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    totals = [0, 0.0, 0.0, 0.0, 0.0]
    for name, texts in sets.items():
        served = sum(parse_p1_cif(t) is not None for t in texts)
        fast_wall, fast_cpu = timed(lambda t: arrays_from_cif(t, fast=True), texts)
        ref_wall, ref_cpu = timed(parse_cif_pymatgen, texts)
        n = len(texts)
        print(f"| {name} | {n} | {served / n:.1%} | {n / fast_cpu:,.0f} | {n / ref_cpu:,.0f} | "
              f"{ref_cpu / fast_cpu:.1f}x | {ref_wall / fast_wall:.1f}x |")
        for i, value in enumerate((n, fast_cpu, ref_cpu, fast_wall, ref_wall)):
            totals[i] += value
    n, fast_cpu, ref_cpu, fast_wall, ref_wall = totals
    print(f"| all | {n} | | {n / fast_cpu:,.0f} | {n / ref_cpu:,.0f} | {ref_cpu / fast_cpu:.1f}x | {ref_wall / fast_wall:.1f}x |")
    print(f"\ngemmi fast path vs pymatgen: {ref_cpu / fast_cpu:.1f}x structures/s (CPU time, one core)")


if __name__ == "__main__":
    main()
