"""`crystalfm pretrain evaluate CHECKPOINT --shards DIR`: how good is a released pretrained model?

CrysLDNet (vae, latent_flow) — reconstruction on a held-out split, with the latent mean (no
sampling) and the training protocol's masking (each atom's species hidden with the checkpoint's
mask ratio, from a fixed seed):
    type_acc_masked      fraction of masked atoms whose species is predicted exactly
    coord_rmsd           per-crystal RMSD of the predicted positions under the periodic minimum image (Å)
    coord_rmsd_aligned   the same after the best rigid translation of each crystal (what an
                         invariant encoder can know)
    lattice_mae          mean absolute error of the lattice target (Å; raw 3×3 lattice in paper
                         mode, its polar factor in invariant mode)
  latent_flow also reports its flow-matching loss on the split (fixed seed).

Crys-JEPA — the energy-awareness of the embedding space:
    spearman_distance_vs_dEf   Spearman correlation between ‖e_i − e_k‖ and |E_f,i − E_f,k| over
                               random pairs (and the same for the cosine distance)
    embedding_pca.png          2-D PCA map of the embeddings coloured by E_f
  plus the collapse metrics (per-dimension std, effective rank) of the embeddings.

Everything is written to `<out>/evaluation.json`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.objectives.collapse import collapse_metrics


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a released checkpoint on a held-out split (VAE reconstruction, JEPA energy-awareness)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="release directory (config.json + model.safetensors)")
    parser.add_argument("--shards", required=True, help="shard-set directory (with manifest.json)")
    parser.add_argument("--split", default="val", help="split to evaluate on (default: val)")
    parser.add_argument("--out", default=None, help="output directory (default: <checkpoint>/eval-<split>)")
    parser.add_argument("--max-crystals", type=int, default=None, help="stop after this many crystals")
    parser.add_argument("--atom-budget", type=int, default=4096, help="atoms per batch (default: 4096)")
    parser.add_argument("--pairs", type=int, default=20000, help="random pairs for the JEPA Spearman correlation")
    parser.add_argument("--energy-label", default=None, help="label for the JEPA metrics (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of masks, flow noise and pair sampling")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.set_defaults(func=run_evaluate)
    return parser


def run_evaluate(args) -> int:
    from pretrain.release import load_pretrained

    try:
        objective = load_pretrained(args.checkpoint, map_location="cpu")
    except (FileNotFoundError, ValueError) as exc:
        print(f"crystalfm pretrain evaluate: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    objective = objective.to(device).eval()
    out_dir = Path(args.out) if args.out else Path(args.checkpoint) / f"eval-{args.split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = objective.release_config["objective"].get("name")
    try:
        loader = _loader(objective, args)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"crystalfm pretrain evaluate: cannot read split {args.split!r} of {args.shards}: {exc}", file=sys.stderr)
        return 2

    start = time.time()
    if name in ("vae", "latent_flow"):
        results = evaluate_reconstruction(objective, _batches(loader, device, args.max_crystals), args.seed)
    elif name == "jepa":
        label = args.energy_label or objective.config.energy_label
        results = evaluate_embeddings(
            objective, _batches(loader, device, args.max_crystals), label, args.pairs, args.seed, out_dir
        )
    else:
        print(f"crystalfm pretrain evaluate: no evaluation for objective {name!r}", file=sys.stderr)
        return 2
    results.update(
        objective=name, checkpoint=str(args.checkpoint), shards=str(args.shards), split=args.split,
        seconds=round(time.time() - start, 2),
    )
    (out_dir / "evaluation.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    for key in sorted(results):
        if isinstance(results[key], (int, float)):
            print(f"{key:32s} {results[key]:.6g}")
    print(f"wrote {out_dir / 'evaluation.json'}")
    return 0


def _loader(objective, args):
    from data_pipeline.load.collate import BatchViews
    from data_pipeline.load.loader import ShardLoader
    from data_pipeline.load.shard_list import split_shards

    views = BatchViews.from_dict(objective.batch_views())
    return ShardLoader(
        split_shards(args.shards, args.split), views=views, atom_budget=args.atom_budget, mode="epoch",
        shuffle_buffer=1, seed=args.seed,
    )


def _batches(loader, device, max_crystals):
    seen = 0
    for batch in loader:
        if getattr(batch, "padding", False):
            continue
        if max_crystals is not None and seen >= max_crystals:
            break
        seen += batch.num_crystals
        yield batch.to(device)


# ----------------------------------------------------------------------------- CrysLDNet
@torch.no_grad()
def evaluate_reconstruction(objective, batches, seed: int = 0) -> dict:
    """Reconstruction metrics of a vae or latent_flow objective over `batches`."""
    vae = getattr(objective, "vae", objective)
    generator = torch.Generator().manual_seed(seed)
    totals = {"masked": 0, "correct": 0, "crystals": 0, "rmsd": 0.0, "rmsd_aligned": 0.0, "lattice": 0.0}
    flow_losses, flow_weights = [], []
    for batch in batches:
        mask = torch.rand(batch.num_nodes, generator=generator) < vae.config.mask_ratio
        mask = mask.to(batch.atomic_numbers.device)
        out = vae.reconstruct(batch, mask)
        totals["masked"] += int(mask.sum())
        totals["correct"] += int(((out["types"] == batch.atomic_numbers) & mask).sum())
        totals["crystals"] += batch.num_crystals
        totals["rmsd"] += float(out["coord_rmsd"].sum())
        totals["rmsd_aligned"] += float(out["coord_rmsd_aligned"].sum())
        totals["lattice"] += float(out["lattice_error"].sum())
        if objective is not vae:  # latent_flow: the flow loss with seeded noise
            torch.manual_seed(seed + len(flow_losses))
            loss, metrics = objective.loss(batch)
            flow_losses.append(metrics["flow_loss"])
            flow_weights.append(batch.num_nodes)
    n = max(totals["crystals"], 1)
    results = {
        "crystals": totals["crystals"],
        "masked_atoms": totals["masked"],
        "type_acc_masked": totals["correct"] / max(totals["masked"], 1),
        "coord_rmsd": totals["rmsd"] / n,
        "coord_rmsd_aligned": totals["rmsd_aligned"] / n,
        "lattice_mae": totals["lattice"] / n,
        "target_mode": vae.config.target_mode,
    }
    if flow_losses:
        results["flow_loss"] = float(np.average(flow_losses, weights=flow_weights))
    return results


# ----------------------------------------------------------------------------- Crys-JEPA
@torch.no_grad()
def evaluate_embeddings(objective, batches, energy_label: str, pairs: int, seed: int, out_dir: Path) -> dict:
    """Energy-awareness of JEPA embeddings: Spearman(‖Δe‖, |ΔE|) over random pairs and a PCA map."""
    embeddings, energies = [], []
    for batch in batches:
        if energy_label not in batch.labels:
            raise ValueError(f"the shards carry no {energy_label!r} label; choose one with --energy-label")
        embeddings.append(objective.embed(batch).float().cpu())
        energies.append(batch.labels[energy_label].float().cpu())
    z = torch.cat(embeddings)  # [M, d]
    energy = torch.cat(energies)  # [M]
    keep = ~torch.isnan(energy)
    z, energy = z[keep], energy[keep]
    results = {"crystals": int(z.shape[0]), **collapse_metrics(z, "embedding")}
    results.update(energy_distance_correlation(z, energy, pairs, seed))
    results["pca_png"] = str(plot_pca(z, energy, out_dir / "embedding_pca.png", energy_label))
    return results


def energy_distance_correlation(z: torch.Tensor, energy: torch.Tensor, pairs: int, seed: int) -> dict:
    """Spearman correlation of embedding distances (Euclidean and cosine) with |ΔE| over random pairs i ≠ k."""
    from scipy.stats import spearmanr

    m = z.shape[0]
    if m < 3:
        return {"pairs": 0}
    rng = np.random.default_rng(seed)
    i = rng.integers(0, m, size=pairs)
    k = (i + rng.integers(1, m, size=pairs)) % m  # never i itself
    i, k = torch.from_numpy(i), torch.from_numpy(k)
    euclid = (z[i] - z[k]).norm(dim=-1).numpy()
    unit = torch.nn.functional.normalize(z, dim=-1)
    cosine = (1 - (unit[i] * unit[k]).sum(-1)).numpy()
    de = (energy[i] - energy[k]).abs().numpy()
    return {
        "pairs": int(pairs),
        "spearman_distance_vs_dEf": float(spearmanr(euclid, de).statistic),
        "spearman_cosine_distance_vs_dEf": float(spearmanr(cosine, de).statistic),
    }


def plot_pca(z: torch.Tensor, energy: torch.Tensor, path: Path, label: str) -> Path:
    """2-D PCA of the embeddings coloured by `energy`, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centred = z - z.mean(0, keepdim=True)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()  # [M, 2]
    explained = (s[:2] ** 2 / (s**2).sum().clamp(min=1e-12)).numpy()
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    points = ax.scatter(xy[:, 0], xy[:, 1], c=energy.numpy(), cmap="viridis", s=6)
    fig.colorbar(points, ax=ax, label=f"{label} (eV/atom)")
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% variance)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% variance)" if len(explained) > 1 else "PC2")
    ax.set_title(f"Crys-JEPA embeddings of {len(xy)} crystals")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
