"""`crystalfm discovery` subcommands: generate, evaluate, screen, refine."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crystalfm discovery", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="sample crystals from a released generator (ddpm or latent)")
    gen.add_argument("model", help="release directory of a 'ddpm' or 'latent_flow' model")
    gen.add_argument("--n", type=int, default=100)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=None, help="denoising / ODE steps (default: T for ddpm, 50 for latent)")
    gen.add_argument("--num-atoms-from", default=None, help="shard set whose atom-count histogram the latent generator uses")
    gen.add_argument("--out", default="samples", help="writes <out>/cif/*.cif and <out>/samples.csv")

    ev = sub.add_parser("evaluate", help="V.S.U.N. and CDVAE's generation metrics of one or more sample sets (each set is one sampling run)")
    ev.add_argument("samples", nargs="+", help="sample directories (generate's --out), folders of CIFs, or CSVs of CIFs (PATH:val / PATH:test for a half of MP-20's validation file)")
    ev.add_argument("--reference", default=None, help="training crystals for S, U, N: shards (manifest.json) or a CSV of CIFs")
    ev.add_argument("--reference-splits", default="train", help="comma-separated splits of a shard set")
    ev.add_argument("--test-set", default=None, help="the distribution COV and the Wasserstein distances compare against (default: --reference)")
    ev.add_argument("--dataset", default="mp20", choices=("mp20", "carbon", "perovskite"), help="which published COV cutoffs")
    ev.add_argument("--no-vsun", action="store_true", help="only the generation metrics (no CHGNet relaxations)")
    ev.add_argument("--elemental-refs", default=None, help="MP elemental reference entries (.json.gz)")
    ev.add_argument("--fmax", type=float, default=0.1)
    ev.add_argument("--relax-steps", type=int, default=300)
    ev.add_argument("--num-workers", type=int, default=1, help="Ray workers for the CHGNet relaxations")
    ev.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite in --out)")
    ev.add_argument("--out", default="vsun")

    sc = sub.add_parser("screen", help="rank candidates by Crys-JEPA D_C (or a baseline ranker)")
    sc.add_argument("samples", help="sample directory or folder of CIFs")
    sc.add_argument("--jepa", help="Crys-JEPA release directory (ranker jepa)")
    sc.add_argument("--reference", required=True)
    sc.add_argument("--reference-splits", default="train")
    sc.add_argument("--ranker", choices=("jepa", "chgnet", "fingerprint"), default="jepa")
    sc.add_argument("--keep", type=float, default=0.1, help="fraction of scored candidates to keep")
    sc.add_argument("--elemental-refs", default=None, help="for --ranker chgnet")
    sc.add_argument("--evaluation", default=None, help="evaluate's vsun_table.csv: report the Spearman ρ of score vs E_hull")
    sc.add_argument("--out", default="screen")

    rf = sub.add_parser("refine", help="generate → relax → keep V.U.N. → rank by D_C → fine-tune → generate")
    rf.add_argument("config", nargs="?", default=None, help="YAML with discovery.refine.RefineConfig fields")
    rf.add_argument("overrides", nargs="*", help="key=value overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": _generate, "evaluate": _evaluate, "screen": _screen, "refine": _refine}[args.command](args)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"crystalfm discovery {args.command}: {exc}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    from discovery.generate import atom_count_distribution, sample_generator, write_samples
    from pretrain.release import load_pretrained

    objective = load_pretrained(args.model)
    counts = atom_count_distribution(args.num_atoms_from) if args.num_atoms_from else None
    records = sample_generator(objective, args.n, seed=args.seed, steps=args.steps, atom_counts=counts)
    out = write_samples(records, args.out)
    print(f"wrote {len(records)} crystals to {out}/cif and {out}/samples.csv")
    return 0


def _evaluate(args) -> int:
    from discovery.generation_metrics import fingerprints, generation_metrics, markdown_table, plot_distributions
    from discovery.references import load_crystals
    from discovery.tracking import log_evaluation
    from discovery.vsun import markdown_summary

    if args.reference is None and args.test_set is None:
        raise ValueError("give --reference (training crystals) and/or --test-set (the distribution to compare with)")
    if args.reference is None and not args.no_vsun:
        raise ValueError("V.S.U.N. needs --reference (the training crystals); pass --no-vsun for the generation metrics only")
    splits = tuple(args.reference_splits.split(","))
    runs = [load_crystals(path) for path in args.samples]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines, metrics, artifacts = [], {}, []
    if not args.no_vsun:
        summary = _vsun(args, runs, load_crystals(args.reference, splits), out)
        lines.append(markdown_summary(summary))
        metrics.update({m: s["mean"] for m, s in summary.items()})
        artifacts += [out / "vsun_table.csv", out / "vsun_summary.json", out / "stability_vs_novelty.png"]

    test_set = load_crystals(args.test_set or args.reference, splits)
    test_fp = fingerprints(test_set)
    reports = [generation_metrics(run, test_set, args.dataset, reference_fp=test_fp) for run in runs]
    per_run = [r.metrics for r in reports]
    (out / "generation_metrics.json").write_text(json.dumps({"test_set": str(args.test_set or args.reference), "runs": per_run}, indent=2))
    plot_distributions(reports, out / "density_num_elements.png")
    table = markdown_table(per_run)
    lines.append(table.split("\n", 2)[2] if lines else table)  # one table: V.S.U.N. rows, then CDVAE's
    metrics.update({m: float(np.mean([r[m] for r in per_run])) for m in per_run[0]})
    artifacts += [out / "generation_metrics.json", out / "density_num_elements.png"]
    text = "".join(lines)
    (out / "evaluation.md").write_text(text)
    print(text, end="")
    uri, run_id = log_evaluation(out, "crystalfm-discovery-evaluate", "evaluate",
                                 {"samples": " ".join(args.samples), "reference": args.reference, "test_set": args.test_set,
                                  "dataset": args.dataset, "runs": len(runs), "vsun": not args.no_vsun},
                                 metrics, artifacts + [out / "evaluation.md"], args.tracking_uri)
    print(f"table: {out / 'evaluation.md'}; plot: {out / 'density_num_elements.png'}; MLflow run {run_id} in {uri}")
    return 0


def _vsun(args, runs, reference, out: Path) -> dict:
    from discovery.matching import NoveltyIndex
    from discovery.references import load_elemental
    from discovery.relax import RelaxConfig
    from discovery.stability import HullReference
    from discovery.vsun import evaluate_run, markdown_summary, plot_stability_vs_novelty, summarize, write_table

    hull = HullReference.from_records(reference)
    novelty = NoveltyIndex([r.to_structure() for r in reference])
    elemental = load_elemental(args.elemental_refs)
    relax = RelaxConfig(fmax=args.fmax, steps=args.relax_steps)
    verdicts = []
    for run, samples in enumerate(runs):
        verdicts += evaluate_run(samples, hull, novelty, elemental, relax, args.num_workers, run=run)
    summary = summarize(verdicts)
    write_table([v.row() for v in verdicts], out / "vsun_table.csv")
    (out / "vsun_summary.json").write_text(json.dumps(summary, indent=2))
    (out / "vsun.md").write_text(markdown_summary(summary))
    plot_stability_vs_novelty(verdicts, out / "stability_vs_novelty.png")
    return summary


def _screen(args) -> int:
    from discovery.generate import read_samples
    from discovery.references import load_elemental, load_reference_records
    from discovery.screen import (ReferenceEmbeddings, embed_records, fingerprint_embeddings, jepa_scores,
                                  rank_candidates)
    from discovery.vsun import write_table

    candidates = read_samples(args.samples)
    reference = load_reference_records(args.reference, tuple(args.reference_splits.split(",")))
    if args.ranker == "jepa":
        if not args.jepa:
            raise ValueError("--ranker jepa needs --jepa DIR (a Crys-JEPA release)")
        from pretrain.release import load_pretrained

        jepa = load_pretrained(args.jepa)
        index = ReferenceEmbeddings(reference, embed_records(jepa, reference))
        scores, refs = jepa_scores(candidates, embed_records(jepa, candidates), index)
    elif args.ranker == "fingerprint":
        index = ReferenceEmbeddings(reference, fingerprint_embeddings(reference))
        scores, refs = jepa_scores(candidates, fingerprint_embeddings(candidates), index)
    else:  # CHGNet single-point energy above the training-set hull (no relaxation)
        from discovery.relax import CHGNetRelaxer
        from discovery.stability import HullReference, formation_energy_per_atom

        hull, elemental, relaxer = HullReference.from_records(reference), load_elemental(args.elemental_refs), CHGNetRelaxer()
        scores, refs = [], []
        for record in candidates:
            composition = record.to_structure().composition
            try:
                ef = formation_energy_per_atom(composition, relaxer.single_point(record), elemental)
                scores.append(hull.e_above_hull(composition, ef))
            except Exception as exc:  # noqa: BLE001 - an unscorable candidate is reported, not guessed
                print(f"{record.key}: not scored ({exc})", file=sys.stderr)
                scores.append(math.nan)
            refs.append(len(reference))
    rows = rank_candidates([c.key for c in candidates], scores, refs, args.keep)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_table([r.__dict__ for r in rows], out / "screen.csv")
    scored = [r for r in rows if r.rank is not None]
    print(f"{args.ranker}: scored {len(scored)}/{len(rows)} candidates, kept {sum(r.kept for r in rows)}; "
          f"{len(rows) - len(scored)} without a reference crystal of their chemistry are listed unscored")
    if args.evaluation:
        rho, n = spearman_against_hull(rows, args.evaluation)
        print(f"Spearman ρ(score, CHGNet E_hull) = {rho:.3f} over {n} crystals")
        (out / "spearman.json").write_text(json.dumps({"ranker": args.ranker, "spearman": rho, "n": n}))
    print(f"table: {out / 'screen.csv'}")
    return 0


def spearman_against_hull(rows, evaluation_csv) -> tuple[float, int]:
    import csv

    from scipy.stats import spearmanr

    with open(evaluation_csv) as handle:
        e_hull = {r["key"]: float(r["e_above_hull"]) for r in csv.DictReader(handle)}
    pairs = [(r.score, e_hull[r.key]) for r in rows if r.rank is not None and r.key in e_hull and math.isfinite(e_hull[r.key])]
    if len(pairs) < 3:
        return math.nan, len(pairs)
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return float(rho), len(pairs)


def _refine(args) -> int:
    import yaml

    from discovery.refine import RefineConfig, refine

    if args.config and "=" in args.config:  # no YAML given: the first word is already an override
        args.overrides.insert(0, args.config)
        args.config = None
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    summary = refine(RefineConfig.from_yaml(args.config, overrides))
    before, after = summary["before"], summary["after"]
    print("V.S.U.N. before → after refinement: " + ", ".join(f"{m} {before[m]:.3f} → {after[m]:.3f}" for m in ("V", "S", "U", "N", "SUN", "VSUN")))
    print(f"refined generator: {summary['refined_generator']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
