"""scripts/validity_table.py's distances to the training crystals, against hand-computed values."""
from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "validity_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("validity_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wasserstein_of_element_count_histograms(table):
    assert table.wasserstein_of_histograms([0, 0, 5], [0, 0, 2]) == 0.0  # same distribution, other counts
    assert table.wasserstein_of_histograms([0, 1], [0, 0, 0, 1]) == pytest.approx(2.0)  # all mass moved 1 → 3
    # half at 2 and half at 4 against all at 3: each half moves by 1
    assert table.wasserstein_of_histograms([0, 0, 1, 0, 1], [0, 0, 0, 4]) == pytest.approx(1.0)


def test_total_variation_of_element_occurrences(table):
    assert table.total_variation(Counter(O=2, Li=2), Counter(O=1, Li=1)) == 0.0
    assert table.total_variation(Counter(O=1), Counter(Fe=3)) == pytest.approx(1.0)
    assert table.total_variation(Counter(O=3, Li=1), Counter(O=1, Li=1)) == pytest.approx(0.25)
