"""`crystalfm demo`, the README's first command, runs the whole chain on the embedded sample."""
from __future__ import annotations

import pytest

from crystalfm.demo import main


@pytest.mark.slow
def test_demo_runs_the_whole_chain(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRYSTALFM_SHARED_DATA", str(tmp_path / "no-shared-data"))  # the demo needs none
    assert main(["--out", str(tmp_path / "demo"), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "(not run)" not in out
    for name in ("vae", "latent_flow", "jepa"):
        assert (tmp_path / "demo" / "releases" / name / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "finetune").is_dir()
    assert "mlflow ui --backend-store-uri" in out

    from pretrain.release import load_pretrained

    flow = load_pretrained(tmp_path / "demo" / "releases" / "latent_flow")
    assert flow.release_config["objective"]["init_from"] is None  # the stage-2 release stands alone
