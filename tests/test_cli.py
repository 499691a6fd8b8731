"""The one console script dispatches to each stage's subcommands."""
from __future__ import annotations

import subprocess
import sys

from crystalfm.cli import STAGES, main


def test_top_level_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: crystalfm STAGE [args...]")
    for stage, (_, help_) in STAGES.items():
        assert f"  {stage:<10} {help_}" in out


def test_unknown_stage_is_an_error_with_usage(capsys):
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert "crystalfm: unknown stage 'bogus'" in err and "usage: crystalfm STAGE" in err


def test_console_script_and_module_entry_points_agree():
    out = subprocess.run([sys.executable, "-m", "crystalfm", "--help"], capture_output=True, text=True, check=True)
    assert "data" in out.stdout and "pretrain" in out.stdout
    # `python -m <package>` is the same parser as `crystalfm <stage>`: same program name, same commands.
    commands = {"data_pipeline": ("data", ["build", "inspect"]), "pretrain": ("pretrain", ["train", "release"]),
                "finetune": ("finetune", ["train", "predict"]), "discovery": ("discovery", ["generate", "evaluate", "screen", "refine"])}
    for package, (stage, names) in commands.items():
        res = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"usage: crystalfm {stage} "), res.stdout
        for name in names:
            assert name in res.stdout, (package, name, res.stdout)
