"""`crystalfm demo`: the whole chain on the embedded sample, on CPU, in minutes.

    data build (Ray, in-process) → VAE (stage 1) → release → joint latent flow (stage 2, from the
    VAE release) → Crys-JEPA → releases → fine-tune (when the package is installed)

Each stage calls that stage's Python API with tiny models and a few steps: the point is to see
every part run and to know where its outputs are, not to train a useful model. It ends by
printing what was made and how to open the runs in the MLflow UI. A stage whose package is not
installed yet is reported and skipped, and the chain stops where it cannot go on.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

TINY_PDDFORMER = {"name": "pddformer", "width": 32, "num_layers": 1, "rbf_bins": 16, "pdd_k": 12,
                  "neighbor_rule": {"kind": "knn", "k": 8, "cutoff": 4.0}}
TINY_TOKENS = {"name": "jepa_transformer", "width": 32, "num_layers": 1, "heads": 2}


class StageUnavailable(RuntimeError):
    """A stage's package or module is not installed in this version."""


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


# ---------------------------------------------------------------------- stages
def build_shards(work: Path) -> Path:
    try:
        from data_pipeline.build.stages import build
        from data_pipeline.build.config import BuildConfig, SourceSpec
        from data_pipeline.sample import sample_sources
    except ImportError as exc:
        raise StageUnavailable(f"data build of the embedded sample is not available yet ({exc})") from None
    try:
        sources = sample_sources()
    except FileNotFoundError as exc:
        raise StageUnavailable(str(exc)) from None
    out = work / "shards"
    config = BuildConfig(sources=tuple(SourceSpec.from_dict(s, "sample source") for s in sources),
                         out=str(out), splits={"train": 0.9, "val": 0.1}, num_workers=2)
    build(config, progress=sys.stderr.isatty(), log=_say)
    return out


def pretrain(work: Path, shards: Path, name: str, objective: dict, steps: int) -> Path:
    from pretrain.config import load_config
    from pretrain.trainer import train

    config = load_config(None, [
        f"run.root={work / 'runs'}", f"run.name={name}", f"data.shards={shards}", "data.atom_budget=384",
        "optim.lr=1e-3", "schedule.warmup_steps=2", f"train.max_steps={steps}", "train.zero_stage=2",
        "train.log_every=5", f"checkpoint.every_steps={steps}", "checkpoint.keep_last=1",
        "tracking.experiment=crystalfm-demo",
    ])
    config.objective = objective
    summary = train(config)
    _say(f"{name}: {summary['status']} at step {summary['step']}, loss {summary['metrics'].get('loss', float('nan')):.4g}")
    return Path(summary["checkpoint_dir"])


def release(checkpoints: Path, out: Path) -> Path:
    from pretrain.release import release_checkpoint

    path = release_checkpoint(checkpoints, out, alias="demo")
    _say(f"released {out.name}: {path}")
    return path


def sample_property_csv(work: Path) -> Path:
    """The embedded sample's CDVAE-style CSV as a user fine-tune task: one CIF per crystal plus
    `formation_energy_per_atom.csv` (structure file, value), so the demo needs no downloaded data."""
    from data_pipeline.build.readers import Reject, open_reader
    from data_pipeline.sample import sample_sources

    source = next(s for s in sample_sources() if s["kind"] == "cdvae_csv")
    folder = work / "finetune_data"
    (folder / "cif").mkdir(parents=True, exist_ok=True)
    reader = open_reader("cdvae_csv", source["path"])
    rows = []
    for entry in reader.scan():
        if isinstance(entry, Reject):
            continue
        record = reader.parse(entry)
        if record.formation_energy_per_atom is None:
            continue
        name = record.key.split(":", 1)[-1] + ".cif"
        record.to_structure().to(filename=str(folder / "cif" / name))
        rows.append(f"cif/{name},{record.formation_energy_per_atom}")
    table = folder / "formation_energy_per_atom.csv"
    table.write_text("structure,formation_energy_per_atom\n" + "\n".join(rows) + "\n")
    return table


def finetune(work: Path, encoder: Path) -> Path:
    try:
        from finetune.cli import main as finetune_main
    except ImportError as exc:
        raise StageUnavailable(f"fine-tuning is not installed yet ({exc})") from None
    out = work / "finetune"
    table = sample_property_csv(work)
    # A frozen-encoder MLP probe of formation energy on the embedded sample (a user-CSV task).
    argv = ["train", f"csv:{table}", "--unit", "eV/atom", "--encoder", str(encoder), "--mode", "frozen",
            "--epochs", "5", "--save", str(out), "--tracking-uri", f"sqlite:///{work / 'runs' / 'mlflow.db'}"]
    try:
        code = finetune_main(argv)
    except SystemExit as exc:  # argparse: the fine-tune CLI changed
        code = exc.code
    if code:
        raise StageUnavailable(f"`crystalfm finetune {' '.join(argv)}` exited with {code}")
    return out


# ---------------------------------------------------------------------- the chain
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crystalfm demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="crystalfm-demo", help="working directory (default ./crystalfm-demo)")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per pretraining stage")
    parser.add_argument("--shards", help="use this shard set instead of building the embedded sample")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    made: list[tuple[str, Path]] = []
    missing: list[str] = []

    def stage(label, fn, *a):
        _say(f"── {label}")
        try:
            return fn(*a)
        except StageUnavailable as exc:
            missing.append(f"{label}: {exc}")
            _say(f"skipped {label}: {exc}")
            return None

    try:
        shards = Path(args.shards).resolve() if args.shards else stage("data build (embedded sample, Ray)",
                                                                       build_shards, work)
        if shards is not None:
            made.append(("shard set", shards))
            vae_ckpt = stage("pretrain VAE (CrysLDNet stage 1)", pretrain, work, shards, "vae",
                             {"name": "vae", "latent_dim": 8, "encoder": TINY_PDDFORMER}, args.steps)
            vae = release(vae_ckpt, work / "releases" / "vae")
            made.append(("VAE release", vae))
            flow_ckpt = stage("pretrain joint latent flow (CrysLDNet stage 2)", pretrain, work, shards, "latent_flow",
                              {"name": "latent_flow", "init_from": str(vae),
                               "dit": {"layers": 1, "width": 32, "heads": 2, "time_frequencies": 16}}, args.steps)
            made.append(("latent flow release", release(flow_ckpt, work / "releases" / "latent_flow")))
            jepa_ckpt = stage("pretrain Crys-JEPA", pretrain, work, shards, "jepa",
                              {"name": "jepa", "encoder": TINY_TOKENS}, args.steps)
            jepa = release(jepa_ckpt, work / "releases" / "jepa")
            made.append(("JEPA release", jepa))
            tuned = stage("fine-tune a property head on the JEPA encoder", finetune, work, jepa)
            if tuned is not None:
                made.append(("fine-tuned model", tuned))
    except Exception:
        traceback.print_exc()
        _say("the demo stopped with the error above; what was made so far is listed below")
        _report(work, made, missing, start)
        return 1
    _report(work, made, missing, start)
    return 0


def _report(work: Path, made, missing, start) -> None:
    print(f"\ncrystalfm demo finished in {time.time() - start:.0f} s. Made:")
    for label, path in made:
        print(f"  {label:<22} {path}")
    for line in missing:
        print(f"  (not run) {line}")
    db = work / "runs" / "mlflow.db"
    if db.exists():
        print(f"\nOpen the runs in the MLflow UI:\n  mlflow ui --backend-store-uri sqlite:///{db} "
              f"--default-artifact-root {work / 'runs' / 'mlartifacts'}\n  then browse http://127.0.0.1:5000")
    releases = [path for label, path in made if "release" in label]
    if releases:
        print("Load a released model:\n  from pretrain.release import load_pretrained\n"
              f"  model = load_pretrained('{releases[-1]}')")


if __name__ == "__main__":
    raise SystemExit(main())
