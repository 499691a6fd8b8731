"""The build over ALL of ../shared/data (every layout, 25k records: `configs/data_shared_all.yaml`).

About 1.5 minutes on an idle 2-core machine. `.ci/test` (CI and the README's test command) sets
`CRYSTALFM_FULL_BUILD=1`; a plain `pytest` skips it, and test_build.py covers a representative subset
with one input of every reader kind."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_pipeline.build.stages import build
from data_pipeline.build.config import BuildConfig

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("CRYSTALFM_FULL_BUILD"), reason="set CRYSTALFM_FULL_BUILD=1 to build all of ../shared/data"),
]


def test_build_over_all_shared_data(shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository root
    config = BuildConfig.from_yaml(ROOT / "configs" / "data_shared_all.yaml").replace(out=str(tmp_path / "all"))
    m = build(config, progress=False, log=lambda _: None).manifest
    c = m["counts"]
    assert c["balanced"] and c["records_in"] == c["written"] + c["rejects"] + c["duplicates"] + c["excluded"]
    for name, s in m["sources"].items():
        assert s["records_in"] == s["written"] + s["rejects"] + s["duplicates"] + s["excluded"], name
        assert s["records_in"] > 0, name
    # Every MPtrj defect file loses exactly its one bad frame; the copies of good data are duplicates.
    for name, s in m["sources"].items():
        if name.startswith("mptrj_bad_"):
            assert s["rejects"] == 1 and s["written"] == 0, name
    assert m["sources"]["gnome_by_id_folder"]["duplicates"] == 1000  # the same CIFs as by_id.zip
    assert m["sources"]["mptrj_plain_json"]["duplicates"] == 749  # the .json is the .json.gz, unzipped
    assert sum(s["num_samples"] for s in m["splits"].values()) == c["written"] > 20000
    assert {"non_finite", "truncated_file", "unknown_element", "atoms_too_close", "degenerate_lattice",
            "label_shape", "bad_label_type", "missing_field"} <= set(c["rejects_by_code"])
