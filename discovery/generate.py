"""Sampling crystals from released generators, and writing them where people and readers find them.

Two generators, both loaded through `pretrain.release.load_pretrained`:
  ddpm    the Crys-JEPA paper's base generator (`pretrain.objectives.ddpm`): its own atom-count
          histogram, ancestral sampling with `steps` (≤ T; fewer strides the chain).
  latent  a CrysLDNet stage-2 release: integrate the flow-matching ODE of the DiT from Z0 ~ N(0, I)
          at t = 0 to t = 1 with `steps` Euler steps (velocity (Ẑ1 − Z_t)/(1 − t)), then decode the
          latents with the stage-1 VAE heads. The number of atoms per crystal is drawn from a
          shard set's manifest (`atoms_per_crystal`), which the caller passes.
Both are reproducible from a seed.
"""
from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch

from data_pipeline.record import CrystalRecord
from data_pipeline.shard_format import sample_name


def atom_count_distribution(shard_dir: str | Path, split: str = "train") -> dict[int, int]:
    """{atoms per crystal: count} of a split (default train) from a shard set's manifest."""
    from data_pipeline.manifest import load_manifest

    statistics = load_manifest(shard_dir).get("statistics", {})
    hist = (statistics.get(split) or statistics.get("all") or {}).get("atoms_per_crystal")
    if not hist:
        raise ValueError(f"{shard_dir}/manifest.json has no atoms_per_crystal histogram")
    return {int(k): int(v) for k, v in hist.items()}


def species_of(spec: str | Path) -> list[int]:
    """The atomic numbers a set of crystals contains: a shard set (its manifest's element
    histogram, every split) or anything `discovery.references.load_crystals` reads."""
    from data_pipeline.manifest import load_manifest

    path = Path(str(spec))
    if (path / "manifest.json").is_file():
        from pymatgen.core import Element

        statistics = load_manifest(path).get("statistics", {})
        found = {Element(symbol).Z for split in statistics.values() if isinstance(split, dict)
                 for symbol in (split.get("elements") or {})}
        if found:
            return sorted(found)
    from discovery.references import load_crystals

    found = {int(z) for record in load_crystals(spec, ("train", "val")) for z in record.atomic_numbers}
    if not found:
        raise ValueError(f"{spec}: no crystals to take species from")
    return sorted(found)


def sample_generator(objective, n: int, seed: int = 0, steps: int | None = None,
                     atom_counts: dict[int, int] | None = None, source: str | None = None,
                     species=None, max_z: int | None = 94, volume: str = "generated",
                     corrector_lr: float | None = None, species_temperature: float = 1.0) -> list[CrystalRecord]:
    """n crystals from a released generator objective (ddpm or latent_flow). species / max_z
    restrict the ddpm's species (`DDPMObjective.allowed_species`: default those it was trained on, Z ≤ 94);
    volume: the ddpm's cell volume, "generated" or "composition" (`DDPMObjective.sample`); corrector_lr: the
    ddpm's Langevin corrector on wrapped coordinates (None: the release's own); species_temperature: the ddpm's
    sampling temperature of the species part (1: plain ancestral sampling)."""
    from pretrain.objectives.ddpm import DDPMObjective
    from pretrain.objectives.latent_flow import LatentFlowObjective

    if isinstance(objective, DDPMObjective):
        return objective.sample(n, seed=seed, steps=steps, source=source or "ddpm", species=species, max_z=max_z,
                                volume=volume, corrector_lr=corrector_lr, species_temperature=species_temperature)
    if isinstance(objective, LatentFlowObjective):
        if species_temperature != 1.0:
            raise ValueError("species_temperature is a ddpm option; the latent generator decodes its species by argmax")
        if corrector_lr is not None:
            raise ValueError("corrector_lr is a ddpm option (wrapped coordinates); the latent generator has no corrector")
        if volume != "generated":
            raise ValueError("volume='composition' is a ddpm option; the latent generator decodes its own cell")
        if not atom_counts:
            raise ValueError("the latent generator needs atom counts: pass --num-atoms-from SHARDS (a shard set)")
        return latent_sample(objective, n, atom_counts, seed=seed, steps=steps or 50, source=source or "latent")
    raise ValueError(
        f"{type(objective).__name__} is not a generator: release a 'ddpm' or a 'latent_flow' (CrysLDNet stage 2) model"
    )


@torch.no_grad()
def latent_sample(objective, n: int, atom_counts: dict[int, int], seed: int = 0, steps: int = 50,
                  source: str = "latent") -> list[CrystalRecord]:
    from pretrain.objectives.dit import pad_atoms

    objective = objective.eval()
    generator = torch.Generator().manual_seed(seed)
    sizes = np.array(sorted(atom_counts), dtype=np.int64)
    probs = torch.tensor([atom_counts[s] for s in sizes], dtype=torch.float64)
    num_atoms = torch.from_numpy(sizes)[torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator)]
    batch_index = torch.repeat_interleave(torch.arange(n), num_atoms)
    dim = objective.dit.latent_dim
    z = torch.randn(int(num_atoms.sum()), dim, generator=generator)  # Z0 [N, d]
    pseudo = SimpleNamespace(batch_index=batch_index, num_atoms=num_atoms, num_crystals=n)
    grid = torch.linspace(0.0, 1.0, steps + 1)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        z_pad, mask = pad_atoms(z, batch_index, num_atoms)
        z1_hat = objective.dit(z_pad, torch.full((n,), float(t0)), mask)[mask]  # [N, d]
        if t1 >= 1.0:
            z = z1_hat
        else:
            z = z + (t1 - t0) * (z1_hat - z) / (1.0 - t0)
    vae = objective.vae
    latent = z if objective.config.latent == "posterior_mean" else vae.moments(z).chunk(2, dim=-1)[0]
    out = vae.decode(latent, pseudo)
    types = (out["type_logits"].argmax(-1) + 1).numpy()
    records = []
    starts = np.concatenate([[0], np.cumsum(num_atoms.numpy())[:-1]])
    for b in range(n):
        sl = slice(int(starts[b]), int(starts[b] + num_atoms[b]))
        if vae.config.target_mode == "paper":
            lattice = out["lattice"][b].reshape(3, 3).double().numpy()
            frac = np.linalg.solve(lattice.T, out["coords"][sl].double().numpy().T).T
        else:
            lattice = _polar6_to_lattice(out["lattice"][b].double().numpy())
            frac = out["coords"][sl].double().numpy()
        records.append(CrystalRecord(f"{source}:{seed}-{b}", source, types[sl], frac, lattice))
    return records


def _polar6_to_lattice(p6: np.ndarray, floor: float = 1.0) -> np.ndarray:
    """A symmetric positive-definite cell from 6 polar-factor entries (eigenvalues floored, Å)."""
    from data_pipeline.record import polar6_to_matrix

    s = polar6_to_matrix(p6)
    w, v = np.linalg.eigh(s)
    return (v * np.clip(w, floor, None)) @ v.T


def write_samples(records: Sequence[CrystalRecord], out_dir: str | Path) -> Path:
    """CIFs in out_dir/cif/ plus out_dir/samples.csv (key, formula, atoms, volume, cif file)."""
    from pymatgen.io.cif import CifWriter

    out_dir = Path(out_dir)
    (out_dir / "cif").mkdir(parents=True, exist_ok=True)
    rows = []
    for record in records:
        name = sample_name(record.key).replace(":", "_") + ".cif"
        structure = record.to_structure()
        CifWriter(structure).write_file(out_dir / "cif" / name)
        rows.append({"key": record.key, "formula": structure.composition.reduced_formula,
                     "num_atoms": record.num_atoms, "volume": round(record.volume, 4), "cif": f"cif/{name}"})
    with open(out_dir / "samples.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["key", "formula", "num_atoms", "volume", "cif"])
        writer.writeheader()
        writer.writerows(rows)
    return out_dir


def read_samples(path: str | Path) -> list[CrystalRecord]:
    """Crystals from a samples directory (its cif/ folder), a folder of CIFs/POSCARs, or an archive,
    through the data pipeline's own reader; unreadable files are reported on stderr and skipped."""
    import sys

    from data_pipeline.build.readers import RecordError, Reject, open_reader

    path = Path(path)
    if (path / "cif").is_dir():
        path = path / "cif"
    reader = open_reader("structure_files", path, source="sample")
    records = []
    for entry in reader.scan():
        if isinstance(entry, Reject):
            print(f"skipped {entry.location}: {entry.reason}", file=sys.stderr)
            continue
        try:
            records.append(reader.parse(entry))
        except RecordError as exc:
            print(f"skipped {entry.location}: {exc}", file=sys.stderr)
    return records
