"""Loader start-up per rank: reading the build's index files (`<shard>.idx.npy`, mmapped) against
scanning every tar header (what shard sets without index files need), on one shard set.

Usage: python benchmarks/loader_startup.py SHARD_DIR [--repeat 3]
(SHARD_DIR: a finished build, e.g. `crystalfm data build configs/data_shared_all.yaml`.)
Times are CPU seconds of this process (best of --repeat) for `_GlobalIndex.build` over every split:
what each rank pays before its first batch. The page cache is warm for both.
"""
from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shard_dir")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from data_pipeline.load.shard_list import split_shards
    from data_pipeline.load.tar_index import _GlobalIndex
    from data_pipeline.manifest import load_manifest

    paths = [p for split in load_manifest(args.shard_dir)["splits"] for p in split_shards(args.shard_dir, split)]
    results = {}
    for label, use_index in (("header scan (no index files)", False), ("index files (np.load mmap)", True)):
        best = float("inf")
        for _ in range(args.repeat):
            start = time.process_time()
            index = _GlobalIndex.build(paths, skip_corrupt=False, use_index_files=use_index)
            best = min(best, time.process_time() - start)
        results[label] = (best, len(index))
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
          f"CPU time, best of {args.repeat}")
    samples = next(iter(results.values()))[1]
    print(f"shard set: {args.shard_dir}: {len(paths)} shards, {samples} samples")
    scan = results["header scan (no index files)"][0]
    print(f"{'start-up per rank':<32} {'seconds':>9} {'µs/sample':>10} {'speed-up':>9}")
    for label, (seconds, _) in results.items():
        print(f"{label:<32} {seconds:>9.4f} {1e6 * seconds / samples:>10.2f} {scan / seconds:>8.1f}x")


if __name__ == "__main__":
    main()
