"""`crystalfm demo`: the whole chain on embedded data, on CPU, in minutes, ending in a result.

    1 data build     the embedded raw sample (MPtrj, MP-20 CSV, GNoME, CIF layouts) → shards (Ray)
    2-4 pretrain     CrysLDNet VAE, stage-2 latent flow, Crys-JEPA (DeepSpeed on CPU) → releases
    5 fine-tune      formation energy of ~2,500 generated crystals (crystalfm/demo_data: prototypes
                     with substitutions, CHGNet labels), the VAE's encoder fine-tuned end to end
    6 baselines      the composition baseline (Magpie features + gradient boosting) and the
                     training-mean predictor, on the same held-out crystals
    summary          test MAE, R² and the ratio to the composition baseline; plot paths

Pretraining here is a few steps of tiny models, to show every part run; the fine-tune arm is what
learns. Each stage's own output goes to `<out>/logs/<stage>.log` (shown with --verbose). Needs no
download and no shared data.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import json
import os
import sys
import time
from pathlib import Path

from crystalfm_common.metrics import metric_name

DEMO_DATA = Path(__file__).resolve().parent / "demo_data" / "crystals.csv.gz"
# atom_features: magpie — the atom embedding starts from element properties (docs/mp20_study.md, fourth study)
DEMO_PDDFORMER = {"name": "pddformer", "width": 64, "num_layers": 2, "rbf_bins": 16, "pdd_k": 12,
                  "atom_features": "magpie", "neighbor_rule": {"kind": "knn", "k": 8, "cutoff": 4.0}}
TINY_TOKENS = {"name": "jepa_transformer", "width": 32, "num_layers": 1, "heads": 2}
TASK_NAME = "formation_energy_per_atom"


class Console:
    """Progress lines on the terminal; everything else of a stage goes to its log file."""

    def __init__(self, work: Path, verbose: bool):
        self.stream = sys.stdout
        self.logs = work / "logs"
        self.verbose = verbose
        self.lines = 0

    def say(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            print(line, file=self.stream, flush=True)
            self.lines += 1

    @contextlib.contextmanager
    def stage(self, name: str):
        """Route the stage's stdout/stderr (Python, C and child processes alike) to logs/<name>.log."""
        if self.verbose:
            yield
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        path = self.logs / f"{name}.log"
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(path, "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            python_streams = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = log
            try:
                yield
            except BaseException:
                log.flush()
                self.stream.write(f"[demo] {name} failed; the last lines of {path}:\n")
                self.stream.write("".join(path.read_text(errors="replace").splitlines(True)[-15:]))
                raise
            finally:
                log.flush()
                sys.stdout, sys.stderr = python_streams
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])


# ---------------------------------------------------------------------- stages
def build_shards(work: Path) -> tuple[Path, int]:
    from data_pipeline.build.config import BuildConfig, SourceSpec
    from data_pipeline.build.stages import build
    from data_pipeline.sample import sample_sources

    out = work / "shards"
    config = BuildConfig(sources=tuple(SourceSpec.from_dict(s, "sample source") for s in sample_sources()),
                         out=str(out), splits={"train": 0.9, "val": 0.1}, num_workers=2)
    result = build(config, progress=False, log=print)
    return out, _written(result, out)


def _written(result, out: Path) -> int:
    manifest = json.loads((out / "manifest.json").read_text())
    return sum(split["num_samples"] for split in manifest["splits"].values())


def pretrain(work: Path, shards: Path, name: str, objective: dict, steps: int) -> tuple[Path, float]:
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
    return Path(summary["checkpoint_dir"]), float(summary["metrics"].get(metric_name("train", "loss"), float("nan")))


def release(checkpoints: Path, out: Path) -> Path:
    from pretrain.release import release_checkpoint

    return release_checkpoint(checkpoints, out, alias="demo")


def demo_task(work: Path) -> tuple[Path, dict]:
    """The embedded data set as a user CSV task: one CIF per crystal and a table (file, value,
    split); the split keeps every variant of a prototype decoration on the same side."""
    folder = work / "finetune_data"
    (folder / "cif").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    rows = []
    with gzip.open(DEMO_DATA, "rt", newline="") as handle:
        for row in csv.DictReader(handle):
            name = f"cif/{row['material_id']}.cif"
            (folder / name).write_text(row["cif"])
            rows.append((name, row[TASK_NAME], row["split"]))
            counts[row["split"]] = counts.get(row["split"], 0) + 1
    table = folder / f"{TASK_NAME}.csv"
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([("structure", TASK_NAME, "split"), *rows])
    return table, counts


def finetune_and_baselines(work: Path, table: Path, encoder: Path, epochs: int) -> tuple[dict, dict]:
    from finetune.baseline import run_baseline
    from finetune.config import FinetuneConfig
    from finetune.data import load_task_data
    from finetune.run import run_finetune
    from finetune.tasks import get_task

    common = {"task": f"csv:{table}", "unit": "eV/atom", "out": str(work / "finetune"),
              "tracking_uri": f"sqlite:///{work / 'runs' / 'mlflow.db'}", "device": "cpu"}
    config = FinetuneConfig.from_dict({**common, "encoder": str(encoder), "mode": "full", "epochs": epochs,
                                       "batch_size": 32, "lr": 2e-3, "patience": 10, "head_hidden": [64, 64]})
    task = get_task(config.task, unit=config.unit)
    data = load_task_data(task, root=config.data_root, fraction=1.0, seed=config.seed, progress=False)
    outcome = run_finetune(config, data=data, save_to=work / "finetune" / "model", progress=False, verbose=True)
    baselines = run_baseline(FinetuneConfig.from_dict({**common, "encoder": "baseline"}), data=data, progress=False)
    rows = {"fine-tuned VAE encoder (PDDFormer)": outcome.result.test}
    names = {"baseline:magpie-hgb": "composition baseline (Magpie + HGB)", "baseline:train-mean": "mean predictor"}
    rows.update({names.get(b.model, b.model): b.test for b in baselines})
    artifacts = _artifact_dir(work, outcome.run_id)
    plots = {"parity plot": artifacts / "plots" / "parity_test.png",
             "learning curve": artifacts / "plots" / "learning_curve.png"}
    info = {"plots": plots, "model": str(work / "finetune" / "model"), "sizes": data.summary()["used"],
            "registered": (outcome.registered or {}).get("name"), "epochs": outcome.result.epochs_run,
            "best_epoch": outcome.result.best_epoch}
    return rows, info


def _artifact_dir(work: Path, run_id: str | None) -> Path:
    from mlflow.tracking import MlflowClient

    from crystalfm_common.tracking import local_artifact_path

    uri = f"sqlite:///{work / 'runs' / 'mlflow.db'}"
    return local_artifact_path(MlflowClient(uri).get_run(run_id).info.artifact_uri, uri)


def summary_table(rows: dict, unit: str) -> list[str]:
    baseline = rows.get("composition baseline (Magpie + HGB)", {}).get("mae")
    width = max(len(k) for k in rows)
    lines = [f"  {'model':<{width}}  test MAE ({unit})  test R²  MAE / baseline",
             f"  {'-' * width}  {'-' * 17}  {'-' * 7}  {'-' * 14}"]
    for name, metrics in rows.items():
        ratio = f"{metrics['mae'] / baseline:.2f}" if baseline else "-"
        lines.append(f"  {name:<{width}}  {metrics['mae']:>17.4f}  {metrics['r2']:>7.3f}  {ratio:>14}")
    return lines


# ---------------------------------------------------------------------- the chain
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crystalfm demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="crystalfm-demo", help="working directory (default ./crystalfm-demo)")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per pretraining stage (default 20)")
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs, early-stopped (default 15)")
    parser.add_argument("--verbose", action="store_true", help="show every stage's own output and configs")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from crystalfm_common.console import quiet_third_party

    quiet_third_party(args.verbose)  # the stage logs keep our lines, not MLflow's table creation
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    console = Console(work, args.verbose)
    say = lambda text: console.say(f"[demo] {text}")  # noqa: E731
    start = time.time()
    say(f"crystalfm demo in {work} (each stage's output: {console.logs}/)")

    def timed(name: str, fn, *a):
        t0 = time.time()
        with console.stage(name):
            value = fn(*a)
        return value, time.time() - t0

    try:
        (shards, count), s = timed("1-data_build", build_shards, work)
        say(f"1/6 data build: embedded raw sample (MPtrj, MP-20 CSV, GNoME, CIFs) → {count} crystals in shards ({s:.0f} s)")
        stages = [("vae", "2/6 pretrain CrysLDNet VAE", {"name": "vae", "latent_dim": 8, "encoder": DEMO_PDDFORMER}),
                  ("latent_flow", "3/6 pretrain latent flow (stage 2)", None),
                  ("jepa", "4/6 pretrain Crys-JEPA", {"name": "jepa", "encoder": TINY_TOKENS})]
        releases = {}
        for number, (name, label, objective) in enumerate(stages, start=2):
            if objective is None:
                objective = {"name": "latent_flow", "init_from": str(releases["vae"]),
                             "dit": {"layers": 1, "width": 32, "heads": 2, "time_frequencies": 16}}
            t0 = time.time()
            with console.stage(f"{number}-pretrain_{name}"):
                checkpoints, loss = pretrain(work, shards, name, objective, args.steps)
                releases[name] = release(checkpoints, work / "releases" / name)
            say(f"{label}: {args.steps} steps, loss {loss:.4g} → {releases[name]} ({time.time() - t0:.0f} s)")
        (table, counts), _ = timed("5-finetune", demo_task, work)
        say(f"5/6 fine-tune {TASK_NAME} on the embedded generated crystals ({counts.get('train', 0)} train / "
            f"{counts.get('val', 0)} val / {counts.get('test', 0)} test; CHGNet labels) ...")
        t0 = time.time()
        (rows, info), _ = timed("5-finetune", finetune_and_baselines, work, table, releases["vae"], args.epochs)
        say(f"    best epoch {info['best_epoch']} of {info['epochs']}; 6/6 baselines on the same split "
            f"({time.time() - t0:.0f} s)")
    except Exception as error:  # the stage's log tail has been shown
        say(f"stopped: {type(error).__name__}: {error}")
        return 1

    console.say(f"\nHeld-out crystals ({info['sizes']['test']}), formation energy per atom:")
    for line in summary_table(rows, "eV/atom"):
        console.say(line)
    head, mean = rows["fine-tuned VAE encoder (PDDFormer)"], rows["mean predictor"]
    verdict = "beats" if head["mae"] < mean["mae"] else "does NOT beat"
    console.say(f"  the fine-tuned head {verdict} the mean predictor; the composition baseline is reported as measured")
    for label, path in info["plots"].items():
        console.say(f"  {label}: {path}")
    db = work / "runs" / "mlflow.db"
    console.say(f"\nDone in {time.time() - start:.0f} s. Browse the runs:\n"
                f"  mlflow ui --backend-store-uri sqlite:///{db}\n"
                "Use the model from Python:\n"
                f"  import crystalfm; model = crystalfm.load('{info['model']}')\n"
                f"  model.predict(['my.cif'])   # or crystalfm.load('models:/{info['registered']}@best', "
                f"tracking_uri='sqlite:///{db}')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
