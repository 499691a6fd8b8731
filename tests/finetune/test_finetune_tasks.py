"""The task registry, deterministic splits, nested label fractions and user CSV tasks (real data)."""
from __future__ import annotations

import json

import pytest

from finetune.data import load_task_data
from finetune.tasks import available_tasks, data_root, get_task, hash_split, val_test_split


def test_registry_names_the_issue_tasks_with_units():
    names = set(available_tasks())
    expected = {
        "mp20_formation_energy_per_atom": "eV/atom", "mp20_band_gap": "eV", "mp20_e_above_hull": "eV/atom",
        "perov5_heat_ref": "eV/atom", "carbon24_energy_per_atom": "eV/atom", "mpts52_formation_energy_per_atom": "eV/atom",
        "jarvis_formation_energy_peratom": "eV/atom", "jarvis_optb88vdw_bandgap": "eV", "jarvis_mbj_bandgap": "eV",
        "jarvis_ehull": "eV/atom", "jarvis_bulk_modulus_kv": "GPa", "jarvis_shear_modulus_gv": "GPa",
        "jarvis_slme": "%", "jarvis_spillage": "",
    }
    assert set(expected) <= names
    for name, unit in expected.items():
        assert get_task(name).unit == unit
    with pytest.raises(ValueError, match="unknown task"):
        get_task("mp20_nonsense")


def test_missing_data_root_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYSTALFM_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="--data-root"):
        data_root()
    assert data_root(tmp_path) == tmp_path  # an explicit root wins over the environment


def test_hash_splits_are_stable_and_balanced():
    ids = [f"mp-{i}" for i in range(4000)]
    splits = [hash_split(i) for i in ids]
    assert splits == [hash_split(i) for i in ids]
    share = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert 0.77 < share["train"] < 0.83 and 0.08 < share["val"] < 0.12 and 0.08 < share["test"] < 0.12
    carved = [val_test_split(i) for i in ids]
    assert 0.45 < carved.count("test") / len(ids) < 0.55


def test_mp20_split_fractions_are_nested_and_disjoint(shared_data):
    task = get_task("mp20_band_gap")
    small = load_task_data(task, root=shared_data, fraction=0.01, seed=3, max_eval=8, progress=False)
    large = load_task_data(task, root=shared_data, fraction=0.02, seed=3, max_eval=8, progress=False)
    other = load_task_data(task, root=shared_data, fraction=0.01, seed=4, max_eval=8, progress=False)
    keys = lambda records: {r.key for r in records}  # noqa: E731
    assert small.available == {"train": 1847, "val": small.available["val"], "test": small.available["test"]}
    assert small.available["val"] + small.available["test"] == 7344  # the validation file, carved in two
    assert len(small.train) == 19 and len(large.train) == 37
    assert keys(small.train) < keys(large.train)  # nested for one seed
    assert keys(small.train) != keys(other.train)  # the seed draws the subset
    assert keys(small.val) == keys(other.val) and keys(small.test) == keys(large.test)  # eval sets never move
    assert not (keys(small.val) & keys(small.test)) and not (keys(large.train) & keys(large.test))
    assert all(r.band_gap is not None for r in small.train)


def test_jarvis_task_uses_the_official_leaderboard_split(shared_data):
    task = get_task("jarvis_bulk_modulus_kv")
    data = load_task_data(task, root=shared_data, max_train=30, max_eval=10, progress=False)
    table = {row["jid"]: row for row in json.loads((shared_data / "jarvis/derived/jarvis_dft_3d_subset_poscar_with_targets.json").read_text())}
    for split in ("train", "val", "test"):
        for record in data.split(split):
            row = table[record.key.split(":", 1)[1]]
            assert row["splits"]["bulk_modulus_kv"] == split
            assert record.properties["bulk_modulus_kv"] == pytest.approx(row["targets"]["bulk_modulus_kv"])
    assert sum(data.available.values()) == 881  # every crystal with this property, none without


def test_user_csv_task_keeps_going_past_bad_rows(shared_data, tmp_path):
    sample = shared_data / "jarvis" / "alignn_sample_data"
    lines = (sample / "id_prop.csv").read_text().splitlines()[:12]
    rows = [f"{sample / line.split(',')[0]},{line.split(',')[1]}" for line in lines]
    rows += [f"{sample / 'POSCAR-JVASP-0000.vasp'},1.0", f"{sample / lines[0].split(',')[0]},not-a-number"]
    (tmp_path / "gaps.csv").write_text("file,gap\n" + "\n".join(rows) + "\n")
    task = get_task(f"csv:{tmp_path / 'gaps.csv'}", target_name="optb88vdw_bandgap", unit="eV")
    assert task.name == "csv_optb88vdw_bandgap" and task.unit == "eV"
    data = load_task_data(task, progress=False)
    assert sum(len(data.split(s)) for s in ("train", "val", "test")) == 12
    reasons = sorted(r.reason.split(":")[0] for r in data.rejects)
    assert reasons == ["bad_label_type", "unparsable"]
    first = lines[0].split(",")
    record = next(r for s in ("train", "val", "test") for r in data.split(s) if r.key.endswith(first[0].rsplit(".", 1)[0]))
    assert record.properties["optb88vdw_bandgap"] == pytest.approx(float(first[1]))


def test_export_split_round_trips_through_the_structure_reader(shared_data, tmp_path):
    from data_pipeline.build.readers import open_reader
    from finetune.data import export_split

    task = get_task("jarvis_slme")
    out = export_split(task, "test", tmp_path / "holdout", root=shared_data)
    expected = load_task_data(task, root=shared_data, progress=False).test
    keys = (out / "keys.txt").read_text().split()
    assert keys == [r.key for r in expected] and len(keys) == 4
    reader = open_reader("structure_files", out)
    parsed = [reader.parse(entry) for entry in reader.scan()]
    assert sorted(r.num_atoms for r in parsed) == sorted(r.num_atoms for r in expected)
