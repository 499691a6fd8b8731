"""Peak memory of the MPtrj reader's scan on a 1x and a 20x copy of the MPtrj-layout sample.

The 20x file repeats every material 20 times under renamed ids (`mp-1234` → `mp-1234-r07`), so
it has the real layout and 20x the bytes. Each scan runs in a fresh subprocess that reports its
peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and, as the baseline, a subprocess that
only imports the reader. A streaming reader's peak must not grow with the file: the ratio
(20x peak - baseline) / (1x peak - baseline) should be ~1 (up to the read buffer, ~2 MB, which the
1.5 MB sample does not fill: a 5x file shows the plateau), while `json.load` grows ~20x.

    python benchmarks/mptrj_memory.py [--copies 20] [--parse] [--whole-file-baseline]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("CRYSTALFM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "derived_layouts" / "mptrj" / "MPtrj_sample.json"

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from data_pipeline.build.readers import open_reader
mode, path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
frames = 0
if mode == "scan":
    reader = open_reader("mptrj", path)
    for entry in reader.scan():
        frames += 1
        if {parse}:
            reader.parse(entry)
elif mode == "json_load":
    frames = sum(len(v) for v in json.load(open(path)).values())
seconds = time.perf_counter() - start
print(json.dumps({{"frames": frames, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": seconds}}))
"""


def make_repeated(sample: Path, copies: int, out: Path) -> None:
    """Write `copies` renamed repetitions of every material, streaming material by material."""
    materials = json.loads(sample.read_text())  # the 1.5 MB sample itself is small
    with open(out, "w") as handle:
        handle.write("{")
        first = True
        for copy in range(copies):
            for mp_id, frames in materials.items():
                new_id = mp_id if copy == 0 else f"{mp_id}-r{copy:02d}"
                renamed = {f"{new_id}{fid[len(mp_id):]}" if fid.startswith(mp_id) else fid: frame
                           for fid, frame in frames.items()}
                handle.write(("" if first else ", ") + json.dumps(new_id) + ": " + json.dumps(renamed))
                first = False
        handle.write("}")


def measure(mode: str, path: Path, parse: bool) -> dict:
    code = CHILD.format(root=str(ROOT), parse=parse)
    out = subprocess.run([sys.executable, "-c", code, mode, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--middle", type=int, default=5, help="an intermediate size, to show the plateau")
    parser.add_argument("--parse", action="store_true", help="also parse every frame into a record")
    parser.add_argument("--whole-file-baseline", action="store_true", help="also measure json.load of each file")
    args = parser.parse_args(argv)
    if not SAMPLE.is_file():
        sys.exit(f"MPtrj sample not found at {SAMPLE}; set CRYSTALFM_SHARED_DATA")

    with tempfile.TemporaryDirectory() as tmp:
        middle = Path(tmp) / f"MPtrj_x{args.middle}.json"
        big = Path(tmp) / f"MPtrj_x{args.copies}.json"
        t = time.perf_counter()
        make_repeated(SAMPLE, args.middle, middle)
        make_repeated(SAMPLE, args.copies, big)
        print(f"built {big.name}: {big.stat().st_size / 1e6:.1f} MB and {middle.name}: {middle.stat().st_size / 1e6:.1f} MB"
              f" in {time.perf_counter() - t:.1f} s (1x: {SAMPLE.stat().st_size / 1e6:.1f} MB)")
        baseline = measure("imports", SAMPLE, False)["peak_rss_mb"]
        rows = [("imports only (baseline)", None, baseline, 0.0)]
        small = measure("scan", SAMPLE, args.parse)
        mid = measure("scan", middle, args.parse)
        large = measure("scan", big, args.parse)
        rows += [("scan 1x", small["frames"], small["peak_rss_mb"], small["seconds"]),
                 (f"scan {args.middle}x", mid["frames"], mid["peak_rss_mb"], mid["seconds"]),
                 (f"scan {args.copies}x", large["frames"], large["peak_rss_mb"], large["seconds"])]
        if args.whole_file_baseline:
            for label, path in (("json.load 1x", SAMPLE), (f"json.load {args.copies}x", big)):
                result = measure("json_load", path, False)
                rows.append((label, result["frames"], result["peak_rss_mb"], result["seconds"]))

    what = "scan+parse" if args.parse else "scan"
    print(f"\n| run ({what}) | frames | peak RSS (MB) | above baseline (MB) | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, frames, peak, seconds in rows:
        print(f"| {label} | {frames if frames is not None else '-'} | {peak:.1f} | {peak - baseline:.1f} | {seconds:.2f} |")
    growth = (large["peak_rss_mb"] - baseline) / max(small["peak_rss_mb"] - baseline, 1e-9)
    plateau = (large["peak_rss_mb"] - baseline) / max(mid["peak_rss_mb"] - baseline, 1e-9)
    print(f"\nreader memory above baseline, {args.copies}x file vs 1x file: {growth:.2f}x "
          f"(file is {args.copies}x larger; flat = ~1x); {args.copies}x vs {args.middle}x: {plateau:.2f}x "
          f"(the 1x file is smaller than the reader's ~2 MB read buffer, so 1x sits below the plateau)")
    print(f"throughput: {large['frames'] / large['seconds']:.0f} frames/s, "
          f"{args.copies * SAMPLE.stat().st_size / 1e6 / large['seconds']:.1f} MB/s")


if __name__ == "__main__":
    main()
