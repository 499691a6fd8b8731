"""The one console script. It only dispatches: each stage owns its subcommands in `<package>.cli`.

Stages are imported lazily so `crystalfm data ...` never imports torch models or DeepSpeed.
"""
from __future__ import annotations

import importlib
import sys

STAGES = {
    "data": ("data_pipeline.cli", "read raw crystals, validate, deduplicate, split, write shards; inspect them"),
    "pretrain": ("pretrain.cli", "train CrysLDNet (VAE, latent flow matching) or Crys-JEPA; evaluate; release"),
    "finetune": ("finetune.cli", "per-property heads on a released encoder; compare runs; predict from CIFs"),
    "discovery": ("discovery.cli", "generate crystals, evaluate V.S.U.N., screen with Crys-JEPA, refine"),
    "demo": ("crystalfm.demo", "run the whole chain on the embedded sample, on CPU, in minutes"),
}


def usage() -> str:
    lines = ["usage: crystalfm STAGE [args...]", "", "stages:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in STAGES.items()]
    lines += ["", "Run `crystalfm STAGE --help` for a stage's commands."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from crystalfm import __version__

        print(__version__)
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"crystalfm: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
