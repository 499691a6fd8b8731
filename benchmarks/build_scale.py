"""The data build against record count (#15 item 5): is the cost per record flat from 10k to 1M?

Usage:
  python benchmarks/build_scale.py --records 10000,100000,1000000 [--workers 2] [--work runs/build_scale]
         [--compare-scan 100000] [--no-strace] [--plot docs/build_scale.png]

Synthetic sources are made from the shared crystals by perturbing and relabelling them, in real
raw layouts (read through the real readers):
  * 70 % MPtrj-style frames in one plain JSON: materials made from the 40 materials of the MPtrj
    sample (all their frames, ~19 per material), each with its own lattice scale and position
    noise, relabelled `mp-s<k>`: many frames per material, many materials per formula;
  * 29.5 % GNoME-style: a summary CSV and a `by_id.zip` of CIFs made from the 1,000 shared GNoME
    CIFs with rescaled cells (hundreds of polymorph-like copies per formula at 1M);
  * 0.5 % `structure_files` zip deduplicated `structural`: families of 20 strained copies of one
    Perov-5 crystal (some match each other, most do not): the structural-matching path at a fixed
    share, so a matched formula bucket is in every run.
MPtrj and GNoME are deduplicated `exact` (structural dedup of a million records costs hours of
StructureMatcher on 2 cores; docs/scaling.md).

Each build runs in a child process (local Ray, `--workers` CPUs), optionally under `strace -f`
(every process, Ray workers included) to count the files opened under the benchmark folder. Per
size it reports: wall seconds per record, driver CPU seconds per record (what limits how many
workers one driver can feed), driver peak RSS above its start, files opened per record (sources,
work files, shards), and the loader's start-up per rank over the finished shards (index files,
mmapped). `--compare-scan N` also builds size N with `plan_sources: false` (the driver reads every
entry, the previous behaviour) to show what planned reading moves off the driver.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHARES = {"mptrj": 0.70, "gnome": 0.295, "polymorphs": 0.005}
FAMILY = 20  # strained copies per polymorph family (one formula bucket each)


# ------------------------------------------------------------------------------ synthetic sources
def _mptrj_base() -> dict:
    path = SHARED / "derived_layouts" / "mptrj" / "MPtrj_sample.json.gz"
    if not path.exists():
        path = ROOT / "data_pipeline" / "sample" / "mptrj" / "MPtrj_sample.json.gz"
    return json.loads(gzip.decompress(path.read_bytes()))


def write_mptrj(path: Path, frames_wanted: int, rng: np.random.Generator) -> int:
    base = list(_mptrj_base().values())
    written, k = 0, 0
    with open(path, "w") as out:
        out.write("{")
        while written < frames_wanted:
            material = base[k % len(base)]
            scale = 0.97 + 0.06 * rng.random()
            mp_id = f"mp-s{k}"
            frames = {}
            for j, frame in enumerate(material.values()):
                if written + len(frames) >= frames_wanted:
                    break
                structure = dict(frame["structure"])
                matrix = (np.asarray(structure["lattice"]["matrix"]) * scale)
                structure["lattice"] = {**structure["lattice"], "matrix": matrix.tolist()}
                sites = []
                for site in structure["sites"]:
                    abc = (np.asarray(site["abc"]) + rng.normal(0.0, 0.002, 3)) % 1.0
                    sites.append({**site, "abc": abc.tolist(), "xyz": (abc @ matrix).tolist()})
                structure["sites"] = sites
                frames[f"{mp_id}-{j}"] = {**frame, "structure": structure, "mp_id": mp_id}
            out.write(("," if k else "") + json.dumps(mp_id) + ":" + json.dumps(frames))
            written += len(frames)
            k += 1
        out.write("}")
    return written


def _gnome_base() -> tuple[list[str], list[list[str]], dict[str, str]]:
    folder = SHARED / "derived_layouts" / "gnome"
    lines = (folder / "stable_materials_summary.csv").read_text().splitlines()
    import csv

    rows = list(csv.reader(lines))
    with zipfile.ZipFile(folder / "by_id.zip") as archive:
        cifs = {Path(n).stem: archive.read(n).decode() for n in archive.namelist() if n.lower().endswith(".cif")}
    return rows[0], rows[1:], cifs


def _rescaled_cif(text: str, factors: tuple[float, float, float], new_id: str) -> str:
    out = []
    for line in text.splitlines():
        for axis, name in enumerate(("_cell_length_a", "_cell_length_b", "_cell_length_c")):
            if line.startswith(name):
                line = f"{name}   {float(line.split()[1]) * factors[axis]:.6f}"
        if line.startswith("data_"):
            line = f"data_{new_id}"
        out.append(line)
    return "\n".join(out) + "\n"


def write_gnome(folder: Path, count: int, rng: np.random.Generator) -> int:
    import csv

    header, rows, cifs = _gnome_base()
    id_at = [h.replace(" ", "").lower() for h in header].index("materialid")
    rows = [r for r in rows if r[id_at] in cifs]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stable_materials_summary.csv", "w", newline="") as handle, \
            zipfile.ZipFile(folder / "by_id.zip", "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        writer = csv.writer(handle)
        writer.writerow(header)
        for k in range(count):
            row = list(rows[k % len(rows)])
            base_id, new_id = row[id_at], f"s{k:09d}"
            scale = 0.98 + 0.04 * rng.random()
            archive.writestr(f"by_id/{new_id}.CIF", _rescaled_cif(cifs[base_id], (scale,) * 3, new_id))
            row[id_at] = new_id
            writer.writerow(row)
    return count


def _perov_cifs() -> list[str]:
    import csv

    with open(SHARED / "perov_5" / "val.csv", newline="") as handle:
        return [row["cif"] for row in csv.DictReader(handle)]


def write_polymorphs(path: Path, count: int, rng: np.random.Generator) -> int:
    """Families of FAMILY strained copies of one Perov-5 crystal (formulas the MPtrj and GNoME
    copies do not have, so each family is its own matched bucket at every size)."""
    cifs = _perov_cifs()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for k in range(count):
            family, member = divmod(k, FAMILY)
            factors = tuple(1.0 + (0.0 if member == 0 else rng.uniform(-0.12, 0.25)) for _ in range(3))
            archive.writestr(f"p{family:06d}/{family:06d}-{member:02d}.cif",
                             _rescaled_cif(cifs[family % len(cifs)], factors, f"p{k}"))
    return count


def make_sources(records: int, folder: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    counts = {
        "mptrj": write_mptrj(folder / "mptrj.json", round(records * SHARES["mptrj"]), rng),
        "gnome": write_gnome(folder / "gnome", round(records * SHARES["gnome"]), rng),
        "polymorphs": write_polymorphs(folder / "polymorphs.zip", max(FAMILY, round(records * SHARES["polymorphs"])), rng),
    }
    (folder / "counts.json").write_text(json.dumps(counts))
    print(f"  sources for {records}: {counts} in {time.perf_counter() - start:.0f} s", flush=True)
    return counts


def build_config(src: Path, out: Path, workers: int, plan: bool) -> dict:
    return {
        "sources": [
            {"kind": "mptrj", "path": str(src / "mptrj.json"), "name": "mptrj", "dedup": "exact"},
            {"kind": "gnome", "path": str(src / "gnome"), "name": "gnome", "dedup": "exact"},
            {"kind": "structure_files", "path": str(src / "polymorphs.zip"), "name": "polymorphs", "dedup": "structural"},
        ],
        "out": str(out), "num_workers": workers, "plan_sources": plan,
    }


# ------------------------------------------------------------------------------------- child
def child(config_path: str, result_path: str) -> None:
    """One build in this process as the Ray driver, stages timed, then the loader's start-up."""
    import ray

    import data_pipeline.build.stages as stages
    from data_pipeline.build.config import BuildConfig

    config = BuildConfig.from_dict(json.loads(Path(config_path).read_text()))
    ray.init(address="local", num_cpus=config.num_workers, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    timings: dict[str, float] = {}
    for name in ("parse_stage", "dedup_stage", "write_stage"):
        real = getattr(stages, name)

        def timed(*args, _real=real, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                timings[_name.removesuffix("_stage")] = time.perf_counter() - start

        setattr(stages, name, timed)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = stages.build(config, progress=False, log=lambda _: None)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ray.shutdown()

    from data_pipeline.load.shard_list import split_shards
    from data_pipeline.load.tar_index import _GlobalIndex

    paths = [p for split in result.manifest["splits"] for p in split_shards(result.out, split)]
    start = time.perf_counter()
    index = _GlobalIndex.build(paths, skip_corrupt=False, use_index_files=True)
    loader_s = time.perf_counter() - start
    counts = result.manifest["counts"]
    Path(result_path).write_text(json.dumps({
        "records_in": counts["records_in"], "written": counts["written"], "duplicates": counts["duplicates"],
        "rejects": counts["rejects"], "wall_s": wall, "driver_cpu_s": cpu, "stages_s": timings,
        "driver_rss_start_mb": rss_start / 1024, "driver_rss_peak_mb": rss_peak / 1024,
        "loader_start_s": loader_s, "loader_samples": len(index), "shards": len(paths),
        "load": os.getloadavg(),
    }))


def count_opens(trace: Path, folder: Path) -> dict:
    """openat calls (all processes) by where the path lies under the benchmark folder."""
    out = {"sources": 0, "work": 0, "shards": 0}
    prefix = str(folder.resolve())
    with open(trace, errors="replace") as handle:
        for line in handle:
            at = line.find('openat(AT_FDCWD, "')
            if at < 0 or "ENOENT" in line:
                continue
            path = line[at + 18 : line.index('"', at + 18)]
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix) + 1 :]
            kind = "sources" if rel.startswith("src/") else "work" if "/_work/" in rel else "shards"
            out[kind] += 1
    return out


def run_size(records: int, work: Path, workers: int, strace: bool, plan: bool = True, keep: bool = False) -> dict:
    folder = work / str(records)
    src = folder / "src"
    counts_file = src / "counts.json"
    if not counts_file.exists():
        shutil.rmtree(src, ignore_errors=True)
        make_sources(records, src)
    out = folder / ("shards" if plan else "shards-scanned")
    shutil.rmtree(out, ignore_errors=True)
    config = folder / ("config.json" if plan else "config-scanned.json")
    config.write_text(json.dumps(build_config(src, out, workers, plan)))
    result = folder / ("result.json" if plan else "result-scanned.json")
    command = [sys.executable, __file__, "--child", str(config), str(result)]
    trace = folder / "strace.txt"
    if strace:
        command = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=openat", "-o", str(trace), *command]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(command, check=True, env=env)
    row = json.loads(result.read_text())
    row["records"] = records
    row["plan_sources"] = plan
    if strace:
        row["opens"] = count_opens(trace, folder)
        trace.unlink()
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| records in | planned | wall s | wall ms/record | driver CPU µs/record | parse / dedup / write s | "
             "driver RSS peak − start MB | driver B/record | opens/record (src, work, shards) | shards | "
             "loader start s (samples) |", "|" + " ---: |" * 11]
    for r in rows:
        n = r["records_in"]
        growth = r["driver_rss_peak_mb"] - r["driver_rss_start_mb"]
        opens = r.get("opens")
        per = "—" if not opens else (f"{sum(opens.values()) / n:.3f} ({opens['sources'] / n:.3f}, {opens['work'] / n:.3f}, "
                                     f"{opens['shards'] / n:.4f})")
        s = r["stages_s"]
        lines.append(
            f"| {n} | {'yes' if r['plan_sources'] else 'no (driver scans)'} | {r['wall_s']:.0f} | {1e3 * r['wall_s'] / n:.3f} | "
            f"{1e6 * r['driver_cpu_s'] / n:.0f} | {s.get('parse', 0):.0f} / {s.get('dedup', 0):.0f} / {s.get('write', 0):.0f} | "
            f"{growth:.0f} | {growth * 2**20 / n:.0f} | {per} | {r['shards']} | {r['loader_start_s']:.2f} ({r['loader_samples']}) |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["plan_sources"]]
    n = np.array([r["records_in"] for r in rows], dtype=float)
    growth = np.array([(r["driver_rss_peak_mb"] - r["driver_rss_start_mb"]) * 2**20 for r in rows])
    panels = [
        ("wall ms / record", [1e3 * r["wall_s"] / r["records_in"] for r in rows]),
        ("driver CPU µs / record", [1e6 * r["driver_cpu_s"] / r["records_in"] for r in rows]),
        ("driver RSS growth, bytes / record", growth / n),
        ("files opened / record", [sum(r["opens"].values()) / r["records_in"] if r.get("opens") else np.nan for r in rows]),
        ("loader start-up per rank, s", [r["loader_start_s"] for r in rows]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 3.6))
    for ax, (title, values) in zip(axes, panels):
        ax.plot(n, np.asarray(values, dtype=float), "o-")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("records in")
    fig.suptitle("crystalfm data build against record count (benchmarks/build_scale.py; flat is the aim)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="10000,100000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "runs" / "build_scale"))
    parser.add_argument("--compare-scan", type=int, default=None, metavar="N")
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the shards (sources are always kept for reruns)")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--replot", action="store_true", help="only redraw --plot from WORK/results.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.replot:
        rows = json.loads((Path(args.work) / "results.json").read_text())
        print(table(rows))
        plot(rows, Path(args.plot))
        return
    strace = not args.no_strace and shutil.which("strace") is not None
    work = Path(args.work).resolve()  # absolute: strace records the paths as opened
    rows = []
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load {load[0]:.1f}; {args.workers} Ray worker CPUs; "
          f"strace {'on' if strace else 'off'}", flush=True)
    for records in (int(x) for x in args.records.split(",")):
        rows.append(run_size(records, work, args.workers, strace, keep=args.keep))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if args.compare_scan == records:
            rows.append(run_size(records, work, args.workers, strace, plan=False))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        (work / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    if args.plot:
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
