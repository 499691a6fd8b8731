"""Mean ± sample std over sampling runs of ddpm_quick_validity.py's JSON lines, one row per
(model, volume, sampling steps): a markdown table for docs/discovery_mp20.md.

    python scripts/validity_table.py runs/discovery_mp20/validity600.jsonl
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np


def main() -> None:
    groups = defaultdict(list)
    for path in sys.argv[1:]:
        for line in open(path):
            if line.strip():
                row = json.loads(line)
                groups[(row["model"], row.get("volume", "generated"), row["sample_steps"])].append(row)
    print("| model | volume | runs × n | struct. validity | comp. validity | both | median elements | median volume/atom (Å³) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (model, volume, _), rows in groups.items():
        def cell(key):
            values = np.array([r[key] for r in rows])
            return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
        elements = "–".join(sorted({f"{r['elements_median']:g}" for r in rows}))
        vpa = [r["volume_per_atom_median"] for r in rows]
        print(f"| {model} | {volume} | {len(rows)} × {rows[0]['n']} | {cell('struct_valid')} | {cell('comp_valid')} | "
              f"{cell('valid')} | {elements} | {min(vpa):.1f}–{max(vpa):.1f} |")


if __name__ == "__main__":
    main()
