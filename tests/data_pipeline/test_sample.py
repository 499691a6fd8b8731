"""The embedded demo sample: real upstream layouts, readable by the project's readers, small."""
from __future__ import annotations

import csv
import gzip
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.sample import SAMPLE_DIR, sample_sources

MPTRJ_FRAME_KEYS = ["structure", "uncorrected_total_energy", "corrected_total_energy", "energy_per_atom",
                    "ef_per_atom", "e_per_atom_relaxed", "ef_per_atom_relaxed", "force", "stress", "magmom",
                    "bandgap", "mp_id"]


@pytest.fixture(scope="module")
def sources():
    return {s["kind"]: s for s in sample_sources()}


def committed_files():
    return [p for p in SAMPLE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def test_sources_exist_and_stay_small(sources):
    assert set(sources) == {"mptrj", "cdvae_csv", "gnome", "structure_files"}
    assert all(Path(s["path"]).is_absolute() and Path(s["path"]).exists() for s in sources.values())
    assert len({s["name"] for s in sources.values()}) == 4
    data = [p for p in committed_files() if p.suffix not in (".py", ".md")]
    assert sum(p.stat().st_size for p in data) <= 1_000_000
    meta = json.loads((SAMPLE_DIR / "sample_meta.json").read_text())
    assert meta["materials"] <= 150 and meta["frames"] <= 300


def test_mptrj_layout_units_and_consistency(sources):
    from pymatgen.core import Structure

    with gzip.open(sources["mptrj"]["path"], "rt") as handle:
        data = json.load(handle)
    frames = 0
    for mp_id, material in data.items():
        relaxed = {f["e_per_atom_relaxed"] for f in material.values()}
        assert len(relaxed) == 1
        for frame_id, frame in material.items():
            frames += 1
            assert list(frame) == MPTRJ_FRAME_KEYS
            assert frame_id.startswith(f"{mp_id}-1-") and frame["mp_id"] == mp_id
            assert "properties" not in frame["structure"]
            structure = Structure.from_dict(frame["structure"])
            n = len(structure)
            assert np.asarray(frame["force"]).shape == (n, 3)
            assert np.asarray(frame["stress"]).shape == (3, 3)
            assert frame["magmom"] is None or len(frame["magmom"]) == n
            assert frame["corrected_total_energy"] == pytest.approx(frame["energy_per_atom"] * n, abs=1e-5)
            assert frame["ef_per_atom"] - frame["ef_per_atom_relaxed"] == pytest.approx(
                frame["energy_per_atom"] - frame["e_per_atom_relaxed"], abs=1e-5)
            assert frame["bandgap"] is None
    assert 0 < frames <= 300


def test_cdvae_csv_and_cifs(sources):
    from pymatgen.core import Structure

    with open(sources["cdvae_csv"]["path"], newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["", "material_id", "formation_energy_per_atom", "band_gap", "pretty_formula", "e_above_hull",
                       "elements", "cif", "spacegroup.number"]
    for row in rows[1:]:
        structure = Structure.from_str(row[7], fmt="cif")
        assert structure.composition.reduced_formula == row[4]
        assert float(row[5]) >= 0 and row[3] == ""  # CHGNet has no band gaps: left empty
    cifs = sorted(Path(sources["structure_files"]["path"]).glob("*.cif"))
    assert cifs and all(Structure.from_file(p).is_ordered for p in cifs)


def test_gnome_layout(sources):
    folder = Path(sources["gnome"]["path"])
    with open(folder / "stable_materials_summary.csv", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = list(reader)
    assert header[0] == "" and header[1:3] == ["Composition", "MaterialId"] and header[-1] == "Data Directory"
    assert len(header) == 24
    ids = [row[2] for row in rows]
    assert ids == sorted(ids) and [row[0] for row in rows] == [str(i) for i in range(len(rows))]
    with zipfile.ZipFile(folder / "by_id.zip") as archive:
        assert sorted(archive.namelist()) == sorted(f"by_id/{i}.CIF" for i in ids)


def test_every_source_reads_through_the_project_readers(sources):
    from data_pipeline.build import readers

    available = readers.available_readers()
    assert set(sources) <= set(available), f"the sample has sources no reader reads: {set(sources) - set(available)}"
    total = 0
    for kind, spec in sources.items():
        reader = readers.open_reader(kind, spec["path"])
        records = []
        for entry in reader.scan():
            assert isinstance(entry, readers.RawEntry), f"{kind}: scan rejected {entry}"
            records.append(reader.parse(entry))
        assert records, kind
        for record in records:
            assert record.num_atoms >= 1 and record.volume > 0
        if kind == "mptrj":
            assert all(r.forces is not None and r.stress is not None and r.energy_per_atom is not None for r in records)
        if kind in ("cdvae_csv", "gnome"):
            assert all(r.formation_energy_per_atom is not None for r in records)
        total += len(records)
    assert total > 100


@pytest.mark.slow  # pymatgen builds each space group's operations once (~1 s each)
def test_prototype_builder_is_sane_and_deterministic():
    from data_pipeline.sample.make_sample import build, decorations, sane

    specs = decorations()
    assert len(specs) >= 150
    wanted = ("rocksalt", "perovskite", "wurtzite", "spinel", "hcp")  # cubic, hexagonal, 1-14 atom cells
    for proto, sites, charges in [next(spec for spec in specs if spec[0] == p) for p in wanted]:
        a, b = build(proto, sites, charges), build(proto, sites, charges)
        assert a == b and sane(a) is None, (proto, sites)
        if charges:  # decorated with charge-balanced oxidation states
            assert sum(charges[s.specie.symbol] for s in a) == 0, (proto, sites)
