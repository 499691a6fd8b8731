"""`crystalfm demo`, the README's first command: the whole chain on embedded data, ending in a
result that means something (the fine-tuned head beats the mean predictor on held-out crystals)."""
from __future__ import annotations

import re

import pytest

from crystalfm.demo import main


def table_row(out: str, name: str) -> tuple[float, float]:
    match = re.search(rf"^\s+{re.escape(name)}\s+(-?[\d.]+)\s+(-?[\d.]+)", out, re.M)
    assert match, f"no summary row {name!r} in:\n{out}"
    return float(match.group(1)), float(match.group(2))


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_learns(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRYSTALFM_SHARED_DATA", str(tmp_path / "no-shared-data"))  # the demo needs none
    assert main(["--out", str(tmp_path / "demo"), "--steps", "3", "--epochs", "6"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 40, out
    head_mae, head_r2 = table_row(out, "fine-tuned VAE encoder (PDDFormer)")
    mean_mae, _ = table_row(out, "mean predictor")
    table_row(out, "composition baseline (Magpie + HGB)")  # present, whatever it scores
    assert head_mae < mean_mae and head_r2 > 0
    for name in ("vae", "latent_flow", "jepa"):
        assert (tmp_path / "demo" / "releases" / name / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "finetune" / "model" / "model.json").is_file()
    assert "mlflow ui --backend-store-uri" in out
    assert not list((tmp_path / "demo" / "runs").glob("mlruns"))

    from pretrain.release import load_pretrained

    flow = load_pretrained(tmp_path / "demo" / "releases" / "latent_flow")
    assert flow.release_config["objective"]["init_from"] is None  # the stage-2 release stands alone
