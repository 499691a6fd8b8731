"""`crystalfm pretrain` subcommands (also `python -m pretrain ...`, which launchers run on each rank).

    crystalfm pretrain train CONFIG [key.sub=value ...]     train (resumes from `latest` when there is one)
    crystalfm pretrain config CONFIG [key.sub=value ...]    print the full resolved config and exit
    crystalfm pretrain release CHECKPOINT --out DIR         consolidate ZeRO shards → a released model
    crystalfm pretrain evaluate ...                         (pretrain.evaluate, when installed)
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crystalfm pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an objective with DeepSpeed (single process or under a launcher)")
    train.add_argument("config", help="job YAML (see configs/pretrain_*.yaml)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    train.add_argument("--verbose", action="store_true",
                       help="print the full config (always written to <run dir>/config.yaml and logged to MLflow) "
                            "and DeepSpeed's / MLflow's own logs")

    show = sub.add_parser("config", help="print the resolved config (YAML + overrides) and exit")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")

    release = sub.add_parser("release", help="consolidate a checkpoint into a released model directory")
    release.add_argument("checkpoint", help="<run>/checkpoints (uses latest) or one step_* folder")
    release.add_argument("--out", required=True, help="release directory to write")
    release.add_argument("--registry-name", default=None,
                         help="MLflow registered-model name (default: tracking.registry_name or crystalfm-<objective>)")
    release.add_argument("--alias", default="current", help="MLflow model-registry alias to point at this version (MLflow reserves \"latest\")")
    release.add_argument("--no-register", action="store_true", help="do not register in the MLflow model registry")
    release.add_argument("--tracking-uri", default=None, help="MLflow store (default: the one the run used)")
    release.add_argument("--verbose", action="store_true", help="show DeepSpeed's ZeRO consolidation output")

    try:  # evaluation belongs to the objectives; absent until that module lands
        from pretrain.evaluate import add_evaluate_parser
    except ImportError:
        add_evaluate_parser = None
    if add_evaluate_parser is not None:
        add_evaluate_parser(sub)
    else:
        sub.add_parser("evaluate", help="(not available: pretrain.evaluate is not installed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]  # DeepSpeed's launcher may append it
    args = build_parser().parse_args(argv)
    from crystalfm_common.console import quiet_third_party

    quiet_third_party(getattr(args, "verbose", False))
    if args.command in ("train", "config"):
        from pretrain.config import ConfigError, load_config

        try:
            config = load_config(args.config, args.overrides)
        except ConfigError as exc:
            print(f"crystalfm pretrain: {exc}", file=sys.stderr)
            return 2
        if args.command == "config":
            print(config.to_yaml(), end="")
            return 0
        from pretrain.trainer import train

        summary = train(config, verbose=args.verbose)
        return 0 if summary["status"] in ("finished", "preempted") else 1
    if args.command == "release":
        from pretrain.release import release_checkpoint

        try:
            out = release_checkpoint(args.checkpoint, args.out, register=not args.no_register,
                                     registry_name=args.registry_name, alias=args.alias, tracking_uri=args.tracking_uri,
                                     verbose=args.verbose)
        except (FileNotFoundError, ValueError) as exc:
            print(f"crystalfm pretrain release: {exc}", file=sys.stderr)
            return 2
        registered = "" if args.no_register else f"; MLflow model alias @{args.alias}"
        print(f"crystalfm pretrain release: {args.checkpoint} → {out} (model card: {out / 'MODEL_CARD.md'}{registered})")
        return 0
    if args.command == "evaluate":
        try:
            from pretrain.evaluate import run_evaluate
        except ImportError:
            print("crystalfm pretrain evaluate: pretrain.evaluate is not installed in this version", file=sys.stderr)
            return 2
        return int(run_evaluate(args) or 0)
    return 2
