"""Fine-tune throughput on real MP-20 crystals, per core, with baselines measured in the same run.

    1. training epoch (crystals/s) of each encoder, side by side: per-batch collation (PDD rows
       and neighbour lists computed in every batch) vs the view cache (`cache_views`: computed
       once per crystal before the first epoch) — the product's `fit`, mean of epochs 2..
    2. where an epoch's time goes (ms per crystal): PDD rows, neighbour search, collation from the
       cache, and the model step (forward + backward + AdamW) with edge features computed once
       per distinct edge length (the default) vs once per edge (the path before)
    3. first encoder only, from a real release: frozen probe, and prediction for a folder of CIF
       files vs reading, parsing and validating the same folder alone

    python benchmarks/finetune.py [--encoders pddformer,matformer_small,matformer] [--train 512]
                                  [--epochs 3] [--predict 256] [--threads 1]

Encoders: `pddformer` is the paper size (width 256, 4 layers, kNN 25 within 4 Å, PDD k = 92);
`matformer` the default (width 128, 5 layers, 4 heads, kNN 12 within 8 Å); `matformer_small`
width 64, 3 layers. Timings are wall-clock on whatever machine runs this; the machine and its
load average are printed first and last, because a shared machine slows every row.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file is named like the package it measures: run as a script, its own folder would come
# first on sys.path and `import finetune` would find this file. Put the repository root there.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


PRESETS = {
    "pddformer": {"name": "pddformer"},
    "matformer_small": {"name": "matformer", "width": 64, "num_layers": 3},
    "matformer": {"name": "matformer"},
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()} | {os.cpu_count()} CPUs ({cpu}) | torch {torch.__version__} | threads {torch.get_num_threads()}"


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def epoch_rates(data, encoder: dict, args) -> dict[bool, float]:
    """cache_views → training crystals/s of a scratch fine-tune (the product's fit), the mean over
    epochs 2.. (the first also pays one-off costs: allocator growth, first calls)."""
    from finetune.backbone import load_backbone
    from finetune.config import FinetuneConfig
    from finetune.train import fit

    out = {}
    for cache in (False, True):
        config = FinetuneConfig.from_dict({"task": data.task.name, "encoder": "scratch", "encoder_config": encoder,
                                           "epochs": args.epochs, "batch_size": args.batch_size, "cache_views": cache})
        result = fit(config, data, load_backbone("scratch", "scratch", encoder_config=encoder), progress=False)
        rates = [h["throughput/crystals_per_s"] for h in result.history]
        out[cache] = sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else rates[0]
    return out


def profile(records, encoder_config: dict, batch_size: int) -> dict[str, float]:
    """ms per crystal of each part of a training epoch over `records`."""
    from data_pipeline.load.collate import NeighborCache, collate, with_pdd
    from data_pipeline.load.neighbors import compute_neighbors
    from data_pipeline.record import pdd_features
    from finetune.backbone import views_for
    from pretrain.encoders.base import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(dict(encoder_config)).train()
    views = views_for(encoder)
    n = len(records)
    out = {}
    if views.pdd_k is not None:
        _, seconds = timed(lambda: [pdd_features(r, views.pdd_k) for r in records])
        out["PDD rows (amd)"] = seconds
        records = [with_pdd(r, views.pdd_k) for r in records]
    _, seconds = timed(lambda: [compute_neighbors(r.frac_coords, r.lattice, views.graph) for r in records])
    out["neighbour search"] = seconds
    cache = NeighborCache(views.graph, records)
    chunks = [records[i : i + batch_size] for i in range(0, n, batch_size)]
    table_batches, seconds = timed(lambda: [collate(c, views, neighbors=cache) for c in chunks])
    out["collation from the cache (+ length table)"] = seconds
    per_edge_views = replace(views, distinct_lengths=False)
    per_edge_batches = [collate(c, per_edge_views, neighbors=cache) for c in chunks]
    optimizer = torch.optim.AdamW(encoder.parameters())

    def steps(batches):
        for batch in batches:
            loss = encoder.readout(encoder(batch), batch).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    steps(table_batches[:1])  # warm-up (allocator)
    _, out["model step, edge features per distinct length"] = timed(lambda: steps(table_batches))
    _, out["model step, edge features per edge (before)"] = timed(lambda: steps(per_edge_batches))
    edges = sum(b.num_edges for b in table_batches)
    lengths = sum(b.edge_lengths.numel() for b in table_batches)
    out = {name: 1000.0 * seconds / n for name, seconds in out.items()}
    out["_edges_per_length"] = edges / lengths
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="pddformer,matformer_small,matformer",
                        help=f"comma-separated presets from {sorted(PRESETS)}")
    parser.add_argument("--train", type=int, default=512, help="MP-20 training crystals per epoch")
    parser.add_argument("--predict", type=int, default=256, help="CIF files in the prediction folder (0: skip)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fine-tune (rates: mean of epochs 2..)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-root")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: rates per core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.encoders.split(",")
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        parser.error(f"unknown encoder preset(s) {unknown}; choose from {sorted(PRESETS)}")

    from data_pipeline.load.loader import warm_pdd
    from finetune.data import TaskData, load_task_data
    from finetune.tasks import get_task

    print(f"machine: {machine()}")
    print(f"start: {load_average()}")
    print(f"{args.train} MP-20 training crystals, batch {args.batch_size}, {args.epochs} epochs; encoders {names}")
    task = get_task("mp20_formation_energy_per_atom")
    data, load_s = timed(lambda: load_task_data(task, root=args.data_root, max_train=args.train, max_eval=64, progress=False))
    data = TaskData(task, data.train, data.val[:64], data.test[:64], data.rejects, data.available)
    n = len(data.train)
    print(f"data: {n} train crystals parsed + validated in {load_s:.1f} s")
    warm_pdd(92)  # amd's JIT, once per process, outside every timing

    rates, profiles = {}, {}
    for name in names:
        rates[name] = epoch_rates(data, PRESETS[name], args)
        profiles[name] = profile(data.train, PRESETS[name], args.batch_size)

    print()
    print(f"| training epoch, crystals/s per core ({args.threads} thread) | per-batch PDD + neighbours | view cache | cache vs per-batch |")
    print("|---|---|---|---|")
    for name in names:
        before, after = rates[name][False], rates[name][True]
        print(f"| {name} {PRESETS[name]} | {before:.1f} | {after:.1f} | {after / before:.2f}x |")
    if "pddformer" in rates:
        rate = rates["pddformer"][True]
        print(f"aim: PDDFormer paper size >= 30 crystals/s per core: {rate:.1f} ({'met' if rate >= 30 else 'not met'})")

    print()
    parts = [k for k in profiles[names[0]] if not k.startswith("_")] + [
        k for name in names for k in profiles[name] if not k.startswith("_") and k not in profiles[names[0]]]
    print("| ms per crystal | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for part in dict.fromkeys(parts):
        print(f"| {part} | " + " | ".join(f"{profiles[name][part]:.2f}" if part in profiles[name] else "-" for name in names) + " |")
    print("| edges per distinct length (batches of %d) | " % args.batch_size
          + " | ".join(f"{profiles[name]['_edges_per_length']:.1f}" for name in names) + " |")
    for name in names:
        p = profiles[name]
        step, before = p["model step, edge features per distinct length"], p["model step, edge features per edge (before)"]
        print(f"{name}: model step {before / step:.2f}x faster with the length table")

    if args.predict:
        frozen_and_predict(data, PRESETS[names[0]], args)
    print(f"end: {load_average()}")


def frozen_and_predict(data, encoder: dict, args) -> None:
    from finetune.backbone import load_backbone
    from finetune.config import FinetuneConfig
    from finetune.model_dir import save_model_dir
    from finetune.predict import load_models, predict_paths
    from finetune.run import _model_meta
    from finetune.tasks import data_root
    from finetune.train import fit
    from pretrain.objectives import build_objective
    from pretrain.release import save_release

    task = data.task
    # A real release (randomly initialised VAE around the encoder): frozen mode needs one.
    release_tmp = tempfile.TemporaryDirectory()
    objective_config = {"name": "vae", "encoder": encoder}
    release = save_release(build_objective(objective_config), objective_config, Path(release_tmp.name) / "release")

    def run(mode: str):
        config = FinetuneConfig.from_dict({"task": task.name, "encoder": str(release), "mode": mode,
                                           "epochs": args.epochs, "batch_size": args.batch_size})
        return fit(config, data, load_backbone(str(release), mode), progress=False)

    full, frozen = run("full"), run("frozen")
    full_last = full.history[-1]["throughput/crystals_per_s"]
    frozen_first, frozen_last = (frozen.history[i]["throughput/crystals_per_s"] for i in (0, -1))
    print()
    print(f"| {encoder['name']} from a release, training epoch | crystals/s | vs full fine-tuning |")
    print("|---|---|---|")
    print(f"| full fine-tuning (epoch {args.epochs}) | {full_last:.1f} | 1.00x |")
    print(f"| frozen probe, first epoch (encoder runs once) | {frozen_first:.1f} | {frozen_first / full_last:.2f}x |")
    print(f"| frozen probe, later epochs (latents cached) | {frozen_last:.1f} | {frozen_last / full_last:.2f}x |")

    # prediction from a CIF folder
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cifs"
        folder.mkdir()
        root = data_root(args.data_root)
        with gzip.open(root / "mp_20" / "val.csv.gz", "rt") as handle:
            for i, row in enumerate(csv.DictReader(handle)):
                if i == args.predict:
                    break
                (folder / f"{row['material_id']}.cif").write_text(row["cif"])
        meta = _model_meta(FinetuneConfig.from_dict({"task": task.name, "encoder": str(release)}),
                           task, load_backbone(str(release), "full"), full, data)
        model_dir = save_model_dir(full.model, Path(tmp) / "model", meta)
        models = load_models(str(model_dir))
        predict_paths(models, [folder], batch_size=args.batch_size)  # warm-up (JIT of amd, allocator)
        table, predict_s = timed(lambda: predict_paths(models, [folder], batch_size=args.batch_size))
        from data_pipeline.build.validate import validate
        from finetune.structures import iter_structure_entries

        def read_only():
            count = 0
            for reader, entry in iter_structure_entries([folder]):
                validate(reader.parse(entry))
                count += 1
            return count

        count, read_s = timed(read_only)
    predict_rate, read_rate = len(table.rows) / predict_s, count / read_s
    print()
    print("| prediction, folder of CIFs | crystals/s | vs reading alone |")
    print("|---|---|---|")
    print(f"| read + parse + validate only | {read_rate:.1f} | 1.00x |")
    print(f"| crystalfm finetune predict (read + collate + model) | {predict_rate:.1f} | {predict_rate / read_rate:.2f}x |")
    print(f"({len(table.rows)} predicted, {len(table.errors)} errors)")


if __name__ == "__main__":
    main()
