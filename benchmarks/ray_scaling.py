"""Ray scaling of the shard build: the same build with 1 worker and with 2 (or --workers N).

Each configuration runs in a fresh local Ray (`ray.init(address="local", num_cpus=k)`); the
timer covers the build only (Ray start-up excluded, worker start-up and imports included, since
a real build pays them too), best of --repeat. Input: MP-20 val.csv.gz (7,344 real crystals) by
default, exact dedup, 0.9/0.05/0.05 splits.

Usage: python benchmarks/ray_scaling.py [--workers 1 2] [--n 7344] [--repeat 2]
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CRYSTALFM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def one(workers: int, csv_path: str, out: str, repeat: int) -> float:
    """Run in a child process: start Ray with `workers` CPUs, time the build."""
    import ray

    from data_pipeline.build.stages import build
    from data_pipeline.build.config import BuildConfig

    ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level="ERROR")
    best = float("inf")
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        config = BuildConfig.from_dict({"sources": [{"kind": "cdvae_csv", "path": csv_path, "name": "mp20"}],
                                        "out": out, "num_workers": workers, "chunk_size": 256,
                                        "shard_bytes": 1 << 20})  # several shards: the write stage is parallel too
        start = time.perf_counter()
        build(config, progress=False, log=lambda _: None)
        best = min(best, time.perf_counter() - start)
    ray.shutdown()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n", type=int, default=7344)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("WORKERS", "CSV", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(one(int(args.child[0]), args.child[1], args.child[2], args.repeat))
        return

    tmp = Path(tempfile.mkdtemp(prefix="ray_scaling_"))
    try:
        with gzip.open(DATA / "mp_20" / "val.csv.gz", "rt", newline="") as src:
            rows = [row for _, row in zip(range(args.n + 1), csv.reader(src))]
        subset = tmp / "mp20.csv"
        with open(subset, "w", newline="") as dst:
            csv.writer(dst).writerows(rows)
        n = len(rows) - 1
        times = {}
        for workers in args.workers:
            result = subprocess.run(
                [sys.executable, __file__, "--repeat", str(args.repeat), "--child", str(workers), str(subset), str(tmp / f"out{workers}")],
                capture_output=True, text=True, check=True,
            )
            times[workers] = float(result.stdout.strip().splitlines()[-1])
        same = len({tuple(sorted((p.name, p.read_bytes()) for p in (tmp / f"out{w}").glob("*.tar"))) for w in args.workers}) == 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = times[args.workers[0]]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"input: {n} MP-20 crystals (cdvae_csv), exact dedup, chunk 256, 1 MiB shards; build time excludes ray.init")
    print(f"{'workers':>8} {'seconds':>9} {'crystals/s':>11} {'speed-up':>9}")
    for workers, seconds in times.items():
        print(f"{workers:>8} {seconds:>9.2f} {n / seconds:>11.0f} {base / seconds:>8.2f}x")
    print(f"shards byte-identical across worker counts: {same}")


if __name__ == "__main__":
    main()
