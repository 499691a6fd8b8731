"""Regenerate the embedded demo sample (offline, deterministic; minutes on 2 CPU cores).

    python -m data_pipeline.sample.make_sample [--out data_pipeline/sample]

What it makes (see README.md in this folder):
 1. ~120 textbook crystals, drawn (seeded) from ~170 decorations of prototypes: rocksalt, CsCl,
    zincblende, wurtzite, fluorite and antifluorite, cubic perovskite, rutile, spinel, corundum,
    NiAs, CdI2, L1_2, Heusler, fcc, bcc, hcp, diamond, each with an element set of balancing
    charges (or metals). The primitive cell starts with nearest neighbours at the sum of Shannon
    ionic radii (metallic radii for metals); CHGNet 0.3.0 (shipped in the chgnet wheel) then picks
    the lattice scale: an isotropic scan (5 scales from 0.85 to 1.16) refined by a parabola through
    the lowest point (cell shape and fractional coordinates kept; a full relaxation would cost
    ~30x more CPU than regenerating the sample on 2 cores should).
 2. Elemental references μ_el: the lowest CHGNet energy per atom over volume-scanned fcc, bcc, hcp
    (metals), diamond and simple cubic (B, C, Si, Ge, Sn, P, As, Sb, Bi, S, Se, Te), or an X2
    molecule in a 12 Å box with its bond length scanned (same factors) (H, N, O, F, Cl, Br, I).
    Formation energy per atom = (E − Σ_el n_el μ_el) / N, all from CHGNet.
    Energy above hull: pymatgen PhaseDiagram over all sample crystals + the references.
 3. Four raw sources in the real upstream layouts, disjoint materials (3 deliberate duplicates
    between the CSV and the CIF folder exercise dedup):
      mptrj/MPtrj_sample.json.gz   {mp_id: {frame_id: frame}}: frame 0 is the crystal, frames 1..6
                                   copies strained ±3 % per axis and rattled 0.05 Å (not a
                                   relaxation trajectory); frame keys, units and signs exactly as
                                   MPtrj (energies eV, forces eV/Å, stress kBar with VASP's sign)
      cdvae/demo.csv               MP-20 columns, `cif` = pymatgen P1 CIF
      gnome/                       stable_materials_summary.csv (current header) + by_id.zip
      cifs/                        one .cif per crystal, no labels
Band gaps are left empty everywhere: CHGNet does not predict them. Ids are `demo-<n>` (GNoME-style
10-hex ids derived from them for the GNoME layout), never real MP or GNoME ids.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import math
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 20260501
SCALES = np.array([0.85, 0.92, 1.0, 1.08, 1.16])  # linear factors around the radius-based lattice

# ----------------------------------------------------------------------------- prototypes
# name: (space group, lattice kind, c/a, [(site label, fractional coords)])
PROTOTYPES = {
    "rocksalt": ("Fm-3m", "cubic", 1.0, [("A", (0, 0, 0)), ("X", (0.5, 0.5, 0.5))]),
    "cscl": ("Pm-3m", "cubic", 1.0, [("A", (0, 0, 0)), ("X", (0.5, 0.5, 0.5))]),
    "zincblende": ("F-43m", "cubic", 1.0, [("A", (0, 0, 0)), ("X", (0.25, 0.25, 0.25))]),
    "wurtzite": ("P6_3mc", "hexagonal", 1.633, [("A", (1 / 3, 2 / 3, 0)), ("X", (1 / 3, 2 / 3, 0.375))]),
    "fluorite": ("Fm-3m", "cubic", 1.0, [("A", (0, 0, 0)), ("X", (0.25, 0.25, 0.25))]),
    "antifluorite": ("Fm-3m", "cubic", 1.0, [("X", (0, 0, 0)), ("A", (0.25, 0.25, 0.25))]),
    "perovskite": ("Pm-3m", "cubic", 1.0, [("A", (0.5, 0.5, 0.5)), ("B", (0, 0, 0)), ("X", (0.5, 0, 0))]),
    "rutile": ("P4_2/mnm", "tetragonal", 0.645, [("A", (0, 0, 0)), ("X", (0.305, 0.305, 0))]),
    # Fd-3m in pymatgen's default setting (origin choice 1): 8a (0,0,0), 16d (5/8,5/8,5/8), 32e (x,x,x)
    "spinel": ("Fd-3m", "cubic", 1.0, [("A", (0, 0, 0)), ("B", (0.625, 0.625, 0.625)), ("X", (0.3875,) * 3)]),
    "corundum": ("R-3c", "hexagonal", 2.73, [("A", (0, 0, 0.352)), ("X", (0.306, 0, 0.25))]),
    "nias": ("P6_3/mmc", "hexagonal", 1.39, [("A", (0, 0, 0)), ("X", (1 / 3, 2 / 3, 0.25))]),
    "cdi2": ("P-3m1", "hexagonal", 1.6, [("A", (0, 0, 0)), ("X", (1 / 3, 2 / 3, 0.25))]),
    "l12": ("Pm-3m", "cubic", 1.0, [("X", (0, 0, 0)), ("A", (0, 0.5, 0.5))]),
    "heusler": ("Fm-3m", "cubic", 1.0, [("A", (0.25, 0.25, 0.25)), ("B", (0, 0, 0)), ("X", (0.5, 0.5, 0.5))]),
    "fcc": ("Fm-3m", "cubic", 1.0, [("A", (0, 0, 0))]),
    "bcc": ("Im-3m", "cubic", 1.0, [("A", (0, 0, 0))]),
    "hcp": ("P6_3/mmc", "hexagonal", 1.633, [("A", (1 / 3, 2 / 3, 0.25))]),
    "diamond": ("Fd-3m", "cubic", 1.0, [("A", (0, 0, 0))]),
    "sc": ("Pm-3m", "cubic", 1.0, [("A", (0, 0, 0))]),
}

# (prototype, {site: element}, oxidation states or None for metallic bonding)
_IONIC = [
    ("rocksalt", "Na Cl", "+1 -1"), ("rocksalt", "K Cl", "+1 -1"), ("rocksalt", "Li F", "+1 -1"),
    ("rocksalt", "Na F", "+1 -1"), ("rocksalt", "K Br", "+1 -1"), ("rocksalt", "Rb Cl", "+1 -1"),
    ("rocksalt", "Li Cl", "+1 -1"), ("rocksalt", "Na Br", "+1 -1"), ("rocksalt", "Mg O", "+2 -2"),
    ("rocksalt", "Ca O", "+2 -2"), ("rocksalt", "Sr O", "+2 -2"), ("rocksalt", "Ba O", "+2 -2"),
    ("rocksalt", "Ni O", "+2 -2"), ("rocksalt", "Mn O", "+2 -2"), ("rocksalt", "Co O", "+2 -2"),
    ("rocksalt", "Cd O", "+2 -2"), ("rocksalt", "Pb S", "+2 -2"), ("rocksalt", "Ca S", "+2 -2"),
    ("rocksalt", "Sr S", "+2 -2"), ("rocksalt", "Ba S", "+2 -2"), ("rocksalt", "Ag Cl", "+1 -1"),
    ("rocksalt", "Ti N", "+3 -3"), ("rocksalt", "Zr N", "+3 -3"), ("rocksalt", "Sc N", "+3 -3"),
    ("rocksalt", "K I", "+1 -1"), ("rocksalt", "Na I", "+1 -1"),
    ("cscl", "Cs Cl", "+1 -1"), ("cscl", "Cs Br", "+1 -1"), ("cscl", "Cs I", "+1 -1"),
    ("cscl", "Tl Cl", "+1 -1"), ("cscl", "Tl Br", "+1 -1"),
    ("zincblende", "Zn S", "+2 -2"), ("zincblende", "Zn Se", "+2 -2"), ("zincblende", "Zn Te", "+2 -2"),
    ("zincblende", "Cd Te", "+2 -2"), ("zincblende", "Ga As", "+3 -3"), ("zincblende", "Ga P", "+3 -3"),
    ("zincblende", "Al P", "+3 -3"), ("zincblende", "Al As", "+3 -3"), ("zincblende", "In P", "+3 -3"),
    ("zincblende", "In As", "+3 -3"), ("zincblende", "Cu Cl", "+1 -1"), ("zincblende", "Cu Br", "+1 -1"),
    ("zincblende", "Si C", "+4 -4"), ("zincblende", "B P", "+3 -3"), ("zincblende", "Ga Sb", "+3 -3"),
    ("wurtzite", "Zn O", "+2 -2"), ("wurtzite", "Ga N", "+3 -3"), ("wurtzite", "Al N", "+3 -3"),
    ("wurtzite", "In N", "+3 -3"), ("wurtzite", "Cd S", "+2 -2"), ("wurtzite", "Cd Se", "+2 -2"),
    ("wurtzite", "Be O", "+2 -2"), ("wurtzite", "Zn S", "+2 -2"),
    ("fluorite", "Ca F", "+2 -1"), ("fluorite", "Sr F", "+2 -1"), ("fluorite", "Ba F", "+2 -1"),
    ("fluorite", "Cd F", "+2 -1"), ("fluorite", "Ce O", "+4 -2"), ("fluorite", "Zr O", "+4 -2"),
    ("fluorite", "Th O", "+4 -2"), ("fluorite", "Hf O", "+4 -2"),
    ("antifluorite", "Li O", "+1 -2"), ("antifluorite", "Na O", "+1 -2"), ("antifluorite", "K O", "+1 -2"),
    ("antifluorite", "Li S", "+1 -2"), ("antifluorite", "Na S", "+1 -2"),
    ("perovskite", "Sr Ti O", "+2 +4 -2"), ("perovskite", "Ba Ti O", "+2 +4 -2"),
    ("perovskite", "Ca Ti O", "+2 +4 -2"), ("perovskite", "K Nb O", "+1 +5 -2"),
    ("perovskite", "Na Nb O", "+1 +5 -2"), ("perovskite", "K Ta O", "+1 +5 -2"),
    ("perovskite", "Ba Zr O", "+2 +4 -2"), ("perovskite", "Sr Zr O", "+2 +4 -2"),
    ("perovskite", "La Al O", "+3 +3 -2"), ("perovskite", "La Ga O", "+3 +3 -2"),
    ("perovskite", "K Mg F", "+1 +2 -1"), ("perovskite", "K Zn F", "+1 +2 -1"),
    ("perovskite", "Rb Ca F", "+1 +2 -1"), ("perovskite", "Cs Pb Cl", "+1 +2 -1"),
    ("perovskite", "Ba Sn O", "+2 +4 -2"), ("perovskite", "Sr Hf O", "+2 +4 -2"),
    ("rutile", "Ti O", "+4 -2"), ("rutile", "Sn O", "+4 -2"), ("rutile", "Ge O", "+4 -2"),
    ("rutile", "Ru O", "+4 -2"), ("rutile", "Mn O", "+4 -2"), ("rutile", "Ir O", "+4 -2"),
    ("rutile", "Mg F", "+2 -1"), ("rutile", "Zn F", "+2 -1"), ("rutile", "Ni F", "+2 -1"),
    ("rutile", "Co F", "+2 -1"), ("rutile", "Fe F", "+2 -1"),
    ("spinel", "Mg Al O", "+2 +3 -2"), ("spinel", "Zn Al O", "+2 +3 -2"), ("spinel", "Mg Cr O", "+2 +3 -2"),
    ("spinel", "Zn Cr O", "+2 +3 -2"), ("spinel", "Co Al O", "+2 +3 -2"), ("spinel", "Mg Ga O", "+2 +3 -2"),
    ("corundum", "Al O", "+3 -2"), ("corundum", "Cr O", "+3 -2"), ("corundum", "Ga O", "+3 -2"),
    ("corundum", "V O", "+3 -2"), ("corundum", "Ti O", "+3 -2"),
    ("nias", "Ni As", "+3 -3"), ("nias", "Fe S", "+2 -2"), ("nias", "Co S", "+2 -2"),
    ("nias", "Ni S", "+2 -2"), ("nias", "Cr Sb", "+3 -3"),
    ("cdi2", "Cd I", "+2 -1"), ("cdi2", "Mg Br", "+2 -1"), ("cdi2", "Ti S", "+4 -2"),
    ("cdi2", "Zr S", "+4 -2"), ("cdi2", "Sn S", "+4 -2"), ("cdi2", "Mg I", "+2 -1"),
]
_METALLIC = [
    ("cscl", "Ni Al"), ("cscl", "Co Al"), ("cscl", "Fe Al"), ("cscl", "Cu Zn"), ("cscl", "Ag Mg"),
    ("l12", "Ni Al"), ("l12", "Cu Au"), ("l12", "Pt Ti"), ("l12", "Ni Ga"), ("l12", "Pd Fe"),
    ("heusler", "Cu Mn Al"), ("heusler", "Ni Mn Ga"), ("heusler", "Co Mn Si"), ("heusler", "Co Fe Si"),
    ("heusler", "Fe V Al"),
    *[("fcc", e) for e in "Cu Al Ni Ag Au Pt Pd Pb Ca".split()],
    *[("bcc", e) for e in "Fe Cr Mo W V Nb Ta Na K Li Ba".split()],
    *[("hcp", e) for e in "Mg Ti Zn Co Zr Be Cd Sc Y Hf".split()],
    *[("diamond", e) for e in "Si Ge C Sn".split()],
]
GAS_DIMERS = {"H": 0.74, "N": 1.10, "O": 1.21, "F": 1.42, "Cl": 1.99, "Br": 2.28, "I": 2.67}


def decorations() -> list[tuple[str, dict[str, str], dict[str, int] | None]]:
    out = []
    for proto, elements, charges in _IONIC:
        labels = [label for label, _ in PROTOTYPES[proto][3]]
        ordered = _site_order(proto)
        els, oxi = elements.split(), [int(c) for c in charges.split()]
        mapping = dict(zip(ordered, els))
        out.append((proto, {lab: mapping[lab] for lab in labels}, {mapping[k]: o for k, o in zip(ordered, oxi)}))
    for proto, elements in _METALLIC:
        ordered = _site_order(proto)
        out.append((proto, dict(zip(ordered, elements.split())), None))
    return out


def _site_order(proto: str) -> list[str]:
    """Sites in the order the decoration lists name elements (cation(s) first, anion last)."""
    labels = [label for label, _ in PROTOTYPES[proto][3]]
    return sorted(labels, key=lambda lab: {"A": 0, "B": 1, "X": 2}[lab])


# ----------------------------------------------------------------------------- building
def radius(element: str, oxidation: int | None) -> float:
    from pymatgen.core import Element, Species

    el = Element(element)
    if oxidation is not None:
        try:
            r = Species(element, oxidation).ionic_radius
            if r:
                return float(r)
        except (ValueError, KeyError):
            pass
        if el.average_ionic_radius:
            return float(el.average_ionic_radius)
    return float(el.atomic_radius or el.metallic_radius or 1.5)


def build(proto: str, sites: dict[str, str], charges: dict[str, int] | None):
    """Primitive cell with nearest neighbours at the sum of radii (median over sites)."""
    from pymatgen.core import Lattice, Structure

    group, kind, c_over_a, positions = PROTOTYPES[proto]
    # built at a = 4 Å (primitive-cell search uses Å tolerances), then rescaled
    lattice = {"cubic": Lattice.cubic(4.0), "hexagonal": Lattice.hexagonal(4.0, 4.0 * c_over_a),
               "tetragonal": Lattice.tetragonal(4.0, 4.0 * c_over_a)}[kind]
    structure = Structure.from_spacegroup(group, lattice, [sites[lab] for lab, _ in positions],
                                          [p for _, p in positions])
    structure = structure.get_primitive_structure()
    centre, neighbour, _, distance = structure.get_neighbor_list(6.0)  # periodic: 1-atom cells too
    ratios = []
    for i, site in enumerate(structure):
        mine = np.flatnonzero(centre == i)
        if not len(mine):
            continue
        j = int(neighbour[mine[np.argmin(distance[mine])]])
        pair = [(structure[k].specie.symbol) for k in (i, j)]
        ionic = sum(radius(el, charges.get(el) if charges else None) for el in pair)
        # never closer than the atomic radii: small Shannon radii (Si4+, B3+...) would crush covalent cells
        atomic = sum(radius(el, None) for el in pair)
        ratios.append(max(ionic, atomic) / float(distance[mine].min()))
    structure.scale_lattice(structure.volume * float(np.median(ratios)) ** 3)
    return structure


def sane(structure) -> str | None:
    """Why a relaxed crystal is unusable, or None."""
    n = len(structure)
    volume_per_atom = structure.volume / n
    if not 3.0 <= volume_per_atom <= 80.0:
        return f"volume per atom {volume_per_atom:.1f} Å³"
    if n > 1:
        d = structure.distance_matrix[np.triu_indices(n, 1)]
        if d.min() < 0.7:
            return f"atoms {d.min():.2f} Å apart"
    return None


# ----------------------------------------------------------------------------- CHGNet
class Chgnet:
    def __init__(self):
        import torch
        from chgnet.model import CHGNet

        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.model = CHGNet.load(verbose=False)

    def predict(self, structures):
        """CHGNet e (eV/atom), f (eV/Å), s (GPa), m (μB) per structure, in batches."""
        out = []
        structures = list(structures)
        for start in range(0, len(structures), 64):  # bounded memory: CHGNet keeps every graph of a call
            part = structures[start : start + 64]
            try:
                chunk = self.model.predict_structure(part, batch_size=16)
                out.extend(chunk if isinstance(chunk, list) else [chunk])
            except ValueError:  # e.g. an atom with no neighbour within CHGNet's 6 Å: NaN for that one
                for structure in part:
                    try:
                        out.append(self.model.predict_structure(structure))
                    except ValueError:
                        out.append({"e": float("nan"), "f": None, "s": None, "m": None})
        return out

    def volume_scan(self, structures, scales=SCALES):
        """Each structure isotropically rescaled to its CHGNet minimum: energies on the `scales`
        grid (linear factors; fractional coordinates and cell shape kept), a parabola through
        the lowest point and its neighbours, and one more prediction at the parabola's minimum
        (kept only if lower). Returns [(structure, energy per atom)]."""
        def scaled(structure, f):
            trial = structure.copy()
            trial.scale_lattice(structure.volume * float(f) ** 3)
            return trial

        k = len(scales)
        energies = np.array([float(p["e"]) for p in self.predict(
            [scaled(s, f) for s in structures for f in scales])]).reshape(len(structures), k)
        energies[~np.isfinite(energies)] = np.inf
        best = np.argmin(energies, axis=1)
        refined = []
        for s, e, j in zip(structures, energies, best):
            f = float(scales[j])
            if 0 < j < k - 1 and np.all(np.isfinite(e[j - 1 : j + 2])):
                x, y = scales[j - 1 : j + 2], e[j - 1 : j + 2]
                a, b, _ = np.polyfit(x, y, 2)
                if a > 0:
                    f = float(np.clip(-b / (2 * a), x[0], x[2]))
            refined.append(f)
        finals = [scaled(s, f) for s, f in zip(structures, refined)]
        final_e = [float(p["e"]) for p in self.predict(finals)]
        out = []
        for s, e, j, final, fe in zip(structures, energies, best, finals, final_e):
            if math.isfinite(fe) and fe <= e[j]:
                out.append((final, fe))
            else:
                out.append((scaled(s, scales[j]), float(e[j])))
        return out


def elemental_references(chgnet: Chgnet, elements: set[str]) -> dict[str, float]:
    """μ_el: lowest CHGNet energy per atom over simple elemental phases, each volume-scanned.

    Metals: fcc, bcc, hcp. B, C, Si, Ge, Sn, P, As, Sb, Bi, S, Se, Te: diamond, simple cubic.
    H, N, O, F, Cl, Br, I: an X2 molecule in a 12 Å box, bond length scanned ±25 %.
    """
    from pymatgen.core import Lattice, Structure

    mu = {}
    for element in sorted(elements):
        if element in GAS_DIMERS:
            d = GAS_DIMERS[element]
            molecules = [Structure(Lattice.cubic(12.0), [element, element], [[0, 0, 0], [d * f, 0, 0]],
                                   coords_are_cartesian=True) for f in SCALES]
            mu[element] = min(e for e in (float(p["e"]) for p in chgnet.predict(molecules)) if math.isfinite(e))
        else:
            protos = ("diamond", "sc") if element in COVALENT else ("fcc", "bcc", "hcp")
            scanned = chgnet.volume_scan([build(proto, {"A": element}, None) for proto in protos])
            mu[element] = min(e for _, e in scanned if math.isfinite(e))
        print(f"  mu({element}) = {mu[element]:.4f} eV/atom", flush=True)
    return mu


METALLIC_REFERENCE = {"fcc", "bcc", "hcp"}
COVALENT = set("B C Si Ge Sn P As Sb Bi S Se Te".split())


# ----------------------------------------------------------------------------- writers
def frame_dict(structure) -> dict:
    """pymatgen Structure.as_dict() as MPtrj stores it (no top-level `properties`)."""
    d = structure.as_dict()
    d.pop("properties", None)
    for site in d["sites"]:
        site["properties"] = {}
    return d


def cif(structure) -> str:
    from pymatgen.io.cif import CifWriter

    return str(CifWriter(structure))


def gnome_row(index: int, material_id: str, structure, energy: float, ef: float) -> dict:
    from pymatgen.analysis.dimensionality import get_dimensionality_cheon
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    comp = structure.composition
    sga = SpacegroupAnalyzer(structure, symprec=0.1)
    elements = [el.symbol for el in sorted(comp.elements, key=lambda e: e.Z)]
    try:
        dim = get_dimensionality_cheon(structure)
    except Exception:  # noqa: BLE001 - an empty cell is a valid upstream value
        dim = ""
    return {
        "": index, "Composition": comp.alphabetical_formula.replace(" ", ""), "MaterialId": material_id,
        "Reduced Formula": comp.reduced_formula, "Elements": str(elements), "NSites": len(structure),
        "Volume": f"{structure.volume:.4f}", "Density": f"{structure.density:.4f}",
        "Point Group": sga.get_point_group_symbol(), "Space Group": sga.get_space_group_symbol(),
        "Space Group Number": sga.get_space_group_number(), "Crystal System": sga.get_crystal_system(),
        "Uncorrected Energy": f"{energy:.6f}", "Corrected Energy": f"{energy:.6f}",
        "Formation Energy Per Atom": f"{ef:.4f}", "Decomposition Energy Per Atom": "",
        "Dimensionality Cheon": dim, "Bandgap": "", "Is Train": "",
        "Decomposition Energy Per Atom All": "", "Decomposition Energy Per Atom Relative": "",
        "Decomposition Energy Per Atom MP": "", "Decomposition Energy Per Atom MP OQMD": "", "Data Directory": "",
    }


GNOME_HEADER = ["", "Composition", "MaterialId", "Reduced Formula", "Elements", "NSites", "Volume", "Density",
                "Point Group", "Space Group", "Space Group Number", "Crystal System", "Uncorrected Energy",
                "Corrected Energy", "Formation Energy Per Atom", "Decomposition Energy Per Atom",
                "Dimensionality Cheon", "Bandgap", "Is Train", "Decomposition Energy Per Atom All",
                "Decomposition Energy Per Atom Relative", "Decomposition Energy Per Atom MP",
                "Decomposition Energy Per Atom MP OQMD", "Data Directory"]
CDVAE_HEADER = ["", "material_id", "formation_energy_per_atom", "band_gap", "pretty_formula", "e_above_hull",
                "elements", "cif", "spacegroup.number"]


def _zip_bytes(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, text in members.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))  # fixed: same bytes every run
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, text)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--mptrj", type=int, default=40, help="materials with trajectories")
    parser.add_argument("--frames", type=int, default=7, help="frames per material")
    parser.add_argument("--csv", type=int, default=40)
    parser.add_argument("--gnome", type=int, default=25)
    parser.add_argument("--cifs", type=int, default=15)
    parser.add_argument("--limit", type=int, default=None, help="only the first N decorations (for a quick check)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    start = time.time()
    rng = np.random.default_rng(SEED)
    chgnet = Chgnet()
    from pymatgen.core import Structure

    # 1. choose the materials; CHGNet volume scan of each -----------------------------------
    sizes = {"mptrj": args.mptrj, "csv": args.csv, "gnome": args.gnome, "cifs": args.cifs}
    candidates = decorations()[: args.limit]
    order = rng.permutation(len(candidates)).tolist()[: sum(sizes.values())]
    built = [build(*candidates[i]) for i in order]
    print(f"  scanning {len(built)} crystals x {len(SCALES)} volumes", flush=True)
    pool = []
    for index, (final, e) in zip(order, chgnet.volume_scan(built)):
        proto = candidates[index][0]
        label = f"{final.composition.reduced_formula} ({proto})"
        why = sane(final)
        if why or not math.isfinite(e):
            print(f"  skip {label}: {why or 'no finite energy'}", flush=True)
            continue
        final = Structure(final.lattice, [site.specie for site in final], final.frac_coords)
        pool.append({"proto": proto, "label": label, "final": final, "e": e, "id": f"demo-{1000 + index}"})
    print(f"  {len(pool)} crystals, {time.time() - start:.0f} s", flush=True)

    # 2. references, formation energies, hull ---------------------------------------------
    elements = {el.symbol for p in pool for el in p["final"].composition.elements}
    mu = elemental_references(chgnet, elements)
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram

    entries = [PDEntry(p["final"].composition, p["e"] * len(p["final"])) for p in pool]
    references = [PDEntry({el: 1}, mu[el]) for el in mu]
    for p, entry in zip(pool, entries):
        comp = p["final"].composition
        p["ef"] = p["e"] - sum(mu[el.symbol] * amt for el, amt in comp.items()) / comp.num_atoms
        # one small hull per chemical system (a single ~60-element hull is intractable)
        system = set(comp.elements)
        local = [e for e in entries + references if set(e.composition.elements) <= system]
        p["ehull"] = max(0.0, float(PhaseDiagram(local).get_e_above_hull(entry)))

    # 3. the four sources, disjoint materials -------------------------------------------------
    groups, cursor = {}, 0
    for name, k in sizes.items():
        groups[name] = pool[cursor : cursor + k]
        cursor += k
    out = args.out
    for sub in ("mptrj", "cdvae", "gnome", "cifs"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    # mptrj: perturbed frames of each material (frame 0 is the scanned crystal itself)
    mptrj = {}
    for p in groups["mptrj"]:
        frames = [p["final"]]
        for _ in range(args.frames - 1):
            frame = p["final"].copy()
            frame.apply_strain(rng.uniform(-0.03, 0.03, 3).tolist())
            for i, v in enumerate(rng.normal(0, 0.05 / math.sqrt(3), (len(frame), 3))):
                frame.translate_sites([i], v, frac_coords=False, to_unit_cell=True)
            frames.append(frame)
        preds = chgnet.predict(frames)
        e_relaxed = float(preds[0]["e"])
        mp_id = p["id"]
        mptrj[mp_id] = {}
        for step, (frame, pred) in enumerate(zip(frames, preds)):
            n = len(frame)
            e = float(pred["e"])
            magmom = [round(float(m), 3) for m in np.atleast_1d(pred["m"])] if pred.get("m") is not None else None
            mptrj[mp_id][f"{mp_id}-1-{step}"] = {
                "structure": frame_dict(frame),
                "uncorrected_total_energy": round(e * n, 6),
                "corrected_total_energy": round(e * n, 6),
                "energy_per_atom": round(e, 6),
                "ef_per_atom": round(p["ef"] + (e - e_relaxed), 6),
                "e_per_atom_relaxed": round(e_relaxed, 6),
                "ef_per_atom_relaxed": round(p["ef"], 6),
                "force": np.round(np.asarray(pred["f"], dtype=float), 6).tolist(),
                "stress": np.round(-10.0 * np.asarray(pred["s"], dtype=float), 5).tolist(),  # GPa → kBar, VASP sign
                "magmom": magmom,
                "bandgap": None,
                "mp_id": mp_id,
            }
    text = json.dumps(mptrj)
    with open(out / "mptrj" / "MPtrj_sample.json.gz", "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as handle:
            handle.write(text.encode())

    # cdvae csv (MP-20 columns)
    with open(out / "cdvae" / "demo.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CDVAE_HEADER)
        for i, p in enumerate(groups["csv"]):
            s = p["final"]
            from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

            writer.writerow([i, p["id"], f"{p['ef']:.6f}", "", s.composition.reduced_formula, f"{p['ehull']:.6f}",
                             str([el.symbol for el in s.composition.elements]), cif(s),
                             SpacegroupAnalyzer(s, symprec=0.1).get_space_group_number()])

    # gnome summary + by_id.zip
    rows, members = [], {}
    for i, p in enumerate(sorted(groups["gnome"], key=lambda q: _gnome_id(q["id"]))):
        material_id = _gnome_id(p["id"])
        rows.append(gnome_row(i, material_id, p["final"], p["e"] * len(p["final"]), p["ef"]))
        members[f"by_id/{material_id}.CIF"] = cif(p["final"])
    with open(out / "gnome" / "stable_materials_summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=GNOME_HEADER)
        writer.writeheader()
        writer.writerows(rows)
    (out / "gnome" / "by_id.zip").write_bytes(_zip_bytes(members))

    # cifs folder (+ 3 duplicates of CSV crystals, to exercise dedup)
    for p in groups["cifs"] + groups["csv"][:3]:
        (out / "cifs" / f"{p['id']}.cif").write_text(cif(p["final"]))

    meta = {"seed": SEED, "volume_scan_linear_scales": SCALES.tolist(), "chgnet_model": "0.3.0",
            "materials": len(pool),
            "elemental_references_eV_per_atom": {k: round(v, 6) for k, v in sorted(mu.items())},
            "counts": {k: len(v) for k, v in groups.items()}, "frames": sum(len(v) for v in mptrj.values()),
            "duplicates_in_cifs": [p["id"] for p in groups["csv"][:3]]}
    (out / "sample_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(json.dumps(meta["counts"]), meta["frames"], "frames", f"{time.time() - start:.0f} s")


def _gnome_id(demo_id: str) -> str:
    """A 10-hex-digit id in GNoME's style, derived from ours (never a real GNoME id)."""
    return hashlib.sha1(demo_id.encode()).hexdigest()[:10]


if __name__ == "__main__":
    main()
