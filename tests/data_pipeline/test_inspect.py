"""`crystalfm data inspect`: summary text, decoded records, and the two PNGs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from data_pipeline.build.stages import build
from data_pipeline.build.config import BuildConfig
from data_pipeline.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_fixture_readers import KIND, crafted_rows, write_jsonl  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shard_set(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    config = BuildConfig.from_dict({
        "sources": [
            {"kind": KIND, "path": str(write_jsonl(tmp / "c.jsonl", crafted_rows())), "name": "crafted"},
            {"kind": "mptrj", "path": str(shared_data / "derived_layouts" / "mptrj" / "bad" / "nan_force.json"),
             "name": "mptrj_nan"},
        ],
        "out": str(tmp / "shards"), "executor": "inline", "splits": {"train": 0.5, "val": 0.5},
    })
    build(config, progress=False, log=lambda _: None)
    return tmp / "shards"


def test_inspect_prints_summary_records_and_writes_pngs(shard_set, tmp_path, capsys):
    assert main(["inspect", str(shard_set), "--records", "2", "--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "records in 28 = written 24 + rejects 2 + duplicates 2 + excluded 0" in text
    assert "rejects by code: missing_field 1, non_finite 1" in text
    assert "mptrj_nan" in text and "crafted" in text
    assert "forces" in text and "energy_per_atom" in text  # label statistics table
    record_lines = [line for line in text.splitlines() if line.startswith("  ") and " atoms, a/b/c " in line]
    assert len(record_lines) == 2
    for name in ("atoms_per_crystal.png", "elements_heatmap.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_inspect_default_plot_dir_and_missing_manifest(shard_set, tmp_path, capsys):
    assert main(["inspect", str(shard_set), "--records", "0"]) == 0
    assert (shard_set / "inspect" / "elements_heatmap.png").exists()
    assert main(["inspect", str(tmp_path)]) == 2
    assert "is not a finished shard set" in capsys.readouterr().err


def test_periodic_table_positions_are_unique():
    from data_pipeline.inspect_shards import periodic_position

    positions = [periodic_position(z) for z in range(1, 104)]
    assert len(set(positions)) == len(positions)
    assert periodic_position(26) == (3, 7)  # Fe: period 4, group 8
    assert periodic_position(79) == (5, 10)  # Au: period 6, group 11
