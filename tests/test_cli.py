"""The one console script dispatches to each stage's subcommands."""
from __future__ import annotations

import subprocess
import sys

from crystalfm.cli import STAGES, main


def test_top_level_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert stage in out


def test_unknown_stage_is_an_error_with_usage(capsys):
    assert main(["bogus"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_console_script_and_module_entry_points_agree():
    out = subprocess.run([sys.executable, "-m", "crystalfm", "--help"], capture_output=True, text=True, check=True)
    assert "data" in out.stdout and "pretrain" in out.stdout
    for package in ("data_pipeline", "pretrain", "finetune"):
        res = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert f"crystalfm {package.replace('data_pipeline', 'data')}" in res.stdout or "usage" in res.stdout
