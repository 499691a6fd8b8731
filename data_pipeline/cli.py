"""`crystalfm data` subcommands: `build` (raw files → shard set) and `inspect` (shard set → summary, plots)."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BUILD_EPILOG = """\
examples:
  crystalfm data build configs/data_mp20.yaml
  crystalfm data build --source cdvae_csv:../shared/data/mp_20/val.csv.gz:mp20 --out shards/mp20
  crystalfm data build --sample --out shards/demo          (the embedded demo sample)
  crystalfm data build configs/data_all.yaml --ray-address auto   (join a running Ray cluster)

Source kinds: cdvae_csv, mp_docs, gnome, mptrj, jarvis, structure_files (see data_pipeline/build/READERS.md).
A rerun of an interrupted build resumes; a rerun of a finished one reports it and does nothing.
A build that fails with an error removes what it created unless --keep-failed.
"""


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 200MB, 1GB, 65536)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def _fractions(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--splits {text!r}: expected NAME=FRACTION,... e.g. train=0.9,val=0.05,test=0.05")
        out[name.strip()] = float(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crystalfm data", description="Build and inspect crystal shard sets.")
    commands = parser.add_subparsers(dest="command", required=True)

    b = commands.add_parser(
        "build",
        help="read raw sources, validate, deduplicate, split, write webdataset shards + manifest.json",
        epilog=BUILD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("config", nargs="?", help="build config YAML (configs/data_*.yaml); flags below override it")
    b.add_argument("--source", action="append", default=[], metavar="KIND:PATH[:NAME]", help="add a source (repeatable)")
    b.add_argument("--exclude", action="append", default=[], metavar="KIND:PATH[:NAME]",
                   help="a benchmark test set whose structures must not appear in the shards (repeatable)")
    b.add_argument("--sample", action="store_true", help="build from the embedded demo sample (the default without config/--source)")
    b.add_argument("--dedup", choices=("none", "exact", "structural"), help="dedup mode for every --source given here")
    b.add_argument("--out", help="output directory (default: config's `out`, else ./shards)")
    b.add_argument("--ray-address", help="join a Ray cluster ('auto' or host:port); default starts Ray in-process")
    b.add_argument("--num-workers", type=int, help="parallel tasks (default: all CPUs Ray sees)")
    b.add_argument("--inline", action="store_true", help="run the stages in this process without Ray (debugging)")
    b.add_argument("--split-by", choices=("group", "reduced_formula"))
    b.add_argument("--splits", type=_fractions, metavar="train=0.9,val=0.05,test=0.05")
    b.add_argument("--seed", type=int)
    b.add_argument("--shard-bytes", type=_size, metavar="SIZE", help="target shard size, e.g. 128MB")
    b.add_argument("--chunk-size", type=int, help="raw entries per task / resumable work file")
    b.add_argument("--pdd-k", type=int, metavar="K",
                   help="store each crystal's PDD rows with K neighbours in its sample (PDDFormer: 92)")
    b.add_argument("--force", action="store_true", help="replace a finished or unfinished build of another config in --out")
    b.add_argument("--keep-work", action="store_true", help="keep the intermediate work dir (_work/) after success")
    b.add_argument("--keep-failed", action="store_true",
                   help="after an error keep what the build created (_work/, partial shards) to resume or inspect; "
                        "by default a failed build removes it (an interrupted one always keeps _work/)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--verbose", action="store_true", help="print the full config and the Ray workers' own output")

    i = commands.add_parser("inspect", help="summarise a shard set: manifest, a few records, histogram PNGs")
    i.add_argument("shards", help="shard directory (holding manifest.json)")
    i.add_argument("--records", type=int, default=3, help="records to print (default 3)")
    i.add_argument("--split", help="split to sample records from (default: the first)")
    i.add_argument("--plots", help="directory for the PNGs (default: SHARDS/inspect)")
    i.add_argument("--no-plots", action="store_true")
    return parser


def config_from_args(args):
    from data_pipeline.build.config import BuildConfig, SourceSpec

    config = BuildConfig.from_yaml(args.config) if args.config else BuildConfig()
    sources = list(config.sources)
    if args.source:
        sources += [SourceSpec.parse(text, dedup=args.dedup or "exact") for text in args.source]
    if args.sample or not sources:
        sources += [SourceSpec.from_dict(spec, "sample source") for spec in _sample_sources()]
    changes = {"sources": tuple(sources)}
    if args.exclude:
        changes["exclude"] = tuple(config.exclude) + tuple(SourceSpec.parse(t) for t in args.exclude)
    for flag, name in (("out", "out"), ("ray_address", "ray_address"), ("num_workers", "num_workers"),
                       ("split_by", "split_by"), ("splits", "splits"), ("seed", "seed"),
                       ("shard_bytes", "shard_bytes"), ("chunk_size", "chunk_size"), ("pdd_k", "pdd_k")):
        value = getattr(args, flag)
        if value is not None:
            changes[name] = value
    if args.inline:
        changes["executor"] = "inline"
    if args.force:
        changes["force"] = True
    if args.keep_work:
        changes["keep_work"] = True
    return config.replace(**changes)


def _sample_sources() -> list[dict]:
    from data_pipeline.build.stages import BuildError

    try:
        from data_pipeline.sample import sample_sources
    except ImportError as exc:
        raise BuildError(
            f"the embedded demo sample is not available in this install ({exc}); "
            "give a config file or --source KIND:PATH instead"
        ) from None
    try:
        return list(sample_sources())
    except FileNotFoundError as exc:
        raise BuildError(f"the embedded demo sample is incomplete: {exc}") from None


def check_sources(config) -> None:
    """Every source and exclude names a known reader kind and a path that exists."""
    from data_pipeline.build.config import ConfigError
    from data_pipeline.build.readers import available_readers

    known = available_readers()
    for spec in (*config.sources, *config.exclude):
        if spec.kind not in known:
            raise ConfigError(f"source {spec.kind}:{spec.path}: unknown kind {spec.kind!r}; known kinds: {', '.join(known)}")
        if not Path(spec.path).expanduser().exists():
            raise ConfigError(f"source {spec.kind}:{spec.path}: {spec.path} does not exist")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "build":
        from crystalfm_common.console import quiet_third_party
        from data_pipeline.build.stages import BuildError, build
        from data_pipeline.build.config import ConfigError

        quiet_third_party(args.verbose)
        try:
            config = config_from_args(args)
            check_sources(config)  # before Ray starts: a typo fails in a second, not after start-up
            progress = not args.no_progress and sys.stderr.isatty()  # bars on a terminal, not in job logs
            build(config, progress=progress, verbose=args.verbose, keep_failed=args.keep_failed)
        except (BuildError, ConfigError) as exc:
            sys.stdout.flush()
            print(f"\ncrystalfm data build: error: {exc}", file=sys.stderr)  # never glued onto a progress bar
            return 2
        return 0
    if args.command == "inspect":
        from data_pipeline.inspect_shards import inspect_shards
        from data_pipeline.manifest import ManifestError

        try:
            inspect_shards(args.shards, records=args.records, split=args.split,
                           plots_dir=None if args.no_plots else (args.plots or f"{args.shards.rstrip('/')}/inspect"))
        except ManifestError as exc:
            print(f"crystalfm data inspect: error: {exc}", file=sys.stderr)
            return 2
        return 0
    return 2
