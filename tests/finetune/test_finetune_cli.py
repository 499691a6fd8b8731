"""The whole flow through the CLI: release → train (pretrained and scratch) → compare → predict,
and a sweep on local Ray. Real store, real files, real data."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from finetune.cli import main

TRAIN = ["--epochs", "1", "--batch-size", "8", "--max-train", "16", "--max-eval", "8"]


@pytest.fixture()
def structures(shared_data, tmp_path):
    """A folder of 5 real JARVIS POSCARs and 2 MP-20-style CIFs... plus one broken CIF."""
    folder = tmp_path / "new_crystals"
    folder.mkdir()
    for path in sorted((shared_data / "jarvis" / "alignn_sample_data").glob("POSCAR-*.vasp"))[:5]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.cif").write_text("data_broken\n_cell_length_a 3.0\nloop_\n_atom_site_label\n")
    (folder / "notes.txt").write_text("ignored: not a structure file")
    return folder


@pytest.mark.slow
def test_release_train_compare_predict(release_dir, shared_data, structures, tmp_path, tiny_encoder, capsys):
    out = str(tmp_path / "runs")
    common = ["--out", out, "--data-root", str(shared_data), *TRAIN]
    model_dir = tmp_path / "heat_ref_model"
    assert main(["train", "perov5_heat_ref", "--encoder", str(release_dir), "--save", str(model_dir), *common]) == 0
    assert main(["train", "perov5_heat_ref", "--encoder", "scratch", "--encoder-config", json.dumps(tiny_encoder),
                 *common]) == 0
    capsys.readouterr()

    assert main(["compare", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "| perov5_heat_ref | scratch |" in printed and "(full)" in printed
    assert (tmp_path / "runs" / "comparison" / "comparison.csv").is_file()
    assert (tmp_path / "runs" / "comparison" / "mae_vs_fraction.png").is_file()

    predictions = tmp_path / "pred.csv"
    missing = tmp_path / "nope.cif"
    rc = main(["predict", str(model_dir), str(structures), str(missing), "--csv", str(predictions)])
    captured = capsys.readouterr()
    assert rc == 0  # the readable files are still predicted
    rows = list(csv.DictReader(predictions.open()))
    assert len(rows) == 5 and all(r["file"].endswith(".vasp") for r in rows)
    assert float(rows[0]["heat_ref (eV/atom)"]) == float(rows[0]["heat_ref (eV/atom)"])  # a number, not NaN
    assert "broken.cif" in captured.err and "nope.cif" in captured.err
    assert main(["predict", str(model_dir), str(structures), "--strict"]) == 1
    assert "heat_ref (eV/atom)" in capsys.readouterr().out
    assert main(["predict", str(structures), str(structures)]) == 2  # not a model: a clear error
    assert "not a fine-tuned model" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_on_local_ray(release_dir, shared_data, tmp_path, capsys):
    import yaml

    from finetune.tracking import Tracker, registered_model_name

    config = {
        "tasks": ["perov5_heat_ref"],
        "encoders": [str(release_dir), "scratch"],  # scratch: the release's architecture, random init
        "modes": ["frozen"],
        "fractions": [0.5],
        "seeds": [0],
        "train": {"epochs": 1, "batch_size": 8, "max_train": 16, "max_eval": 8, "head_hidden": [8],
                  "data_root": str(shared_data)},
        "backend": "ray",
        "cpus_per_run": 1,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "2 runs" in capsys.readouterr().out
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs")]) == 0
    tracker = Tracker(tmp_path / "runs")
    runs = tracker.client.search_runs([tracker.experiment_id("perov5_heat_ref")])
    assert sorted(r.data.tags["mode"] for r in runs) == ["frozen", "scratch"]
    assert all(r.info.status == "FINISHED" for r in runs)
    best = tracker.client.get_model_version_by_alias(registered_model_name("perov5_heat_ref"), "best")
    assert best.run_id in {r.info.run_id for r in runs}
    assert (tmp_path / "runs" / "comparison" / "comparison.md").is_file()
    # Started again, the sweep resumes: both runs are in the store, nothing is redone ...
    capsys.readouterr()
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--backend", "serial"]) == 0
    assert "2 runs already finished in the store: skipped" in capsys.readouterr().out
    assert len(tracker.client.search_runs([tracker.experiment_id("perov5_heat_ref")])) == 2
    # ... while a changed setting is a new run (and --rerun redoes finished ones).
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--backend", "serial",
                 "--set", "batch_size=4"]) == 0
    assert len(tracker.client.search_runs([tracker.experiment_id("perov5_heat_ref")])) == 4
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--backend", "serial", "--rerun"]) == 0
    assert len(tracker.client.search_runs([tracker.experiment_id("perov5_heat_ref")])) == 6
