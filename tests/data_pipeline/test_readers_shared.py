"""Every reader on the real shared files: counts from SOURCES.md, labels, keys, determinism."""
from __future__ import annotations

import collections
import csv
import gzip
import io
import json
import shutil
import tarfile
import zipfile

import numpy as np
import pytest

from data_pipeline.build.readers import available_readers, open_reader
from data_pipeline.build.readers.base import RawEntry, RecordError, Reject
from data_pipeline.build.validate import reason_code, validate

NUMERIC_LOOKING_IDS = ("0952432756", "21e1799121", "70960736e3")


def run(reader, limit=None, stride=1):
    """Scan, parse and validate like the build: ({key: record}, Counter of codes, [keys in order]).
    With stride > 1 only every stride-th entry is parsed (the scan still sees every one)."""
    records, codes, order = {}, collections.Counter(), []
    for n, item in enumerate(reader.scan()):
        if limit is not None and n >= limit:
            break
        order.append(item.key)
        if isinstance(item, Reject):
            codes[reason_code(item.reason)] += 1
            continue
        if n % stride:
            continue
        try:
            record = reader.parse(item)
            validate(record)
        except RecordError as error:
            codes[reason_code(error)] += 1
            continue
        assert item.key not in records, f"duplicate key {item.key}"
        records[item.key] = record
    return records, codes, order


def same_record(a, b, atol=1e-6):
    assert a.key == b.key and a.group == b.group
    np.testing.assert_array_equal(a.atomic_numbers, b.atomic_numbers)
    np.testing.assert_allclose(a.lattice, b.lattice, atol=atol, rtol=0)
    d = a.frac_coords - b.frac_coords
    np.testing.assert_allclose(d - np.round(d), 0, atol=atol)
    assert a.labels() == b.labels()


def test_registry_lists_every_kind():
    assert {"cdvae_csv", "mp_docs", "gnome", "mptrj", "jarvis", "structure_files"} <= set(available_readers())
    with pytest.raises(ValueError, match="unknown source kind"):
        open_reader("no_such_kind", ".")


# ------------------------------------------------------------------------------------- cdvae_csv
CDVAE_FILES = [  # path, source, rows (SOURCES.md)
    ("mp_20/train.csv.gz", "mp20", 1847),
    ("mp_20/val.csv.gz", "mp20", 7344),
    ("perov_5/val.csv", "perov5", 3787),
    ("carbon_24/val.csv", "carbon24", 2032),
    ("mpts_52/val.csv.gz", "mpts52", 5000),
]


@pytest.mark.parametrize("path, source, rows", CDVAE_FILES)
def test_cdvae_csv_counts(shared_data, path, source, rows):
    """Every row is scanned; every 10th is parsed and validated here (test_cif_fast parses every CIF
    of these files through both CIF paths and validates them all)."""
    reader = open_reader("cdvae_csv", shared_data / path)
    records, codes, order = run(reader, stride=10)
    assert reader.source == source
    assert len(order) == len(set(order)) == rows and not codes
    assert len(records) == (rows + 9) // 10
    assert all(key.startswith(f"{source}:") for key in order)


def test_cdvae_csv_labels(shared_data):
    perov, _, _ = run(open_reader("cdvae_csv", shared_data / "perov_5" / "val.csv"), limit=5)
    record = next(iter(perov.values()))
    assert set(record.properties) == {"heat_all", "heat_ref", "dir_gap", "ind_gap"}
    assert record.band_gap is None and record.formation_energy_per_atom is None

    mpts, _, _ = run(open_reader("cdvae_csv", shared_data / "mpts_52" / "val.csv.gz"), limit=5)
    first = mpts["mpts52:mp-505752"]
    assert first.e_above_hull == pytest.approx(0.210925843666665)  # energy_above_hull column
    assert first.formation_energy_per_atom == pytest.approx(-0.06148570905746927)
    assert first.properties == {"year": 1997.0}  # `theoretical` is a boolean: not a property

    carbon, _, _ = run(open_reader("cdvae_csv", shared_data / "carbon_24" / "val.csv"), limit=3)
    assert all(r.energy_per_atom is not None and set(r.atomic_numbers) == {6} for r in carbon.values())


def test_cdvae_csv_matches_independent_pymatgen_parse(shared_data, mp20_records):
    records, _, _ = run(open_reader("cdvae_csv", shared_data / "mp_20" / "val.csv.gz"), limit=len(mp20_records))
    for expected in mp20_records:
        got = records[expected.key]
        np.testing.assert_array_equal(got.atomic_numbers, expected.atomic_numbers)
        np.testing.assert_allclose(got.lattice, expected.lattice, atol=1e-6)
        d = got.frac_coords - expected.frac_coords
        np.testing.assert_allclose(d - np.round(d), 0, atol=1e-6)
        assert got.formation_energy_per_atom == expected.formation_energy_per_atom
        assert got.band_gap == expected.band_gap and got.e_above_hull == expected.e_above_hull


def test_cdvae_csv_folder_and_bad_rows(shared_data, tmp_path):
    reader = open_reader("cdvae_csv", shared_data / "mp_20")
    assert [f.name for f in reader.files] == ["train.csv.gz", "val.csv.gz"]
    assert reader.source == "mp20"

    rows = list(csv.reader(gzip.open(shared_data / "mp_20" / "val.csv.gz", "rt", newline="")))[:4]
    header, good = rows[0], rows[1]
    bad_label = list(rows[2]); bad_label[header.index("band_gap")] = "metallic"
    no_cif = list(rows[3]); no_cif[header.index("cif")] = ""
    partial = list(good); partial[header.index("material_id")] = "mp-partial"
    last_site = good[header.index("cif")].rstrip().rsplit("\n", 1)[1]  # "  Se  Se5  1  0.5  0.5  0.0  1"
    assert last_site.endswith("  1")
    partial[header.index("cif")] = good[header.index("cif")].replace(last_site, last_site[:-1] + "0.5")
    garbage = list(good); garbage[header.index("material_id")] = "mp-garbage"; garbage[header.index("cif")] = "not a cif"
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, good, bad_label, no_cif, partial, garbage, good[:3]])
    (tmp_path / "custom.csv").write_text(buffer.getvalue())
    reader = open_reader("cdvae_csv", tmp_path / "custom.csv", source="mine")
    records, codes, order = run(reader)
    assert reader.source == "mine" and len(records) == 1 and order[0] == f"mine:{good[1]}"
    assert codes == {"bad_label_type": 1, "missing_field": 1, "disordered": 1, "unparsable": 2}


# ------------------------------------------------------------------------------------------ gnome
@pytest.fixture(scope="module")
def gnome_dir(shared_data):
    return shared_data / "derived_layouts" / "gnome"


@pytest.mark.slow
def test_gnome_csv_zip_vs_folder_identical(shared_data, gnome_dir):
    from_zip, codes, order = run(open_reader("gnome", gnome_dir))
    assert len(from_zip) == 1000 and not codes
    from_folder, _, order_folder = run(open_reader("gnome", gnome_dir / "stable_materials_summary.csv",
                                                   structures=shared_data / "gnome" / "by_id"))
    assert order == order_folder
    for key, record in from_zip.items():
        same_record(record, from_folder[key], atol=0)
    assert all(r.formation_energy_per_atom is not None for r in from_zip.values())  # present in all rows
    assert all(r.energy is None and r.band_gap is None for r in from_zip.values())  # empty cells
    # Without the CSV: the zip alone and the folder alone give the same crystals, no labels.
    alone_zip, _, keys_zip = run(open_reader("gnome", gnome_dir / "by_id.zip"))
    alone_dir, _, keys_dir = run(open_reader("gnome", shared_data / "gnome" / "by_id"))
    assert keys_zip == keys_dir == sorted(from_zip)
    for key in keys_zip:
        np.testing.assert_array_equal(alone_zip[key].frac_coords, from_zip[key].frac_coords)
        assert alone_zip[key].labels() == {}


def test_gnome_numeric_looking_ids_and_header_variants(gnome_dir):
    main = {e.key: e for e in open_reader("gnome", gnome_dir).scan()}
    for material_id in NUMERIC_LOOKING_IDS:
        assert f"gnome:{material_id}" in main
    for variant in ("stable_materials_summary_2023-12.csv", "stable_materials_summary_2024-08.csv"):
        reader = open_reader("gnome", gnome_dir / "header_variants" / variant)
        records, codes, order = run(reader)
        assert len(records) == 12 and not codes
        for material_id in NUMERIC_LOOKING_IDS:
            key = f"gnome:{material_id}"
            assert records[key].group == material_id
            assert records[key].formation_energy_per_atom == reader.parse(main[key]).formation_energy_per_atom


def test_gnome_missing_cif_and_renamed_columns(gnome_dir, tmp_path):
    (tmp_path / "by_id").mkdir()
    shutil.copy(gnome_dir.parent.parent / "gnome" / "by_id" / "0952432756.CIF", tmp_path / "by_id")
    (tmp_path / "summary.csv").write_text(
        ",MaterialId,UnCorrected Energy,Corrected Energy,Bandgap,Formation Energy Per Atom\n"
        "0,0952432756,-100.5,-101.0,,-1.5\n"
        "1,00000000ff,,,,\n"
    )
    reader = open_reader("gnome", tmp_path / "summary.csv")
    records, codes, order = run(reader)
    record = records["gnome:0952432756"]
    assert record.energy == -101.0 and record.energy_per_atom == pytest.approx(-101.0 / record.num_atoms)
    assert record.properties == {"uncorrected_energy": -100.5} and record.band_gap is None
    assert codes == {"missing_field": 1} and order[1] == "gnome:00000000ff"


# -------------------------------------------------------------------------------- structure_files
def test_structure_files_zip_folder_tar_identical(shared_data, tmp_path):
    folder = shared_data / "gnome" / "by_id"
    names = sorted(p.name for p in folder.iterdir())[:40]
    tar_path = tmp_path / "some.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for name in names:
            tar.add(folder / name, arcname=f"cifs/{name}")
    from_dir, _, keys_dir = run(open_reader("structure_files", folder, source="gnome"))
    from_zip, _, keys_zip = run(open_reader("structure_files", shared_data / "derived_layouts" / "gnome" / "by_id.zip",
                                            source="gnome"))
    from_tar, _, keys_tar = run(open_reader("structure_files", tar_path, source="gnome"))
    assert len(from_dir) == 1000 and keys_dir == keys_zip
    assert keys_tar == [f"gnome:{n[:-4]}" for n in names]
    for key in keys_tar:
        same_record(from_tar[key], from_dir[key], atol=0)
        same_record(from_zip[key], from_dir[key], atol=0)


def test_structure_files_poscars_and_bad_members(shared_data, tmp_path):
    records, codes, order = run(open_reader("structure_files", shared_data / "jarvis" / "alignn_sample_data"))
    assert len(records) == 70 and not codes  # 70 POSCARs; id_prop.csv is not a structure
    assert "alignnsampledata:POSCAR-JVASP-10" in records

    archive = tmp_path / "mixed.zip"
    cif = (shared_data / "gnome" / "by_id" / "0952432756.CIF").read_text()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a/x.cif", cif)
        z.writestr("b/x.cif", cif)  # same stem in another folder: keyed by path
        z.writestr("broken.cif", "data_broken\n_cell_length_a 3\n")
        z.writestr("notes.txt", "ignored")
        z.writestr("POSCAR_bad", "not a poscar")
    records, codes, order = run(open_reader("structure_files", archive))
    assert order == ["mixed:POSCAR_bad", "mixed:x", "mixed:b/x", "mixed:broken"]  # sorted member names
    assert set(records) == {"mixed:x", "mixed:b/x"} and codes == {"unparsable": 2}


# ---------------------------------------------------------------------------------------- mp_docs
MP_FILES = [  # file, documents, accepted (SOURCES.md)
    ("emmet_Li-Fe-O_ComputedStructureEntries.json.gz", 375, 375),
    ("emmet_thermo_test.json", 45, 45),
    ("emmet_materials_Li_Fe_V.json.gz", 21, 21),
    ("emmet_magnetism_mats_sample.json.gz", 10, 10),
    ("mbd_2023-02-07-mp-elemental-reference-entries.json.gz", 89, 0),  # ComputedEntry: no structure
]


@pytest.mark.parametrize("name, documents, accepted", MP_FILES)
def test_mp_docs_counts(shared_data, name, documents, accepted):
    records, codes, order = run(open_reader("mp_docs", shared_data / "mp_entries" / name))
    assert len(order) == documents and len(records) == accepted
    assert codes == ({} if accepted == documents else {"missing_field": documents - accepted})
    assert all(key.startswith("mp:mp-") for key in records)


def test_mp_docs_entry_energies_match_pymatgen(shared_data):
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    path = shared_data / "mp_entries" / "emmet_Li-Fe-O_ComputedStructureEntries.json.gz"
    docs = json.loads(gzip.decompress(path.read_bytes()))
    records, _, _ = run(open_reader("mp_docs", path))
    corrected = 0
    for doc in docs:
        entry = ComputedStructureEntry.from_dict(doc)
        record = records[f"mp:{doc['entry_id']}"]
        assert record.energy == pytest.approx(entry.energy, abs=1e-9)  # corrected (MP2020) total energy
        assert record.energy_per_atom == pytest.approx(entry.energy_per_atom, abs=1e-9)
        assert record.properties["uncorrected_energy"] == pytest.approx(entry.uncorrected_energy)
        assert record.num_atoms == len(entry.structure)
        corrected += entry.correction != 0
    assert corrected > 50


def test_mp_docs_labels_and_layouts(shared_data, tmp_path):
    materials, _, _ = run(open_reader("mp_docs", shared_data / "mp_entries" / "emmet_materials_Li_Fe_V.json.gz"))
    fe = materials["mp:mp-136"]
    assert fe.band_gap == 0.0 and fe.energy == pytest.approx(-16.74429473) and fe.magmoms.shape == (2,)
    thermo, _, _ = run(open_reader("mp_docs", shared_data / "mp_entries" / "emmet_thermo_test.json"))
    assert thermo["mp:mp-779001"].energy_per_atom == pytest.approx(-8.375256320294119)

    docs = json.loads((shared_data / "mp_entries" / "emmet_thermo_test.json").read_text())[:5]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (tmp_path / "cut.json").write_text(json.dumps(docs)[:-200])
    lines, codes, _ = run(open_reader("mp_docs", tmp_path / "docs.jsonl"))
    assert len(lines) == 5 and not codes
    cut, codes, order = run(open_reader("mp_docs", tmp_path / "cut.json"))
    assert len(cut) == 4 and codes == {"truncated_file": 1}


# ----------------------------------------------------------------------------------------- jarvis
def test_jarvis_derived_targets(shared_data):
    path = shared_data / "jarvis" / "derived" / "jarvis_dft_3d_subset_poscar_with_targets.json"
    records, codes, _ = run(open_reader("jarvis", path))
    assert len(records) == 1124 and not codes
    counts = collections.Counter(name for r in records.values() for name in r.properties)
    assert counts == {  # SOURCES.md target counts
        "formation_energy_peratom": 940, "optb88vdw_bandgap": 940, "optb88vdw_total_energy": 940, "ehull": 929,
        "bulk_modulus_kv": 881, "shear_modulus_gv": 881, "Tc_supercon": 616, "mbj_bandgap": 568,
        "spillage": 294, "slme": 43,
    }
    r = records["jarvis:JVASP-10"]
    assert r.formation_energy_per_atom == -0.71026 and r.band_gap == 0.0
    assert r.e_above_hull == r.properties["ehull"] and r.energy is None and r.energy_per_atom is None


def test_jarvis_poscar_folder_and_force_field(shared_data):
    folder, codes, order = run(open_reader("jarvis", shared_data / "jarvis" / "alignn_sample_data",
                                           target_names=["optb88vdw_bandgap"]))
    assert len(folder) == 50 and not codes  # id_prop.csv has 50 rows
    rows = list(csv.reader(open(shared_data / "jarvis" / "alignn_sample_data" / "id_prop.csv")))
    assert order == [f"jarvis:{row[0][len('POSCAR-'):-len('.vasp')]}" for row in rows]
    assert folder["jarvis:JVASP-10"].band_gap == 0.0

    ff, codes, _ = run(open_reader("jarvis", shared_data / "jarvis" / "alignn_sample_data_ff"))
    assert len(ff) == 50 and not codes
    assert collections.Counter(r.group for r in ff.values()) == {"15608": 25, "15609": 16, "15607": 9}
    docs = json.loads((shared_data / "jarvis" / "alignn_sample_data_ff" / "id_prop.json").read_text())
    frames = collections.Counter()
    for doc in docs:
        record = ff[f"jarvis:{doc['jid']}:{frames[doc['jid']]}"]
        frames[doc["jid"]] += 1
        assert record.forces.shape == (record.num_atoms, 3)
        np.testing.assert_allclose(record.forces, doc["forces"])
        assert record.properties == {"total_energy": doc["total_energy"]}
        np.testing.assert_allclose(record.lattice, doc["atoms"]["lattice_mat"])


def test_jarvis_atoms_dict_rejects(tmp_path):
    good_atoms = {"lattice_mat": [[3, 0, 0], [0, 3, 0], [0, 0, 3]], "coords": [[0, 0, 0], [1.5, 1.5, 1.5]],
                  "elements": ["Na", "Cl"], "cartesian": True}
    docs = [
        {"jid": "JVASP-1", "atoms": good_atoms, "formation_energy_peratom": -2.0, "optb88vdw_bandgap": "na",
         "spg_symbol": "Fm-3m"},
        {"jid": "JVASP-2", "atoms": {**good_atoms, "elements": ["Na", "Qq"]}},
        {"jid": "JVASP-3", "atoms": good_atoms, "targets": {"ehull": "0.1eV"}},
        {"atoms": good_atoms},
    ]
    (tmp_path / "dft_3d.json").write_text(json.dumps(docs))
    records, codes, _ = run(open_reader("jarvis", tmp_path / "dft_3d.json"))
    record = records["jarvis:JVASP-1"]
    np.testing.assert_allclose(record.frac_coords, [[0, 0, 0], [0.5, 0.5, 0.5]])  # Cartesian → fractional
    assert record.formation_energy_per_atom == -2.0 and record.band_gap is None
    assert codes == {"unknown_element": 1, "bad_label_type": 1, "missing_field": 1}


# ---------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize(
    "kind, path",
    [
        ("cdvae_csv", "perov_5/val.csv"),
        ("gnome", "derived_layouts/gnome"),
        ("structure_files", "gnome/by_id"),
        ("mp_docs", "mp_entries/emmet_Li-Fe-O_ComputedStructureEntries.json.gz"),
        ("jarvis", "jarvis/derived/jarvis_dft_3d_subset_poscar_with_targets.json"),
        ("mptrj", "derived_layouts/mptrj/MPtrj_sample.json.gz"),
    ],
)
def test_scan_is_deterministic_with_unique_keys_and_plain_payloads(shared_data, kind, path):
    import pickle

    first = list(open_reader(kind, shared_data / path).scan())
    second = list(open_reader(kind, shared_data / path).scan())
    assert [i.key for i in first] == [i.key for i in second]
    entries = [i for i in first if isinstance(i, RawEntry)]
    assert len({e.key for e in entries}) == len(entries)
    sample = entries[:: max(1, len(entries) // 20)]
    assert pickle.loads(pickle.dumps(sample)) == sample
    assert all(type(e.payload) in (dict, str, bytes) for e in sample)


def test_structure_files_truncated_tar_keeps_complete_members(shared_data, tmp_path):
    folder = shared_data / "gnome" / "by_id"
    names = sorted(p.name for p in folder.iterdir())[:10]
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tar:
        for name in names:
            tar.add(folder / name, arcname=name)
    data = whole.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    records, codes, order = run(open_reader("structure_files", tmp_path / "cut.tar", source="g"))
    assert codes == {"truncated_file": 1} and order[-1] == "g:cut.tar"
    assert 0 < len(records) < 10 and list(records) == [f"g:{n[:-4]}" for n in names[: len(records)]]
