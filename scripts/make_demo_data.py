"""Regenerate the demo's fine-tune data set, crystalfm/demo_data/ (offline, seeded, CPU minutes).

    PYTHONPATH=. python scripts/make_demo_data.py [--decorations 900] [--variants 3]

What it makes (see crystalfm/demo_data/README.md):
 1. Decorations: textbook prototypes (rocksalt, CsCl, zincblende, wurtzite, fluorite, antifluorite,
    perovskite, rutile, spinel, corundum, NiAs, CdI2, L1_2, Heusler, fcc, bcc, hcp) with element
    substitutions drawn from charge-balanced cation/anion pools (or metal pools), built with
    nearest neighbours at the sum of Shannon radii (`data_pipeline.sample.make_sample.build`).
 2. CHGNet (the model in the chgnet 0.4.2 wheel) picks each decoration's lattice scale: 3 isotropic
    scales and a parabola (`Chgnet.volume_scan`).
 3. Variants: the scanned crystal plus copies strained up to ±4 % per axis and rattled by 0.04 Å,
    each labelled by one more CHGNet call. All variants of a decoration share a `group` and the
    split (80/10/10 by sha256 of the group), so no test crystal has a sibling in training.
 4. Formation energy per atom = (E − Σ n_el μ_el) / N, with μ_el from CHGNet on simple elemental
    phases (`elemental_references`): model values, not DFT.
Written as crystals.csv.gz in MP-20's CSV columns (+ group, prototype, split), readable with
`crystalfm data build --source cdvae_csv:crystalfm/demo_data/crystals.csv.gz`.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import itertools
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

from data_pipeline.sample.make_sample import Chgnet, build, cif, elemental_references, radius, sane

OUT = Path(__file__).resolve().parents[1] / "crystalfm" / "demo_data"
SEED = 20261202
SCALES = np.array([0.9, 1.0, 1.1])  # 3 linear factors + the parabola's minimum: 4 CHGNet calls per decoration

CATIONS = {
    1: "Li Na K Rb Cs Ag Cu Tl",
    2: "Mg Ca Sr Ba Zn Cd Ni Co Fe Mn Pb Sn",
    3: "Al Ga In Sc Y La Cr Fe V Ti",
    4: "Ti Zr Hf Sn Ge Si Ce Mn Ru Pb",
    5: "Nb Ta V Sb",
}
ANIONS = {-1: "F Cl Br I", -2: "O S Se Te", -3: "N P As"}
METALS = "Li Na K Mg Ca Sr Al Ti V Cr Mn Fe Co Ni Cu Zn Zr Nb Mo Ru Rh Pd Ag Cd Hf Ta W Ir Pt Au Pb Sc Y".split()

# prototype: charge patterns in site order A, (B,) X
IONIC = {
    "rocksalt": [(1, -1), (2, -2), (3, -3)],
    "cscl": [(1, -1)],
    "zincblende": [(1, -1), (2, -2), (3, -3)],
    "wurtzite": [(2, -2), (3, -3)],
    "fluorite": [(2, -1), (4, -2)],
    "antifluorite": [(1, -2)],
    "perovskite": [(1, 5, -2), (2, 4, -2), (3, 3, -2), (1, 2, -1)],
    "rutile": [(4, -2), (2, -1)],
    "spinel": [(2, 3, -2)],
    "corundum": [(3, -2)],
    "nias": [(2, -2), (3, -3)],
    "cdi2": [(2, -1), (4, -2)],
}
METALLIC = {"cscl": 2, "l12": 2, "heusler": 3, "fcc": 1, "bcc": 1, "hcp": 1}


def site_labels(proto: str, n: int) -> list[str]:
    return {1: ["A"], 2: ["A", "X"], 3: ["A", "B", "X"]}[n]


def all_decorations() -> list[tuple[str, dict, dict | None]]:
    """Every (prototype, {site: element}, {element: charge} or None), distinct elements per crystal."""
    out = []
    for proto, patterns in IONIC.items():
        for pattern in patterns:
            pools = [CATIONS[q].split() if q > 0 else ANIONS[q].split() for q in pattern]
            for elements in itertools.product(*pools):
                if len(set(elements)) < len(elements):
                    continue
                labels = site_labels(proto, len(elements))
                out.append((proto, dict(zip(labels, elements)), dict(zip(elements, pattern))))
    for proto, n in METALLIC.items():
        for elements in itertools.permutations(METALS, n) if n > 1 else ((m,) for m in METALS):
            out.append((proto, dict(zip(site_labels(proto, n), elements)), None))
    return out


PLACEHOLDER = {"A": "Li", "B": "Be", "X": "B"}  # distinct stand-ins: the primitive cell is found once per prototype
_TEMPLATES: dict = {}


def fast_build(proto: str, sites: dict, charges: dict | None):
    """`make_sample.build` with the prototype's primitive cell computed once and the elements
    substituted (pymatgen's primitive-cell search costs ~1 s a crystal): nearest neighbours at the
    sum of radii (median over sites), never closer than the atomic radii."""
    from pymatgen.core import Element

    key = (proto, tuple(sorted(sites)))
    if key not in _TEMPLATES:
        _TEMPLATES[key] = build(proto, {lab: PLACEHOLDER[lab] for lab in sites}, None)
    structure = _TEMPLATES[key].copy()
    structure.replace_species({Element(PLACEHOLDER[lab]): Element(el) for lab, el in sites.items()})
    centre, neighbour, _, distance = structure.get_neighbor_list(6.0)
    ratios = []
    for i in range(len(structure)):
        mine = np.flatnonzero(centre == i)
        if not len(mine):
            continue
        j = int(neighbour[mine[np.argmin(distance[mine])]])
        pair = [structure[k].specie.symbol for k in (i, j)]
        ionic = sum(radius(el, charges.get(el) if charges else None) for el in pair)
        atomic = sum(radius(el, None) for el in pair)
        ratios.append(max(ionic, atomic) / float(distance[mine].min()))
    structure.scale_lattice(structure.volume * float(np.median(ratios)) ** 3)
    return structure


def split_of(group: str) -> str:
    u = int.from_bytes(hashlib.sha256(f"demo-split|{group}".encode()).digest()[:8], "big") / 2**64
    return "train" if u < 0.8 else ("val" if u < 0.9 else "test")


def variant(structure, rng):
    out = structure.copy()
    out.apply_strain(rng.uniform(-0.04, 0.04, 3).tolist())
    for i, v in enumerate(rng.normal(0, 0.04 / math.sqrt(3), (len(out), 3))):
        out.translate_sites([i], v, frac_coords=False, to_unit_cell=True)
    return out


HEADER = ["", "material_id", "formation_energy_per_atom", "energy_per_atom", "pretty_formula", "elements", "cif",
          "group", "prototype", "split"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--decorations", type=int, default=800)
    parser.add_argument("--variants", type=int, default=3, help="crystals per decoration (the scanned one + strained copies)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    start = time.time()
    rng = np.random.default_rng(SEED)
    chgnet = Chgnet()
    from pymatgen.core import Structure

    candidates = all_decorations()
    # balance prototypes: draw round-robin over prototypes, each prototype's list shuffled
    by_proto: dict[str, list] = {}
    for item in candidates:
        by_proto.setdefault(item[0], []).append(item)
    for items in by_proto.values():
        rng.shuffle(items)
    chosen = []
    while len(chosen) < args.decorations and any(by_proto.values()):
        for items in by_proto.values():
            if items and len(chosen) < args.decorations:
                chosen.append(items.pop())
    built = []
    for proto, sites, charges in chosen:
        try:
            built.append((proto, fast_build(proto, sites, charges)))
        except Exception as error:  # noqa: BLE001 - a prototype that pymatgen cannot build is skipped
            print(f"  skip {proto} {sites}: {error}", flush=True)
    print(f"{len(candidates)} possible decorations; scanning {len(built)} x {len(SCALES) + 1} volumes", flush=True)
    scanned = chgnet.volume_scan([s for _, s in built], scales=SCALES)
    pool = []
    for index, ((proto, _), (final, e)) in enumerate(zip(built, scanned)):
        if sane(final) or not math.isfinite(e):
            continue
        final = Structure(final.lattice, [site.specie for site in final], final.frac_coords)
        pool.append({"group": f"demo-{index:04d}", "proto": proto, "structures": [final], "energies": [e]})
    print(f"  {len(pool)} decorations kept, {time.time() - start:.0f} s", flush=True)
    copies = [(p, variant(p["structures"][0], rng)) for p in pool for _ in range(args.variants - 1)]
    for (p, structure), prediction in zip(copies, chgnet.predict([s for _, s in copies])):
        e = float(prediction["e"])
        if math.isfinite(e) and not sane(structure):
            p["structures"].append(structure)
            p["energies"].append(e)
    print(f"  variants labelled, {time.time() - start:.0f} s", flush=True)
    elements = {el.symbol for p in pool for el in p["structures"][0].composition.elements}
    mu = elemental_references(chgnet, elements)

    args.out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(HEADER)
    row = 0
    for p in pool:
        split = split_of(p["group"])
        for k, (s, e) in enumerate(zip(p["structures"], p["energies"])):
            comp = s.composition
            ef = e - sum(mu[el.symbol] * amount for el, amount in comp.items()) / comp.num_atoms
            writer.writerow([row, f"{p['group']}-{k}", f"{ef:.5f}", f"{e:.5f}", comp.reduced_formula,
                             str(sorted(el.symbol for el in comp.elements)), cif(s), p["group"], p["proto"], split])
            row += 1
    with open(args.out / "crystals.csv.gz", "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=9) as handle:
            handle.write(buffer.getvalue().encode())
    splits = {}
    for p in pool:
        splits[split_of(p["group"])] = splits.get(split_of(p["group"]), 0) + len(p["structures"])
    meta = {"seed": SEED, "chgnet_model": "0.3.0 (chgnet 0.4.2 wheel)", "decorations": len(pool), "crystals": row,
            "splits": splits, "prototypes": sorted({p["proto"] for p in pool}),
            "elemental_references_eV_per_atom": {k: round(v, 5) for k, v in sorted(mu.items())},
            "cpu_seconds_to_generate": round(time.time() - start)}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: meta[k] for k in ("decorations", "crystals", "splits", "cpu_seconds_to_generate")}))


if __name__ == "__main__":
    main()
