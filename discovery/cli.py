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
    gen.add_argument("--species", default="trained",
                     help="ddpm: species allowed in samples: 'trained' (those in the training crystals, stored in the release), "
                          "'all', or a comma-separated list of symbols (Li,Fe,O)")
    gen.add_argument("--species-from", default=None, help="ddpm: allow only the species of these crystals (shards or a CSV of CIFs)")
    gen.add_argument("--max-z", type=int, default=94, help="ddpm: also drop species above this Z (94: CHGNet's table; 0 keeps all)")
    gen.add_argument("--volume", choices=("generated", "composition"), default="generated",
                     help="ddpm: 'generated' keeps the denoised cell; 'composition' scales it to the volume the "
                          "training set's per-element volume model predicts for the sampled composition")
    gen.add_argument("--corrector-lr", type=float, default=None,
                     help="ddpm with wrapped coordinates: step size of the Langevin corrector on the coordinates "
                          "(DiffCSP's step_lr; default: the one the release was trained with, 0 = predictor only)")
    gen.add_argument("--species-temperature", type=float, default=1.0,
                     help="ddpm: scales the species part's sampling noise (1: ancestral sampling; lower: fewer elements per "
                          "crystal, and at 0 mostly elemental crystals; docs/discovery_mp20.md, session 9)")
    gen.add_argument("--out", default="samples", help="writes <out>/cif/*.cif and <out>/samples.csv")

    ev = sub.add_parser("evaluate", help="V.S.U.N. and CDVAE's generation metrics of one or more sample sets (each set is one sampling run)")
    ev.add_argument("samples", nargs="+", help="sample directories (generate's --out), folders of CIFs, or CSVs of CIFs (PATH:val / PATH:test for a half of MP-20's validation file)")
    ev.add_argument("--reference", default=None, help="training crystals for S, U, N: shards (manifest.json) or a CSV of CIFs")
    ev.add_argument("--reference-splits", default="train", help="comma-separated splits of a shard set")
    ev.add_argument("--test-set", default=None, help="the distribution COV and the Wasserstein distances compare against (default: --reference)")
    ev.add_argument("--dataset", default="mp20", choices=("mp20", "carbon", "perovskite"), help="which published COV cutoffs")
    ev.add_argument("--no-vsun", action="store_true", help="only the generation metrics (no CHGNet relaxations)")
    ev.add_argument("--no-generation-metrics", action="store_true",
                    help="only V.S.U.N. (no COV / Wasserstein: CrystalNN fingerprints cost ~0.45 s per crystal)")
    ev.add_argument("--subsample", type=int, default=None, help="N crystals drawn at random (seeded) from each sample set and the test set")
    ev.add_argument("--seed", type=int, default=0, help="seeds --subsample")
    ev.add_argument("--elemental-refs", default=None, help="MP elemental reference entries (.json.gz)")
    ev.add_argument("--fmax", type=float, default=0.1)
    ev.add_argument("--relax-steps", type=int, default=300)
    ev.add_argument("--num-workers", type=int, default=1, help="Ray workers for the CHGNet relaxations")
    ev.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite in --out)")
    ev.add_argument("--out", default="vsun")

    sc = sub.add_parser("screen", help="rank candidates by Crys-JEPA D_C (or a baseline ranker); --evaluate: judge the rankers on labelled crystals")
    sc.add_argument("samples", help="sample directory, folder of CIFs, or CSV of CIFs (PATH:test for MP-20's test half)")
    sc.add_argument("--jepa", help="Crys-JEPA release directory (ranker jepa)")
    sc.add_argument("--reference", required=True, nargs="+", help="training crystals (shards or CSVs; several are joined)")
    sc.add_argument("--reference-splits", default="train")
    sc.add_argument("--ranker", choices=("jepa", "jepa_probe", "composition_probe", "chgnet", "fingerprint"), default="jepa",
                    help="jepa: D_C (Eq. 11); jepa_probe / composition_probe: a ridge probe's formation energy from the "
                         "JEPA embedding / the element fractions, minus the lowest reference energy of the chemistry")
    sc.add_argument("--keep", type=float, default=0.1, help="fraction of scored candidates to keep")
    sc.add_argument("--elemental-refs", default=None, help="for --ranker chgnet")
    sc.add_argument("--evaluation", default=None, help="evaluate's vsun_table.csv: report the Spearman ρ of score vs E_hull")
    sc.add_argument("--evaluate", action="store_true",
                    help="the samples carry e_above_hull labels: Spearman ρ(score, E_hull) of every ranker with bootstrap CIs")
    sc.add_argument("--rankers", default="jepa,jepa_probe,composition_probe,fingerprint,chgnet,random",
                    help="for --evaluate (jepa and jepa_probe need --jepa)")
    sc.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for --evaluate")
    sc.add_argument("--seed", type=int, default=0, help="seeds the bootstrap and the random ranker")
    sc.add_argument("--subsample", type=int, default=None, help="--evaluate on N labelled crystals drawn at random (seeded)")
    sc.add_argument("--tracking-uri", default=None, help="MLflow store for --evaluate (default: sqlite in --out)")
    sc.add_argument("--out", default="screen")

    rf = sub.add_parser("refine", help="generate → relax → keep V.U.N. → rank by D_C → fine-tune → generate")
    rf.add_argument("config", nargs="?", default=None, help="YAML with discovery.refine.RefineConfig fields")
    rf.add_argument("overrides", nargs="*", help="key=value overrides")
    for command in (gen, ev, sc, rf):
        command.add_argument("--verbose", action="store_true", help="show MLflow's, Ray's and DeepSpeed's own logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from crystalfm_common.console import quiet_third_party

    quiet_third_party(args.verbose)
    try:
        return {"generate": _generate, "evaluate": _evaluate, "screen": _screen, "refine": _refine}[args.command](args)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"crystalfm discovery {args.command}: {exc}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    from discovery.generate import atom_count_distribution, sample_generator, species_of, write_samples
    from pretrain.release import load_pretrained

    objective = load_pretrained(args.model)
    counts = atom_count_distribution(args.num_atoms_from) if args.num_atoms_from else None
    if args.species_from:
        species = species_of(args.species_from)
    elif args.species in ("trained", "all"):
        species = args.species
    else:
        species = [s.strip() for s in args.species.split(",") if s.strip()]
    records = sample_generator(objective, args.n, seed=args.seed, steps=args.steps, atom_counts=counts,
                               species=species, max_z=args.max_z or None, volume=args.volume,
                               corrector_lr=args.corrector_lr, species_temperature=args.species_temperature)
    out = write_samples(records, args.out)
    print(f"wrote {len(records)} crystals to {out}/cif and {out}/samples.csv")
    return 0


def _evaluate(args) -> int:
    from discovery.generation_metrics import fingerprints, generation_metrics, markdown_table, plot_distributions
    from discovery.references import load_crystals
    from discovery.tracking import log_evaluation
    from discovery.vsun import markdown_summary

    if args.no_vsun and args.no_generation_metrics:
        raise ValueError("--no-vsun and --no-generation-metrics together leave nothing to evaluate")
    if args.reference is None and args.test_set is None:
        raise ValueError("give --reference (training crystals) and/or --test-set (the distribution to compare with)")
    if args.reference is None and not args.no_vsun:
        raise ValueError("V.S.U.N. needs --reference (the training crystals); pass --no-vsun for the generation metrics only")
    splits = tuple(args.reference_splits.split(","))
    runs = [subsample(load_crystals(path), args.subsample, args.seed) for path in args.samples]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines, metrics, artifacts = [], {}, []
    if not args.no_vsun:
        summary = _vsun(args, runs, load_crystals(args.reference, splits), out)
        lines.append(markdown_summary(summary))
        metrics.update({m: s["mean"] for m, s in summary.items()})
        artifacts += [out / "vsun_table.csv", out / "vsun_summary.json", out / "stability_vs_novelty.png"]

    if not args.no_generation_metrics:
        test_set = subsample(load_crystals(args.test_set or args.reference, splits), args.subsample, args.seed)
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
                                  "dataset": args.dataset, "runs": len(runs), "vsun": not args.no_vsun,
                                  "subsample": args.subsample, "seed": args.seed},
                                 metrics, artifacts + [out / "evaluation.md"], args.tracking_uri)
    print(f"table: {out / 'evaluation.md'}; plot: {out / 'density_num_elements.png'}; MLflow run {run_id} in {uri}")
    return 0


def subsample(records: list, n: int | None, seed: int) -> list:
    """n records drawn without replacement (file order kept), or all of them when n is None or larger.
    Random rather than the first n: MP-20's files are ordered, their first rows all on the hull."""
    if n is None or n >= len(records):
        return records
    chosen = np.sort(np.random.default_rng(seed).choice(len(records), n, replace=False))
    return [records[i] for i in chosen]


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


def _load_reference(args) -> list:
    from discovery.references import load_crystals

    splits = tuple(args.reference_splits.split(","))
    return [record for spec in args.reference for record in load_crystals(spec, splits)]


def _screen(args) -> int:
    from discovery.references import load_crystals, load_elemental
    from discovery.screen import (ReferenceEmbeddings, chgnet_scores, composition_features, embed_records,
                                  fingerprint_embeddings, jepa_scores, probe_scores, rank_candidates)
    from discovery.vsun import write_table

    if args.evaluate:
        return _screen_evaluate(args)
    candidates = load_crystals(args.samples)
    reference = _load_reference(args)
    if args.ranker in ("jepa", "jepa_probe"):
        if not args.jepa:
            raise ValueError(f"--ranker {args.ranker} needs --jepa DIR (a Crys-JEPA release)")
        from pretrain.release import load_pretrained

        jepa = load_pretrained(args.jepa)
        reference_embeddings, candidate_embeddings = embed_records(jepa, reference), embed_records(jepa, candidates)
        if args.ranker == "jepa":
            index = ReferenceEmbeddings(reference, reference_embeddings)
            scores, refs = jepa_scores(candidates, candidate_embeddings, index)
        else:
            scores, refs = probe_scores(candidates, candidate_embeddings, reference, reference_embeddings)
    elif args.ranker == "composition_probe":
        scores, refs = probe_scores(candidates, composition_features(candidates), reference, composition_features(reference))
    elif args.ranker == "fingerprint":
        index = ReferenceEmbeddings(reference, fingerprint_embeddings(reference))
        scores, refs = jepa_scores(candidates, fingerprint_embeddings(candidates), index)
    else:  # CHGNet single-point energy above the training-set hull (no relaxation)
        scores = chgnet_scores(candidates, reference, load_elemental(args.elemental_refs))
        refs = [len(reference)] * len(candidates)
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


def _screen_evaluate(args) -> int:
    """Every ranker on the same labelled crystals: ρ(score, E_hull) with paired bootstrap CIs."""
    from discovery.ranker_eval import evaluate_rankers, markdown_table, random_scores
    from discovery.references import load_crystals, load_elemental
    from discovery.screen import (ReferenceEmbeddings, chgnet_scores, composition_features, embed_records,
                                  fingerprint_embeddings, jepa_scores, probe_scores)
    from discovery.tracking import log_evaluation
    from discovery.vsun import write_table

    rankers = [r.strip() for r in args.rankers.split(",") if r.strip()]
    known = ("jepa", "jepa_probe", "composition_probe", "fingerprint", "chgnet", "random")
    unknown = set(rankers) - set(known)
    if unknown:
        raise ValueError(f"--rankers: unknown {sorted(unknown)} (choose from {', '.join(known)})")
    needs_jepa = sorted({"jepa", "jepa_probe"} & set(rankers))
    if needs_jepa and not args.jepa:
        raise ValueError(f"--rankers {','.join(needs_jepa)} needs --jepa DIR (a Crys-JEPA release); or leave "
                         f"{' and '.join(needs_jepa)} out of --rankers")
    crystals = [r for r in load_crystals(args.samples) if r.e_above_hull is not None and math.isfinite(r.e_above_hull)]
    crystals = subsample(crystals, args.subsample, args.seed)
    if len(crystals) < 3:
        raise ValueError(f"{args.samples}: {len(crystals)} crystals with an e_above_hull label; --evaluate needs at least 3")
    keys = {r.key for r in crystals}
    reference = [r for r in _load_reference(args) if r.key not in keys]  # never score a crystal against itself
    labels = [r.e_above_hull for r in crystals]
    scores, references, jepa_embeddings = {}, None, None
    for name in rankers:
        if name in ("jepa", "jepa_probe") and jepa_embeddings is None:  # embedded once for both rankers
            from pretrain.release import load_pretrained

            jepa = load_pretrained(args.jepa)
            jepa_embeddings = embed_records(jepa, reference), embed_records(jepa, crystals)
        if name in ("jepa", "fingerprint"):
            embedded = jepa_embeddings if name == "jepa" else (fingerprint_embeddings(reference), fingerprint_embeddings(crystals))
            index = ReferenceEmbeddings(reference, embedded[0])
            scores[name], references = jepa_scores(crystals, embedded[1], index)
        elif name == "jepa_probe":
            scores[name], _ = probe_scores(crystals, jepa_embeddings[1], reference, jepa_embeddings[0])
        elif name == "composition_probe":
            scores[name], _ = probe_scores(crystals, composition_features(crystals), reference, composition_features(reference))
        elif name == "chgnet":
            scores[name] = chgnet_scores(crystals, reference, load_elemental(args.elemental_refs))
        else:
            scores[name] = random_scores(len(crystals), args.seed)
    results = evaluate_rankers(labels, scores, args.bootstrap, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_table([{"key": r.key, "e_above_hull": r.e_above_hull, **{n: scores[n][i] for n in scores},
                  **({"references": references[i]} if references else {})} for i, r in enumerate(crystals)],
                out / "ranker_scores.csv")
    write_table([r.row() for r in results], out / "ranker_eval.csv")
    table = markdown_table(results)
    (out / "ranker_eval.md").write_text(table)
    print(f"{len(crystals)} labelled crystals, {len(reference)} reference crystals; ρ on the {results[0].n} every ranker scored "
          f"({args.bootstrap} paired bootstrap resamples, seed {args.seed}):")
    print(table, end="")
    metrics = {}
    for r in results:
        metrics.update({f"{r.ranker}_spearman": r.spearman, f"{r.ranker}_ci_low": r.ci_low, f"{r.ranker}_ci_high": r.ci_high,
                        f"{r.ranker}_scored": r.scored})
    metrics["n_common"] = results[0].n
    uri, run_id = log_evaluation(out, "crystalfm-discovery-ranker-eval", "screen-evaluate",
                                 {"samples": args.samples, "reference": " ".join(args.reference), "jepa": args.jepa,
                                  "rankers": ",".join(rankers), "bootstrap": args.bootstrap, "seed": args.seed,
                                  "subsample": args.subsample, "n_labelled": len(crystals), "n_reference": len(reference)},
                                 metrics, [out / "ranker_eval.md", out / "ranker_eval.csv", out / "ranker_scores.csv"],
                                 args.tracking_uri)
    print(f"tables: {out / 'ranker_eval.csv'}, {out / 'ranker_scores.csv'}; MLflow run {run_id} in {uri}")
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
