"""Controls for the MP-20 study (docs/mp20_study.md, third study): how much of a pretrained
encoder's gain comes from the *external labels* it saw, measured with the composition model.

The energy-aware pretraining learns from the formation energies of the other shared sources
(never MP-20). The composition baseline of the study sees only the task's own labels. The fair
control gives the composition model the same external labels:

    external only        Magpie + HGB trained on the pretraining shards' formation energies
                         (no MP-20 label), scored on the task's whole test half
    external + task 10%  the same plus the task's 185 seeded training labels (seeds 0, 1, 2)
    task 10%             the study's baseline (the same seeded 185), for reference

and, given a release with a property head, the stacked model a practitioner would also try:

    zero-shot head       the release's pretraining head alone (no MP-20 label)
    hybrid               Magpie features + the zero-shot head's prediction → HGB on the 185

    python scripts/external_label_controls.py runs/mp20_study/shards [--release DIR] [--out CSV]
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.load.shard_records import iter_records  # noqa: E402
from finetune.baseline import MagpieFeatures, fit_magpie_hgb  # noqa: E402
from finetune.data import load_task_data  # noqa: E402
from finetune.tasks import get_task  # noqa: E402

TASK = "mp20_formation_energy_per_atom"
LABEL = "formation_energy_per_atom"


def zero_shot(release: str, records) -> np.ndarray:
    import torch

    from data_pipeline.load.collate import BatchViews, collate
    from pretrain.objectives.config import encoder_views
    from pretrain.release import load_pretrained

    torch.set_num_threads(1)
    objective = load_pretrained(release).eval()
    views = BatchViews.from_dict(encoder_views(objective.encoder))
    out = []
    with torch.no_grad():
        for i in range(0, len(records), 128):
            batch = collate(records[i:i + 128], views)
            embedding = objective.encoder.readout(objective.encoder(batch), batch, "mean")
            out.append(objective.property_head.mlp(embedding).squeeze(-1).numpy() * objective.property_head.config.scale)
    return np.concatenate(out)


def mae(y, p) -> float:
    return float(np.abs(np.asarray(y) - np.asarray(p)).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards")
    parser.add_argument("--release", help="a release with a formation-energy property head")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--out", default="docs/mp20_study/session3/controls.csv")
    args = parser.parse_args(argv)

    external = [r for r in iter_records(args.shards, ("train", "val")) if r.formation_energy_per_atom is not None
                and math.isfinite(r.formation_energy_per_atom)]
    by_source = {}
    for r in external:
        by_source[r.source] = by_source.get(r.source, 0) + 1
    print(f"external labelled crystals: {len(external)} {by_source}", flush=True)
    features = MagpieFeatures(Path(args.shards).parent / "baseline_cache" / "external" / "magpie.npz")
    ext_x, ext_y = features.matrix(external), np.array([r.formation_energy_per_atom for r in external])

    task = get_task(TASK)
    rows = []
    full = load_task_data(task, fraction=1.0, seed=0, progress=False)
    val_x, val_y = features.matrix(full.val), np.array(full.targets("val"))
    test_x, test_y = features.matrix(full.test), np.array(full.targets("test"))
    model = fit_magpie_hgb(ext_x, ext_y, val_x, val_y, seed=0)
    rows.append({"model": "magpie-hgb, external labels only", "seed": 0, "train": len(ext_y), "test_mae": mae(test_y, model.predict(test_x))})
    print(rows[-1], flush=True)
    if args.release:
        test_zero, val_zero = zero_shot(args.release, full.test), zero_shot(args.release, full.val)
        rows.append({"model": "pretraining head, zero-shot", "seed": 0, "train": 0, "test_mae": mae(test_y, test_zero)})
        print(rows[-1], flush=True)
    for seed in args.seeds:
        data = load_task_data(task, fraction=args.fraction, seed=seed, progress=False)
        tr_x, tr_y = features.matrix(data.train), np.array(data.targets("train"))
        own = fit_magpie_hgb(tr_x, tr_y, val_x, val_y, seed=seed)
        rows.append({"model": f"magpie-hgb, task {args.fraction:g}", "seed": seed, "train": len(tr_y), "test_mae": mae(test_y, own.predict(test_x))})
        both = fit_magpie_hgb(np.vstack([ext_x, tr_x]), np.concatenate([ext_y, tr_y]), val_x, val_y, seed=seed)
        rows.append({"model": f"magpie-hgb, external + task {args.fraction:g}", "seed": seed, "train": len(tr_y) + len(ext_y),
                     "test_mae": mae(test_y, both.predict(test_x))})
        if args.release:
            tr_zero = zero_shot(args.release, data.train)
            hybrid = fit_magpie_hgb(np.column_stack([tr_x, tr_zero]), tr_y, np.column_stack([val_x, val_zero]), val_y, seed=seed)
            rows.append({"model": f"hybrid: magpie + zero-shot head, task {args.fraction:g}", "seed": seed, "train": len(tr_y),
                         "test_mae": mae(test_y, hybrid.predict(np.column_stack([test_x, test_zero])))})
        for row in rows[-3:]:
            print(row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "seed", "train", "test_mae"])
        writer.writeheader()
        writer.writerows(rows)
    print("\nmodel | test MAE (mean ± std over seeds)")
    for name in dict.fromkeys(r["model"] for r in rows):
        values = [r["test_mae"] for r in rows if r["model"] == name]
        print(f"{name} | {np.mean(values):.4f} ± {np.std(values):.4f} (n={len(values)})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
