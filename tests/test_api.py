"""`crystalfm.load(...)`: embed and predict from pymatgen Structures, ASE Atoms and CIF paths, for a
release directory, a fine-tuned model directory and an MLflow `models:/...@best` URI (real store)."""
from __future__ import annotations

import csv

import numpy as np
import pytest

import crystalfm

TINY = {"name": "jepa_transformer", "width": 16, "num_layers": 1, "heads": 2, "num_frequencies": 2}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    import torch

    from pretrain.objectives import build_objective
    from pretrain.release import save_release

    torch.manual_seed(0)
    config = {"name": "vae", "encoder": dict(TINY), "latent_dim": 8}
    objective = build_objective(config)
    return save_release(objective, config, tmp_path_factory.mktemp("api") / "release", views=objective.batch_views())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same crystal as a Structure, as Atoms and as a CIF file, plus a CSV task of 40 crystals
    from the embedded sample (formation energies)."""
    from data_pipeline.build.readers import Reject, open_reader
    from data_pipeline.sample import sample_sources

    folder = tmp_path_factory.mktemp("api_inputs")
    (folder / "cif").mkdir()
    source = next(s for s in sample_sources() if s["kind"] == "cdvae_csv")
    reader = open_reader("cdvae_csv", source["path"])
    rows, structures = [], []
    for entry in reader.scan():
        if isinstance(entry, Reject):
            continue
        record = reader.parse(entry)
        name = f"cif/{record.key.split(':', 1)[-1]}.cif"
        structure = record.to_structure()
        structure.to(filename=str(folder / name))
        structures.append(structure)
        rows.append((name, record.formation_energy_per_atom))
    with open(folder / "formation_energy_per_atom.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("structure", "formation_energy_per_atom"), *rows])
    from pymatgen.io.ase import AseAtomsAdaptor

    return {"structure": structures[0], "atoms": AseAtomsAdaptor.get_atoms(structures[0]),
            "cif": folder / rows[0][0], "table": folder / "formation_energy_per_atom.csv", "others": structures[1:4]}


@pytest.fixture(scope="module")
def finetuned(release, inputs, tmp_path_factory):
    from finetune.cli import main

    root = tmp_path_factory.mktemp("api_runs")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    model_dir = root / "model"
    assert main(["train", f"csv:{inputs['table']}", "--unit", "eV/atom", "--encoder", str(release), "--mode", "frozen",
                 "--epochs", "2", "--batch-size", "8", "--save", str(model_dir), "--out", str(root),
                 "--tracking-uri", uri]) == 0
    return model_dir, uri


def test_release_embeds_structure_atoms_and_cif_alike(release, inputs):
    model = crystalfm.load(release)
    vectors = model.embed([inputs["structure"], inputs["atoms"], inputs["cif"]])
    assert vectors.shape == (3, TINY["width"]) and np.isfinite(vectors).all()
    np.testing.assert_allclose(vectors[1], vectors[0], atol=1e-5)  # one crystal, three spellings
    np.testing.assert_allclose(vectors[2], vectors[0], atol=1e-4)  # the CIF rounds coordinates
    single = model.embed(inputs["structure"])  # one input, not in a list
    np.testing.assert_allclose(single, vectors[:1], atol=1e-5)
    others = model.embed(inputs["others"])
    assert not np.allclose(others[0], vectors[0])  # different crystals, different vectors


def test_batching_does_not_change_embeddings(release, inputs):
    crystals = [inputs["structure"], *inputs["others"]]
    whole = crystalfm.load(release).embed(crystals)
    by_two = crystalfm.load(release, batch_size=2).embed(crystals)
    np.testing.assert_allclose(by_two, whole, atol=1e-5)


def test_finetuned_predicts_from_dir_and_registry_uri(finetuned, inputs):
    model_dir, uri = finetuned
    local = crystalfm.load(model_dir)
    assert local.target == "formation_energy_per_atom" and local.unit == "eV/atom"
    values = local.predict([inputs["structure"], inputs["atoms"], inputs["cif"]])
    assert values.shape == (3,) and np.isfinite(values).all()
    assert values[1] == pytest.approx(values[0], abs=1e-5)
    registered = crystalfm.load("models:/crystalfm-csv_formation_energy_per_atom@best", tracking_uri=uri)
    np.testing.assert_allclose(registered.predict(inputs["others"]), local.predict(inputs["others"]), atol=1e-6)
    assert local.embed(inputs["cif"]).shape == (1, TINY["width"])


def test_ase_calculator_reports_energy_of_the_cell(finetuned, inputs):
    model = crystalfm.load(finetuned[0])
    atoms = inputs["atoms"].copy()
    atoms.calc = model.calculator()
    assert atoms.get_potential_energy() == pytest.approx(model.predict(atoms)[0] * len(atoms), rel=1e-6)


def test_a_bad_input_is_named(release, inputs, tmp_path):
    model = crystalfm.load(release)
    with pytest.raises(ValueError, match=r"input 1 \(int\).*expected a pymatgen Structure"):
        model.embed([inputs["structure"], 42])
    with pytest.raises(ValueError, match=r"input 0 \('.*nope.cif'\).*no such file"):
        model.embed(str(tmp_path / "nope.cif"))
    broken = tmp_path / "broken.cif"
    broken.write_text("data_broken\n_cell_length_a 3.0\n")
    with pytest.raises(ValueError, match="broken.cif"):
        model.embed([inputs["cif"], broken])
    with pytest.raises(FileNotFoundError, match="not a crystalfm model"):
        crystalfm.load(tmp_path)


def test_store_moves_with_its_folder(release, inputs, tmp_path, monkeypatch):
    """Every artifact lives under the store's folder: move the folder, `models:/...@best` still loads."""
    import shutil

    from finetune.cli import main

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # nothing may land in the working directory (MLflow's ./mlruns)
    folder = tmp_path / "demo"
    uri = f"sqlite:///{folder / 'runs' / 'mlflow.db'}"
    assert main(["train", f"csv:{inputs['table']}", "--unit", "eV/atom", "--encoder", str(release), "--mode", "frozen",
                 "--epochs", "1", "--batch-size", "8", "--out", str(folder / "finetune"), "--tracking-uri", uri]) == 0
    assert list(elsewhere.iterdir()) == []
    before = crystalfm.load("models:/crystalfm-csv_formation_energy_per_atom@best", tracking_uri=uri)
    expected = before.predict(inputs["others"])

    moved = tmp_path / "moved" / "demo"
    moved.parent.mkdir()
    shutil.move(folder, moved)
    after = crystalfm.load("models:/crystalfm-csv_formation_energy_per_atom@best",
                           tracking_uri=f"sqlite:///{moved / 'runs' / 'mlflow.db'}")
    assert after.path.is_relative_to(moved / "runs" / "mlartifacts")
    np.testing.assert_allclose(after.predict(inputs["others"]), expected, atol=1e-6)
