"""CDVAE's generation metrics on hand-checkable cases, then on real MP-20 crystals."""
from __future__ import annotations

import csv
import gzip
import math

import numpy as np
import pytest

from data_pipeline.record import CrystalRecord
from discovery.generation_metrics import (COV_CUTOFFS, CompositionScaler, Fingerprints, coverage, density,
                                          fingerprints, generation_metrics, wasserstein)
from discovery.references import half_of, load_crystals
from discovery.validity import check_validity


def _rocksalt(z1=11, z2=17, a=5.64, key="t:rs"):
    lattice = np.array([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    return CrystalRecord(key, "t", [z1, z2], [[0, 0, 0], [0.5, 0.5, 0.5]], lattice)


def _fp(structure, composition):
    return Fingerprints(np.asarray(structure, dtype=float), np.asarray(composition, dtype=float))


# ---------------------------------------------------------------- validity fractions
def test_validity_fractions_count_close_atoms_and_unbalanced_charges():
    close = CrystalRecord("t:close", "t", [11, 17], [[0, 0, 0], [0.1, 0, 0]], np.eye(3) * 4.0)  # 0.4 Å apart
    nacl2 = CrystalRecord("t:nacl2", "t", [11, 17, 17], [[0, 0, 0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]], np.eye(3) * 5)
    samples = [_rocksalt(), close, nacl2, _rocksalt(key="t:rs2")]
    report = generation_metrics(samples, [_rocksalt()])
    m = report.metrics
    assert m["struct_valid"] == 0.75  # only the 0.4 Å pair fails
    assert m["comp_valid"] == 0.75  # only NaCl2 fails (NaCl, even the squeezed one, is charge neutral)
    assert m["valid"] == 0.5
    assert len(report.sample_density) == 2  # Wasserstein distances use the valid samples only


# ---------------------------------------------------------------- coverage
def test_identical_sets_cover_each_other_completely():
    rng = np.random.default_rng(0)
    fp = _fp(rng.uniform(0, 1, (20, 61)), rng.normal(0, 5, (20, 132)))
    cov = coverage(fp, fp, 0.4, 10.0)
    assert cov["cov_recall"] == 1.0 and cov["cov_precision"] == 1.0
    assert cov["amsd_recall"] == 0.0 and cov["amcd_precision"] == 0.0


def test_coverage_counts_against_both_cutoffs_by_hand():
    # Reference: two crystals. Sample 0 sits on reference 0; sample 1 is 0.5 away in structure
    # (beyond 0.4); sample 2 matches reference 0's structure but is far in composition.
    ref = _fp([[0, 0], [1, 0]], [[0, 0], [0, 0]])
    samples = _fp([[0, 0], [1.5, 0], [0, 0]], [[0, 0], [0, 0], [30, 0]])
    scaler = CompositionScaler(np.array([[0.0, 0.0], [2.0, 0.0]]))  # std 1 on feature 0, mean 1
    cov = coverage(samples, ref, 0.4, 10.0, scaler)
    assert cov["cov_precision"] == pytest.approx(1 / 3)
    assert cov["cov_recall"] == pytest.approx(1 / 2)  # reference 1 has no sample within 0.4
    # A failed fingerprint is a miss in precision's denominator, as in CDVAE.
    failed = _fp([[0, 0], [np.nan, np.nan]], [[0, 0], [0, 0]])
    assert coverage(failed, ref, 0.4, 10.0, scaler)["cov_precision"] == 0.5


def test_moving_samples_away_lowers_coverage():
    rng = np.random.default_rng(1)
    ref = _fp(rng.uniform(0, 1, (30, 61)), rng.normal(0, 1, (30, 132)))
    covs = []
    for shift in (0.0, 0.2, 0.5):
        moved = _fp(ref.structure + shift / math.sqrt(61), ref.composition)  # every sample moved `shift` away
        covs.append(coverage(moved, ref, 0.4, 10.0)["cov_precision"])
    assert covs[0] == 1.0 and covs[-1] < covs[0]
    assert covs == sorted(covs, reverse=True)


# ---------------------------------------------------------------- Wasserstein
def test_wasserstein_by_hand():
    assert wasserstein([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert wasserstein([1.0, 2.0], [2.0, 3.0]) == pytest.approx(1.0)  # a shift by 1
    assert wasserstein([2, 2], [1, 3]) == pytest.approx(1.0)


def test_density_of_rock_salt_by_hand():
    # NaCl, a = 5.64 Å: 4 formula units of 58.44 g/mol in a³ → 2.16 g/cm³; the primitive cell holds one.
    expected = 58.44 / 6.02214076e23 / ((5.64e-8) ** 3 / 4)
    assert density(_rocksalt()) == pytest.approx(expected, rel=1e-3)


# ---------------------------------------------------------------- real MP-20 crystals
@pytest.fixture(scope="module")
def small_mp20(shared_data):
    """50 crystals from each half of MP-20's validation file, the smallest cells (CrystalNN is slow)."""
    from pymatgen.core import Structure

    records = []
    with gzip.open(shared_data / "mp_20" / "val.csv.gz", "rt") as handle:
        for i, row in enumerate(csv.DictReader(handle)):
            if i >= 600:
                break
            structure = Structure.from_str(row["cif"], fmt="cif")
            records.append(CrystalRecord.from_structure(structure, key=f"mp20:{row['material_id']}", source="mp20"))
    records.sort(key=lambda r: (r.num_atoms, r.key))
    test = [r for r in records if half_of(r.key.split(":", 1)[1]) == "test"][:50]
    other = [r for r in records if half_of(r.key.split(":", 1)[1]) == "val"][:50]
    return test, other, fingerprints(test), fingerprints(other)


def test_the_carved_halves_are_finetunes_val_test_split(shared_data):
    from finetune.tasks import val_test_split

    ids = [f"mp-{i}" for i in range(2000)]
    assert [half_of(i) for i in ids] == [val_test_split(i) for i in ids]
    test = load_crystals(f"{shared_data / 'mp_20' / 'val.csv.gz'}:test")
    assert 0.45 < len(test) / 7344 < 0.55 and all(half_of(r.key.split(":", 1)[1]) == "test" for r in test)


@pytest.mark.slow
def test_real_crystals_against_real_crystals(small_mp20):
    test, other, test_fp, other_fp = small_mp20
    same = generation_metrics(test, test, sample_fp=test_fp, reference_fp=test_fp).metrics
    assert same["cov_recall"] == 1.0 and same["cov_precision"] == 1.0
    assert same["struct_valid"] == 1.0 and same["comp_valid"] > 0.8  # real crystals: MP-20 is ~90% SMACT-valid
    # The Wasserstein distances take the valid samples against the whole reference (CDVAE), so they
    # vanish for identical sets once the SMACT-invalid real crystals are left out of both.
    valid = [i for i, r in enumerate(test) if check_validity(r).valid]
    kept = [test[i] for i in valid]
    same_valid = generation_metrics(kept, kept, sample_fp=test_fp.take(valid), reference_fp=test_fp.take(valid)).metrics
    assert same_valid["wdist_density"] == 0.0 and same_valid["wdist_num_elems"] == 0.0

    real = generation_metrics(other, test, sample_fp=other_fp, reference_fp=test_fp).metrics
    assert real["cov_recall"] > 0.5 and real["cov_precision"] > 0.5, real
    assert real["wdist_density"] < 1.0 and real["wdist_num_elems"] < 0.5, real

    # Stretched cells (the same crystals, 1.25× the lattice): density falls by 1.25³, structures
    # barely change for CrystalNN (it is nearly scale-free), so only the density distance grows.
    stretched = [r.replace(lattice=r.lattice * 1.25) for r in other]
    far = generation_metrics(stretched, test, sample_fp=other_fp, reference_fp=test_fp).metrics
    assert far["wdist_density"] > real["wdist_density"] + 0.5
    assert far["wdist_num_elems"] == real["wdist_num_elems"]


def test_cutoffs_are_cdvaes():
    assert COV_CUTOFFS["mp20"] == {"struct": 0.4, "comp": 10.0}


def _write_rows(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _small_csvs(shared_data, tmp_path) -> None:
    """samples.csv and test.csv: 8 crystals each, the smallest cells of MP-20's validation file."""
    with gzip.open(shared_data / "mp_20" / "val.csv.gz", "rt") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = [next(reader) for _ in range(300)]
    rows.sort(key=lambda r: (len(r[header.index("cif")]), r[header.index("material_id")]))
    _write_rows(tmp_path / "samples.csv", header, rows[:8])
    _write_rows(tmp_path / "test.csv", header, rows[8:16])


@pytest.mark.slow
def test_evaluate_command_prints_one_table_logs_to_mlflow_and_plots(shared_data, tmp_path, capsys):
    """`discovery evaluate --no-vsun` on two small real CSVs (the smallest cells of the validation file)."""
    import json

    import mlflow

    from discovery.cli import main

    _small_csvs(shared_data, tmp_path)
    out = tmp_path / "eval"
    code = main(["evaluate", str(tmp_path / "samples.csv"), str(tmp_path / "samples.csv"), "--test-set",
                 str(tmp_path / "test.csv"), "--no-vsun", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for metric in ("struct_valid", "comp_valid", "cov_recall", "cov_precision", "wdist_density", "wdist_num_elems"):
        assert f"| {metric} |" in printed
    runs = json.loads((out / "generation_metrics.json").read_text())["runs"]
    assert len(runs) == 2 and runs[0] == runs[1]  # the same set twice: two identical sampling runs
    assert (out / "density_num_elements.png").stat().st_size > 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("crystalfm-discovery-evaluate")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["cov_recall"] == pytest.approx(runs[0]["cov_recall"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"evaluation.md", "density_num_elements.png"}


@pytest.mark.slow
def test_evaluate_artifacts_live_in_the_store_and_move_with_it(shared_data, tmp_path, monkeypatch):
    """Discovery runs keep their artifacts under the store's mlartifacts/ (#17, item 4), never in
    MLflow's ./mlruns of the working directory: move the store folder, read the artifact there."""
    import shutil

    import mlflow

    from crystalfm_common.tracking import local_artifact_path
    from discovery.cli import main

    _small_csvs(shared_data, tmp_path)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = tmp_path / "project" / "store"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert main(["evaluate", str(tmp_path / "samples.csv"), "--test-set", str(tmp_path / "test.csv"), "--no-vsun",
                 "--out", str(tmp_path / "eval"), "--tracking-uri", uri]) == 0
    assert list(elsewhere.iterdir()) == []
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("crystalfm-discovery-evaluate").experiment_id])
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())
    expected = (tmp_path / "eval" / "evaluation.md").read_text()

    moved = tmp_path / "moved" / "store"
    moved.parent.mkdir()
    shutil.move(store, moved)
    shutil.rmtree(tmp_path / "eval")  # the command's own --out copy is gone too: only the store remains
    moved_uri = f"sqlite:///{moved / 'mlflow.db'}"
    run = mlflow.MlflowClient(tracking_uri=moved_uri).get_run(run.info.run_id)
    folder = local_artifact_path(run.info.artifact_uri, moved_uri)
    assert folder.is_relative_to(moved / "mlartifacts")
    assert (folder / "evaluation.md").read_text() == expected
