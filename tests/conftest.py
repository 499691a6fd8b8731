"""Shared fixtures. Real data lives in ../shared/data beside the project root; tests that need it
skip with a clear reason when it is absent (it is never copied into the repository)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CRYSTALFM_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real shared data not found at {SHARED_DATA} (set CRYSTALFM_SHARED_DATA to its path)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri():
    """mlflow.set_tracking_uri() is process-global and also exports MLFLOW_TRACKING_URI: a test that
    tracks into its own store must not leak that store into the tests after it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    try:
        import mlflow
    except ImportError:  # pragma: no cover
        return
    if mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(before)  # None also clears the exported variable
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def pytest_configure(config):
    # Tests never touch a GPU or a team MLflow server by accident.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def mp20_records(shared_data):
    """The first 64 real MP-20 crystals (validation CSV), parsed with pymatgen into records.

    Independent of the data pipeline's readers, so model and kernel tests stand on their own."""
    import csv
    import gzip

    from pymatgen.core import Structure

    from data_pipeline.record import CrystalRecord

    records = []
    with gzip.open(shared_data / "mp_20" / "val.csv.gz", "rt") as handle:
        for row in csv.DictReader(handle):
            structure = Structure.from_str(row["cif"], fmt="cif")
            records.append(
                CrystalRecord.from_structure(
                    structure,
                    key=f"mp20:{row['material_id']}",
                    source="mp20",
                    formation_energy_per_atom=float(row["formation_energy_per_atom"]),
                    band_gap=float(row["band_gap"]),
                    e_above_hull=float(row["e_above_hull"]),
                )
            )
            if len(records) == 64:
                break
    return records
