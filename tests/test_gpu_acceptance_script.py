"""benchmarks/gpu_acceptance.sh stops at once, non-zero and saying why, where there is no CUDA device."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_it_fails_fast_and_clearly(tmp_path):
    env = {**os.environ, "CRYSTALFM_PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU host
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_acceptance.sh"), str(tmp_path / "out")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "gpu_acceptance: FAIL no CUDA device" in out.stderr and "nothing was checked" in out.stderr
    assert "PASS" not in out.stdout + out.stderr
    assert not list((tmp_path / "out").glob("*.log"))  # no check started


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_acceptance.sh")]).returncode == 0
