"""benchmarks/build_scale.py keeps working: a 1,000-record run makes its three synthetic sources
in their real layouts, builds them with local Ray and reports every column (the 10k-1M numbers
are in benchmarks/results/build_scale.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_build_scale_benchmark_runs_end_to_end(shared_data, tmp_path):
    work = tmp_path / "bench"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "build_scale.py"), "--records", "1000", "--workers", "1",
                          "--no-strace", "--work", str(work)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (row,) = json.loads((work / "results.json").read_text())
    counts = json.loads((work / "1000" / "src" / "counts.json").read_text())
    assert counts == {"mptrj": 700, "gnome": 295, "polymorphs": 20}
    assert row["records_in"] == 1015 and row["rejects"] == 0  # perturbed crystals stay valid
    assert row["written"] + row["duplicates"] == 1015 and row["written"] > 900
    assert row["loader_samples"] == row["written"] and row["stages_s"]["parse"] > 0
    assert "| 1015 | yes |" in run.stdout
