"""`python -m data_pipeline.build.readers KIND PATH`: a pre-build check of one raw source."""
from __future__ import annotations

from data_pipeline.build.readers.__main__ import main


def test_check_counts_rejects_by_code(shared_data, capsys):
    assert main(["mptrj", str(shared_data / "derived_layouts" / "mptrj" / "bad" / "truncated.json")]) == 0
    out = capsys.readouterr().out
    assert "accepted 11, rejected 1" in out and "truncated_file: 1" in out and "mp-24066-1-12" in out


def test_options_limit_and_bad_kind(shared_data, capsys):
    assert main(["cdvae_csv", str(shared_data / "perov_5" / "val.csv"), "--option", "source=p5",
                 "--option", "fast_cif=false", "--limit", "5"]) == 0
    assert "accepted 5, rejected 0" in capsys.readouterr().out
    assert main(["no_such_kind", "."]) == 2
    assert "unknown source kind" in capsys.readouterr().err
