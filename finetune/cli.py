"""`crystalfm finetune` subcommands (also `python -m finetune ...`).

    tasks                               list the registered tasks (target, unit, data, split)
    train TASK --encoder DIR|scratch    one run: --mode full|frozen|scratch, --fraction, --seed, ...
    baseline TASK                       the composition baseline (Magpie + gradient boosting) and the
                                        training-mean predictor: --fractions × --seeds, tracked in MLflow
    sweep CONFIG                        tasks × encoders × modes × fractions × seeds (Ray or serial;
                                        --shard i/n or a SLURM array picks a share)
    compare [--task T ...]              the MLflow comparison table (CSV, Markdown, PNG)
    predict MODEL PATH...               properties with units for CIF/POSCAR files or folders
    export-split TASK --out-dir DIR     a task's test split as CIFs, to exclude from pretraining shards
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# CLI flag → FinetuneConfig field, for `train` (None: not given, the config/default stands).
_TRAIN_FLAGS = (
    "encoder", "mode", "probe", "readout", "head_init", "fraction", "seed", "epochs", "batch_size", "lr", "encoder_lr",
    "lr_grid", "lr_select", "lr_select_seed",
    "weight_decay", "patience", "max_train", "max_eval", "max_val", "num_workers", "device", "data_root", "out",
    "tracking_uri", "artifact_root", "target_name", "unit", "dropout",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crystalfm finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("tasks", help="list the registered tasks")

    train = sub.add_parser("train", help="fine-tune one head (and encoder copy) on one task")
    train.add_argument("task", help="a registered task (see `tasks`) or csv:PATH (structure file, value[, split])")
    train.add_argument("--config", help="YAML with FinetuneConfig fields; flags override it")
    train.add_argument("--encoder", help="release directory, or 'scratch'")
    train.add_argument("--encoder-config", help="architecture for --encoder scratch: an encoder name or JSON, "
                                                "e.g. '{\"name\": \"pddformer\", \"width\": 128}'")
    train.add_argument("--mode", choices=["full", "frozen", "scratch", "baseline"])
    train.add_argument("--probe", choices=["mlp", "linear"], help="head of a frozen encoder")
    train.add_argument("--readout", choices=["mean", "sum", "attention"])
    train.add_argument("--head-init", choices=["random", "property_head"],
                       help="property_head: start from the release's pretraining property head (same target)")
    train.add_argument("--fraction", type=float, help="fraction of training labels (0, 1]")
    train.add_argument("--seed", type=int)
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--encoder-lr", type=float)
    train.add_argument("--lr-grid", type=float, nargs="+", help="learning rates to choose from on validation MAE "
                                                                "(head and encoder together)")
    train.add_argument("--lr-select", choices=["first_seed", "per_run"])
    train.add_argument("--lr-select-seed", type=int, help="the seed that chooses (first_seed); default: this run's")
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--dropout", type=float)
    train.add_argument("--patience", type=int)
    train.add_argument("--max-train", type=int)
    train.add_argument("--max-eval", type=int, help="cap on validation and test crystals (default: whole splits)")
    train.add_argument("--max-val", type=int, help="cap on validation crystals only (default: --max-eval)")
    train.add_argument("--num-workers", type=int)
    train.add_argument("--device")
    train.add_argument("--target-name", help="csv tasks: name of the value column")
    train.add_argument("--unit", help="csv tasks: unit of the value column")
    train.add_argument("--save", help="also write the model directory here")
    train.add_argument("--verbose", action="store_true", help="print the full resolved config (it is always saved "
                       "with the run as config/config.yaml)")
    train.add_argument("--no-tracking", action="store_true", help="no MLflow; the model dir goes to OUT/models/...")
    _common(train)

    baseline = sub.add_parser("baseline", help="composition baseline (Magpie features + gradient boosting) on a task")
    baseline.add_argument("task", help="a registered task (see `tasks`) or csv:PATH")
    baseline.add_argument("--fractions", type=float, nargs="+", default=[1.0], help="label fractions (default 1.0)")
    baseline.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    baseline.add_argument("--max-train", type=int)
    baseline.add_argument("--max-eval", type=int, help="cap on validation and test crystals (default: whole splits)")
    baseline.add_argument("--max-val", type=int, help="cap on validation crystals only")
    baseline.add_argument("--target-name", help="csv tasks: name of the value column")
    baseline.add_argument("--unit", help="csv tasks: unit of the value column")
    baseline.add_argument("--no-mean", action="store_true", help="skip the training-mean predictor runs")
    _common(baseline)

    sweep = sub.add_parser("sweep", help="run a sweep config (see configs/finetune_*.yaml)")
    sweep.add_argument("config", help="YAML with SweepConfig fields")
    sweep.add_argument("--backend", choices=["ray", "serial"])
    sweep.add_argument("--encoders", nargs="+", metavar="DIR|scratch|baseline", help="replace the config's encoder list")
    sweep.add_argument("--rerun", action="store_true",
                       help="also redo runs that already finished in the store (default: skip them, so a sweep resumes)")
    sweep.add_argument("--shard", help="i/n: run every n-th run starting at i (default: the SLURM array position)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a train field for every run (YAML value), e.g. --set epochs=5")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    sweep.add_argument("--verbose", action="store_true", help="show MLflow's and Ray's own logs")
    _common(sweep)

    compare = sub.add_parser("compare", help="encoder × task × fraction table from MLflow")
    compare.add_argument("--task", action="append", help="only these tasks (repeatable)")
    compare.add_argument("--save-dir", help="where comparison.csv/.md/.png go (default OUT/comparison)")
    _common(compare, data=False)

    export = sub.add_parser("export-split", help="write a task's split as CIFs (to exclude it from pretraining)")
    export.add_argument("task")
    export.add_argument("--split", default="test", choices=["train", "val", "test"])
    export.add_argument("--out-dir", required=True)
    export.add_argument("--data-root")

    predict = sub.add_parser("predict", help="predict properties of CIF/POSCAR files")
    predict.add_argument("model", help="model dir, folder of model dirs, or models:/crystalfm-<task>@best")
    predict.add_argument("paths", nargs="+", help="CIF/POSCAR files, folders or archives")
    predict.add_argument("--csv", help="write CSV here ('-' for stdout) instead of a table")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--device", default="cpu")
    predict.add_argument("--tracking-uri")
    predict.add_argument("--strict", action="store_true", help="exit 1 when any file failed")
    return parser


def _common(parser, data: bool = True):
    parser.add_argument("--out", help="root of the local MLflow store and outputs (default finetune_runs)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///OUT/mlflow.db)")
    parser.add_argument("--artifact-root", help="where new experiments keep artifacts (default $CRYSTALFM_ARTIFACT_ROOT, "
                        "or mlartifacts/ beside a SQLite store)")
    if data:
        parser.add_argument("--data-root", help="shared data root (default $CRYSTALFM_SHARED_DATA or ../shared/data)")


def _encoder_config(text: str | None):
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    if text.endswith((".yaml", ".yml", ".json")) and Path(text).is_file():
        import yaml

        return yaml.safe_load(Path(text).read_text())
    return {"name": text}


def cmd_tasks(args) -> int:
    from finetune.tasks import available_tasks, get_task

    for name in available_tasks():
        task = get_task(name)
        rules = ", ".join(f"{s.path} ({s.split})" for s in task.sources)
        print(f"{name:<36} {task.target} [{task.unit or '-'}]  {rules}")
    print("csv:PATH                             your own (structure file, value[, split]) CSV")
    return 0


def cmd_train(args) -> int:
    from finetune.config import FinetuneConfig, load_yaml
    from finetune.run import run_finetune

    fields = load_yaml(args.config) if args.config else {}
    fields["task"] = args.task
    for name in _TRAIN_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if args.encoder_config is not None:
        fields["encoder_config"] = _encoder_config(args.encoder_config)
    config = FinetuneConfig.from_dict(fields)
    if config.mode == "baseline":  # `--encoder baseline`: the same as `crystalfm finetune baseline`
        from finetune.baseline import run_baseline

        run_baseline(config, tracking=not args.no_tracking)
        return 0
    run_finetune(config, tracking=not args.no_tracking, save_to=args.save, show_config=args.verbose)
    return 0


def cmd_baseline(args) -> int:
    from finetune.baseline import MAGPIE_HGB, MODELS, run_baseline_grid

    fields = {name: getattr(args, name) for name in ("max_train", "max_eval", "max_val", "target_name", "unit",
                                                      "data_root", "out", "tracking_uri", "artifact_root")
              if getattr(args, name, None) is not None}
    models = (MAGPIE_HGB,) if args.no_mean else MODELS
    run_baseline_grid(args.task, fractions=args.fractions, seeds=args.seeds, models=models, **fields)
    return 0


def cmd_sweep(args) -> int:
    import yaml

    from finetune.config import SweepConfig, load_yaml
    from finetune.sweep import expand, parse_shard, run_sweep, select_shard

    sweep = SweepConfig.from_dict(load_yaml(args.config))
    if args.backend:
        sweep.backend = args.backend
    if args.encoders:
        sweep.encoders = list(args.encoders)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip().replace("-", "_")] = yaml.safe_load(value)
    if args.data_root:
        overrides["data_root"] = args.data_root
    shard = parse_shard(args.shard)
    if args.dry_run:
        runs = expand(sweep, overrides)
        runs = select_shard(runs, *shard) if shard else runs
        for run in runs:
            lr = (f"  lr_grid={run.lr_grid} ({run.lr_select}, seed {run.selection_seed})"
                  if run.lr_grid and run.mode != "baseline" else "")
            print(f"{run.task}  {run.encoder}  {run.mode}  fraction={run.fraction:g}  seed={run.seed}{lr}")
        print(f"{len(runs)} runs")
        return 0
    summaries = run_sweep(sweep, out=args.out, tracking_uri=args.tracking_uri, shard=shard, overrides=overrides,
                          rerun=args.rerun)
    return 0 if all(s.ok for s in summaries) else 1


def cmd_compare(args) -> int:
    from finetune.compare import compare, to_markdown

    table, paths = compare(args.out or "finetune_runs", args.tracking_uri, args.task, args.save_dir)
    if table.empty:
        print("no finished fine-tune runs found; run `crystalfm finetune train ...` or `... sweep CONFIG` first")
        return 1
    print(to_markdown(table))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_predict(args) -> int:
    from finetune.predict import load_models, predict_paths

    models = load_models(args.model, args.tracking_uri, args.device)
    table = predict_paths(models, args.paths, batch_size=args.batch_size, device=args.device)
    for error in table.errors:
        print(f"error: {error['file']}: {error['reason']}", file=sys.stderr)
    if args.csv == "-":
        sys.stdout.write(table.to_csv_string())
    elif args.csv:
        with open(args.csv, "w", newline="") as handle:
            table.to_csv(handle)
        print(f"{len(table.rows)} predictions written to {args.csv}")
    else:
        print(table.to_text())
    if table.errors:
        print(f"{len(table.errors)} file(s) could not be predicted (see errors above)", file=sys.stderr)
    if not table.rows or (args.strict and table.errors):
        return 1
    return 0


def cmd_export_split(args) -> int:
    from finetune.data import export_split
    from finetune.tasks import get_task

    out = export_split(get_task(args.task), args.split, args.out_dir, root=args.data_root)
    count = len((out / "keys.txt").read_text().split())
    print(f"{count} {args.split} crystals of {args.task} written to {out}; exclude them from a shard build with\n"
          f"  exclude: [{{kind: structure_files, path: {out}, name: {args.task}_{args.split}}}]")
    return 0


COMMANDS = {"tasks": cmd_tasks, "export-split": cmd_export_split, "train": cmd_train, "baseline": cmd_baseline, "sweep": cmd_sweep, "compare": cmd_compare, "predict": cmd_predict}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from crystalfm_common.console import quiet_third_party

    quiet_third_party(getattr(args, "verbose", False))  # MLflow's table creation, Ray's start-up lines
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as error:
        print(f"crystalfm finetune {args.command}: error: {error}", file=sys.stderr)
        return 2
