"""Fine-tune throughput on real MP-20 crystals, with baselines measured in the same run.

    1. training epoch (crystals/s): full fine-tuning vs a frozen-encoder probe (latents cached
       after its first epoch) vs collation alone (neighbour lists + PDD + tokens: the data cost
       every full-mode epoch pays)
    2. prediction (crystals/s) for a folder of CIF files with a saved model directory vs reading,
       parsing and validating the same folder alone (the part that is not the model)

    python benchmarks/finetune.py [--encoder pddformer] [--train 512] [--predict 512] [--epochs 2]

Encoder presets: the paper-size default of the named encoder, or `--width/--layers` to shrink it.
Timings are wall-clock on whatever machine runs this; the machine is printed first.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file is named like the package it measures: run as a script, its own folder would come
# first on sys.path and `import finetune` would find this file. Put the repository root there.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()} | {os.cpu_count()} CPUs ({cpu}) | torch {torch.__version__} | threads {torch.get_num_threads()}"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="pddformer", choices=["pddformer", "matformer", "jepa_transformer"])
    parser.add_argument("--width", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--train", type=int, default=512, help="MP-20 training crystals per epoch")
    parser.add_argument("--predict", type=int, default=512, help="CIF files in the prediction folder")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-root")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from data_pipeline.load.collate import collate
    from finetune.backbone import load_backbone, views_for
    from finetune.config import FinetuneConfig
    from finetune.data import TaskData, load_task_data
    from finetune.model_dir import save_model_dir
    from finetune.predict import load_models, predict_paths
    from finetune.run import _model_meta
    from finetune.tasks import data_root, get_task
    from finetune.train import fit

    encoder = {"name": args.encoder}
    if args.width:
        encoder["width"] = args.width
    if args.layers:
        encoder["num_layers"] = args.layers
    print(f"machine: {machine()}")
    print(f"encoder: {encoder}; {args.train} MP-20 training crystals, batch {args.batch_size}, {args.epochs} epochs")

    task = get_task("mp20_formation_energy_per_atom")
    data, load_s = timed(lambda: load_task_data(task, root=args.data_root, max_train=args.train, max_eval=64, progress=False))
    data = TaskData(task, data.train, data.val[:64], data.test[:64], data.rejects, data.available)
    n = len(data.train)
    print(f"data: {n} train crystals parsed + validated in {load_s:.1f} s")

    # A real release (randomly initialised VAE around the encoder): frozen mode needs one.
    from pretrain.objectives import build_objective
    from pretrain.release import save_release

    release_tmp = tempfile.TemporaryDirectory()
    objective_config = {"name": "vae", "encoder": encoder}
    release = save_release(build_objective(objective_config), objective_config, Path(release_tmp.name) / "release")

    def epoch_rate(mode: str) -> tuple[float, float, object]:
        config = FinetuneConfig.from_dict({"task": task.name, "encoder": str(release), "mode": mode,
                                           "epochs": args.epochs, "batch_size": args.batch_size})
        result = fit(config, data, load_backbone(str(release), mode), progress=False)
        rates = [h["train_crystals_per_s"] for h in result.history]
        return rates[0], rates[-1], result

    (full_first, full_last, full), full_s = timed(lambda: epoch_rate("full"))
    (frozen_first, frozen_last, _), _ = timed(lambda: epoch_rate("frozen"))
    views = views_for(full.model.encoder)
    batches = [data.train[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    _, collate_s = timed(lambda: [collate(b, views) for b in batches])
    collate_rate = n / collate_s
    print()
    print("| training epoch | crystals/s | vs full fine-tuning |")
    print("|---|---|---|")
    print(f"| full fine-tuning (epoch {args.epochs}) | {full_last:.1f} | 1.00x |")
    print(f"| frozen probe, first epoch (encoder runs once) | {frozen_first:.1f} | {frozen_first / full_last:.2f}x |")
    print(f"| frozen probe, later epochs (latents cached) | {frozen_last:.1f} | {frozen_last / full_last:.2f}x |")
    print(f"| collation alone (graph + PDD + tokens) | {collate_rate:.1f} | {collate_rate / full_last:.2f}x |")
    print(f"collation share of a full epoch: {100 * full_last / collate_rate:.0f}%")

    # ------------------------------------------------------------------ prediction from a CIF folder
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
