"""`crystalfm data inspect SHARDS`: a manifest summary, a few decoded records, and two PNGs.

atoms_per_crystal.png   histogram of atoms per crystal, one bar series per split
elements_heatmap.png    periodic-table heatmap of how many crystals contain each element (log scale)

Records are read in shard order with `shard_records.iter_records` (decoded with
`shard_format.decode_sample` (JSON + safetensors: nothing is unpickled).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.manifest import load_manifest, manifest_digest
from data_pipeline.record import CrystalRecord
from data_pipeline.load.shard_records import iter_records


def inspect_shards(shard_dir: str | Path, records: int = 3, split: str | None = None,
                   plots_dir: str | Path | None = None, out=print) -> dict:
    """Print the summary; write the PNGs to `plots_dir` (if given). Returns {name: png path}."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    for line in summary_lines(manifest, manifest_digest(shard_dir)):
        out(line)
    split = split or next((s for s, v in manifest["splits"].items() if v["shards"]), None)
    if split is not None and records > 0:
        out(f"\nfirst {records} record(s) of split {split!r}:")
        for record in iter_records(shard_dir, [split], limit=records):
            out("  " + describe_record(record))
    plots = {}
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        plots_dir.mkdir(parents=True, exist_ok=True)
        plots["atoms_per_crystal"] = plot_atoms_histogram(manifest, plots_dir / "atoms_per_crystal.png")
        plots["elements_heatmap"] = plot_element_heatmap(manifest, plots_dir / "elements_heatmap.png")
        out("\nplots: " + ", ".join(str(p) for p in plots.values()))
    return plots


# ---------------------------------------------------------------------------- text
def summary_lines(manifest: dict, digest: str) -> list[str]:
    counts = manifest["counts"]
    code = manifest.get("code_version", {})
    lines = [
        f"shard set: schema {manifest['schema_version']}, manifest sha256 {digest}",
        f"built by: crystalfm {code.get('package_version', '?')}"
        + (f" @ {code['git_commit'][:12]}{' (dirty)' if code.get('git_dirty') else ''}" if "git_commit" in code else ""),
        f"records in {counts['records_in']} = written {counts['written']} + rejects {counts['rejects']} "
        f"+ duplicates {counts['duplicates']} + excluded {counts['excluded']}",
    ]
    if counts.get("rejects_by_code"):
        lines.append("rejects by code: " + ", ".join(f"{k} {v}" for k, v in counts["rejects_by_code"].items()))
    if counts.get("dropped_by_how"):
        lines.append("dropped by: " + ", ".join(f"{k} {v}" for k, v in counts["dropped_by_how"].items()))
    lines.append("\nsources:")
    width = max([len(n) for n in manifest["sources"]] + [6])
    lines.append(f"  {'name':<{width}}  {'in':>8} {'rejects':>8} {'dups':>8} {'excluded':>8} {'written':>8}")
    for name, s in manifest["sources"].items():
        lines.append(f"  {name:<{width}}  {s['records_in']:>8} {s['rejects']:>8} {s['duplicates']:>8} {s['excluded']:>8} {s['written']:>8}")
    if manifest.get("exclude", {}).get("sources"):
        refs = manifest["exclude"]
        lines.append(f"excluded benchmark sets ({refs['match']} match, {refs['reference_structures']} structures): "
                     + ", ".join(refs["sources"]))
    lines.append("\nsplits:")
    for name, split in manifest["splits"].items():
        size = sum(s["bytes"] for s in split["shards"])
        lines.append(f"  {name:<8} {split['num_samples']:>8} samples {split['num_atoms']:>10} atoms "
                     f"{len(split['shards']):>5} shard(s) {size / 1e6:>9.2f} MB")
    stats = manifest["statistics"]["all"]
    if stats["labels"]:
        lines.append("\nlabels (all splits; units: " + ", ".join(f"{k} {manifest['units'][k]}" for k in stats["labels"] if k in manifest["units"]) + "):")
        lines.append(f"  {'label':<28} {'count':>9} {'mean':>11} {'std':>11} {'min':>11} {'max':>11}")
        for name, s in stats["labels"].items():
            if s["count"]:
                lines.append(f"  {name:<28} {s['count']:>9} {s['mean']:>11.4g} {s['std']:>11.4g} {s['min']:>11.4g} {s['max']:>11.4g}")
    hist = {int(k): v for k, v in stats["atoms_per_crystal"].items()}
    if hist:
        n = np.repeat(np.array(list(hist)), np.array(list(hist.values())))
        lines.append(f"\natoms per crystal: min {n.min()}, median {int(np.median(n))}, max {n.max()}; "
                     f"{len(stats['elements'])} elements")
    return lines


def describe_record(record: CrystalRecord) -> str:
    from data_pipeline.record import reduced_formula

    labels = ", ".join(f"{k}={v:.4g}" for k, v in record.labels().items())
    arrays = ", ".join(n for n in ("forces", "stress", "magmoms") if getattr(record, n) is not None)
    abc = np.linalg.norm(record.lattice, axis=1)
    return (f"{record.key} [{reduced_formula(record.atomic_numbers)}, {record.num_atoms} atoms, "
            f"a/b/c {abc[0]:.3f}/{abc[1]:.3f}/{abc[2]:.3f} Å, V {record.volume:.2f} Å³, group {record.group}]"
            + (f" {labels}" if labels else "") + (f" arrays: {arrays}" if arrays else ""))


# ---------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_atoms_histogram(manifest: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in manifest["splits"]:
        hist = {int(k): v for k, v in manifest["statistics"][name]["atoms_per_crystal"].items()}
        if hist:
            ax.bar(list(hist), list(hist.values()), width=0.9, alpha=0.6, label=f"{name} ({sum(hist.values())})")
    ax.set_xlabel("atoms per crystal")
    ax.set_ylabel("crystals")
    ax.set_title("Atoms per crystal")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def periodic_position(z: int) -> tuple[int, int]:
    """(row, column) of element Z in the 18-column periodic table; f-block on rows 8 and 9."""
    if z == 1:
        return 0, 0
    if z == 2:
        return 0, 17
    starts = [(3, 1), (11, 2), (19, 3), (37, 4), (55, 5), (87, 6)]
    for first, row in reversed(starts):
        if z >= first:
            break
    offset = z - first
    if row in (1, 2):  # s block then p block
        return row, offset if offset < 2 else offset + 10
    if row in (3, 4):
        return row, offset
    # periods 6 and 7: La–Lu and Ac–Lr go to the f-block rows 7 and 8 (columns 3..17)
    if offset < 2:
        return row, offset
    if offset < 17:
        return row + 2, offset + 1
    return row, offset - 14


def plot_element_heatmap(manifest: dict, path: Path) -> Path:
    from data_pipeline.record import element_symbol

    plt = _pyplot()
    from matplotlib.colors import LogNorm

    symbols = {element_symbol(z): z for z in range(1, 119)}
    counts = {symbols[s]: v["crystals"] for s, v in manifest["statistics"]["all"]["elements"].items() if s in symbols}
    grid = np.full((9, 18), np.nan)  # [rows, groups]
    for z in range(1, 104):
        r, c = periodic_position(z)
        grid[r, c] = counts.get(z, 0)
    fig, ax = plt.subplots(figsize=(12, 6))
    shown = np.where(grid > 0, grid, np.nan)
    vmax = max(2.0, float(np.nanmax(shown)) if np.isfinite(shown).any() else 2.0)
    image = ax.imshow(shown, cmap="viridis", norm=LogNorm(vmin=1, vmax=vmax))
    for z in range(1, 104):
        r, c = periodic_position(z)
        color = "white" if counts.get(z, 0) else "0.6"
        ax.text(c, r - 0.15, element_symbol(z), ha="center", va="center", fontsize=7, color=color if counts.get(z) else "0.5")
        if counts.get(z):
            ax.text(c, r + 0.25, str(counts[z]), ha="center", va="center", fontsize=5, color="white")
        else:
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="0.85", linewidth=0.5))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("Crystals containing each element (all splits)")
    fig.colorbar(image, ax=ax, fraction=0.025, label="crystals")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
