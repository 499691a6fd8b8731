"""The screening-and-refinement loop (Crys-JEPA §4.2):

    generate N → relax (CHGNet) → keep the valid, unique, novel ones → rank them by D_C
    → fine-tune the generator on the top k% (through the same DeepSpeed trainer, as a shard set
    built by the data pipeline) → release it → generate again

Every round is an MLflow run (V.S.U.N. of its samples, N, k, ranker, the kept count); the final
refined generator is released, and V.S.U.N. before and after is written to `summary.json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from crystalfm_common.tracking import ensure_experiment, open_client
from discovery.relax import RelaxConfig


@dataclass
class RefineConfig:
    generator: str = ""  # a ddpm release directory
    jepa: str = ""  # a Crys-JEPA release directory (the ranker)
    reference: str = ""  # training shards (or a CSV of CIFs)
    elemental_refs: str = ""  # default: shared data's MP elemental references
    out: str = "runs/refine"
    n: int = 64  # crystals generated per round
    keep: float = 0.2  # fraction of the scored V.U.N. candidates the generator is fine-tuned on
    rounds: int = 1
    seed: int = 0
    sample_steps: int = 64  # denoising steps when sampling
    volume: str = "generated"  # the ddpm's cells: "generated", or "composition" (scaled to the volume model)
    num_workers: int = 1  # Ray workers for relaxations
    relax: dict = field(default_factory=lambda: dataclasses.asdict(RelaxConfig()))
    finetune_steps: int = 50
    finetune_lr: float = 1e-4
    atom_budget: int = 512
    tracking_uri: str = ""  # default: sqlite:///<out>/mlflow.db

    @classmethod
    def from_yaml(cls, path: str | None, overrides: dict | None = None) -> "RefineConfig":
        data = yaml.safe_load(Path(path).read_text()) if path else {}
        data.update(overrides or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"refine config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def run_round(cfg: RefineConfig, generator_dir: str, round_: int, hull, novelty, elemental, jepa, reference_index, out: Path):
    """Sample, judge and rank one round. Returns (verdicts, screen rows, samples)."""
    from discovery.generate import sample_generator, write_samples
    from discovery.screen import embed_records, jepa_scores, rank_candidates
    from discovery.vsun import evaluate_run
    from pretrain.release import load_pretrained

    generator = load_pretrained(generator_dir)
    samples = sample_generator(generator, cfg.n, seed=cfg.seed + round_, steps=cfg.sample_steps, source=f"round{round_}",
                               volume=cfg.volume)
    write_samples(samples, out / "samples")
    verdicts = evaluate_run(samples, hull, novelty, elemental, RelaxConfig(**cfg.relax), cfg.num_workers, run=round_)
    # V.U.N. crystals whose relaxation produced a usable structure (a failed or exploded one is no
    # example to fine-tune the generator on)
    vun = [i for i, v in enumerate(verdicts) if v.valid and v.unique and v.novel
           and not v.relax_status.startswith(("failed", "exploded", "skipped"))]
    candidates = [samples[i] for i in vun]
    scores, refs = jepa_scores(candidates, embed_records(jepa, candidates), reference_index) if candidates else ([], [])
    rows = rank_candidates([c.key for c in candidates], scores, refs, cfg.keep)
    return verdicts, rows, samples


def refine(cfg: RefineConfig) -> dict:
    import mlflow

    from discovery.references import load_elemental, load_reference_records
    from discovery.matching import NoveltyIndex
    from discovery.screen import ReferenceEmbeddings, embed_records
    from discovery.stability import HullReference
    from pretrain.release import load_pretrained

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    reference = load_reference_records(cfg.reference)
    hull = HullReference.from_records(reference)
    novelty = NoveltyIndex([r.to_structure() for r in reference])
    elemental = load_elemental(cfg.elemental_refs or None)
    jepa = load_pretrained(cfg.jepa)
    reference_index = ReferenceEmbeddings(reference, embed_records(jepa, reference))

    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri = cfg.tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    try:  # artifacts under the store's artifact root (mlartifacts/ beside a SQLite store), never ./mlruns
        experiment_id = ensure_experiment(open_client(uri), "crystalfm-refine", uri)
        history, generator_dir = _rounds(cfg, hull, novelty, elemental, jepa, reference_index, out, experiment_id)
    finally:
        mlflow.set_tracking_uri(previous_uri)  # set_tracking_uri is process-global: restore it
    summary = {"before": history[0], "after": history[-1], "rounds": history, "refined_generator": generator_dir}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))
    return summary


def _rounds(cfg: RefineConfig, hull, novelty, elemental, jepa, reference_index, out: Path, experiment_id: str | None = None):
    import mlflow

    from discovery.vsun import fractions, write_table

    generator_dir, history = cfg.generator, []
    for round_ in range(cfg.rounds + 1):  # the last round only measures the refined generator
        round_dir = out / f"round{round_}"
        with mlflow.start_run(run_name=f"round{round_}", experiment_id=experiment_id):
            mlflow.log_params({"n": cfg.n, "keep": cfg.keep, "ranker": "jepa_dc", "generator": generator_dir, "round": round_})
            mlflow.log_artifact(str(out / "config.yaml"))  # the full refine config, beside the round's tables
            verdicts, rows, samples = run_round(cfg, generator_dir, round_, hull, novelty, elemental, jepa, reference_index, round_dir)
            write_table([v.row() for v in verdicts], round_dir / "vsun_table.csv")
            write_table([dataclasses.asdict(r) for r in rows], round_dir / "screen.csv")
            metrics = fractions(verdicts)
            kept = [r.key for r in rows if r.kept]
            mlflow.log_metrics({**metrics, "kept": len(kept), "vun": len(rows)})
            for table in ("vsun_table.csv", "screen.csv"):  # the round's tables travel with the store
                mlflow.log_artifact(str(round_dir / table))
            history.append({"round": round_, "generator": generator_dir, **metrics, "kept": len(kept), "vun": len(rows)})
            if round_ == cfg.rounds:
                break
            if not kept:
                print(f"round {round_}: no V.U.N. candidate could be scored; the generator is not fine-tuned")
                continue
            generator_dir = finetune_generator(cfg, generator_dir, [s for s in samples if s.key in set(kept)], round_dir)
            mlflow.log_param("refined_generator", generator_dir)
    return history, generator_dir


def finetune_generator(cfg: RefineConfig, generator_dir: str, crystals, round_dir: Path) -> str:
    """Shard the kept crystals, continue training the generator on them, release the result."""
    from data_pipeline.build.stages import build
    from data_pipeline.build.config import BuildConfig, SourceSpec
    from discovery.generate import write_samples
    from pretrain.config import JobConfig, load_config
    from pretrain.release import release_checkpoint
    from pretrain.trainer import train

    write_samples(crystals, round_dir / "kept")
    shards = round_dir / "kept_shards"
    build(
        BuildConfig(
            sources=(SourceSpec(kind="structure_files", path=str(round_dir / "kept" / "cif"), name="kept", dedup="none"),),
            splits={"train": 1.0},
            out=str(shards),
            executor="inline",
        ),
        progress=False,
    )
    job: JobConfig = load_config(
        None,
        [
            f"run.name=generator_{round_dir.name}",
            f"run.root={round_dir}",
            f"data.shards={shards}",
            f"data.atom_budget={cfg.atom_budget}",
            "data.mode=resampled",
            f"train.max_steps={cfg.finetune_steps}",
            "train.zero_stage=0",
            f"optim.lr={cfg.finetune_lr}",
            "schedule.kind=constant",
            f"checkpoint.every_steps={cfg.finetune_steps}",
            "tracking.mlflow=false",
        ],
    )
    job.objective = {"name": "ddpm", "init_from": str(Path(generator_dir).resolve())}
    train(job)
    released = round_dir / "refined_generator"
    release_checkpoint(job.checkpoint_dir, released, register=False)
    return str(released)
