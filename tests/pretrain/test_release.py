"""Releases from training checkpoints: ZeRO consolidation to fp32, strict reload without pickle,
model card with data licences, MLflow registry alias, clear errors for wrong paths."""
from __future__ import annotations

import json
import os

import pytest
import torch

from data_pipeline.load.collate import collate
from pretrain.config import load_config
from pretrain_trainer_fixtures import LinearEnergy, ListLoader, register

MANIFEST = {"schema_version": 1, "splits": {"train": {"sources": {"gnome": 3, "mp20": 40},
                                                      "labels": {"formation_energy_per_atom": {"mean": -1.2}}}}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mp20_records):
    """Two short in-process runs (ZeRO-0 and ZeRO-3) with checkpoints and MLflow."""
    from pretrain.trainer import Trainer

    register()
    tmp = tmp_path_factory.mktemp("release")
    shards = tmp / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps(MANIFEST))
    out = {"tmp": tmp, "records": mp20_records}
    for stage in (0, 3):
        config = load_config(None, [f"run.root={tmp / 'runs'}", f"run.name=z{stage}", f"data.shards={shards}",
                                    "objective={name: linear_energy, dim: 8}", f"train.zero_stage={stage}",
                                    "train.max_steps=2", "checkpoint.every_steps=2", "optim.lr=0.05",
                                    "tracking.experiment=release-test"])
        torch.manual_seed(0)
        trainer = Trainer(config, objective=LinearEnergy(dim=8), loader=ListLoader(mp20_records[:32]), log=lambda s: None)
        trainer.fit()
        out[stage] = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()} if stage == 0 else None
        trainer.engine.destroy()
    return out


@pytest.mark.slow
def test_release_round_trip_zero0_and_zero3(trained):
    from pretrain.release import load_pretrained, read_release_config, release_checkpoint

    tmp = trained["tmp"]
    batch = collate(trained["records"][:6])
    outputs = {}
    for stage in (0, 3):
        out = release_checkpoint(tmp / f"runs/z{stage}/checkpoints", tmp / f"rel{stage}", alias=f"z{stage}")
        assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "config.json", "model.safetensors"]
        model = load_pretrained(out)  # strict load into a freshly built objective, safetensors only
        outputs[stage] = model.atom_energies(batch)
        config = read_release_config(out)
        assert config["step"] == 2 and config["training"]["zero_stage"] == stage
        assert config["normalization"]["labels"] == {"formation_energy_per_atom": {"mean": -1.2}}
        assert len(config["manifest_sha256"]) == 64
    # ZeRO-0: the release equals the engine's own final weights exactly.
    reference = LinearEnergy(dim=8).eval()
    reference.load_state_dict(trained[0])
    assert torch.equal(outputs[0], reference.atom_energies(batch))
    # ZeRO-3 partitions were gathered into a full model that produces finite, different-from-init outputs.
    assert torch.isfinite(outputs[3]).all()


@pytest.mark.slow
def test_model_card_and_registry(trained):
    import mlflow

    from pretrain.release import release_id

    tmp = trained["tmp"]
    card = (tmp / "rel0" / "MODEL_CARD.md").read_text()
    for text in ("## Method", "## Training", "## Data", "## Intended use", "CC BY-NC 4.0", "non-commercial",
                 "CC BY 4.0 (Materials Project)", "step 2", "ZeRO stage 0"):
        assert text in card, text
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    version = client.get_model_version_by_alias("crystalfm-linear_energy", "z3")
    assert version.tags["release_id"] == release_id(tmp / "rel3")
    # the model version points at the release logged as artifacts of its training run
    run_id = (tmp / "runs/z3/mlflow_run_id").read_text().strip()
    assert version.run_id == run_id
    names = [a.path for a in client.list_artifacts(run_id)]
    assert f"release-{release_id(tmp / 'rel3')}" in names


@pytest.mark.slow
def test_training_and_release_leave_later_commands_their_own_store(trained, tmp_path):
    """Training in-process (the module fixture) and releasing must not leave MLflow's process-global
    tracking URI (and the $MLFLOW_TRACKING_URI it exports) on the training store: a later command of
    the same process, given its own --out, logs there. Before the fix, `discovery screen --evaluate`
    run after this file logged into the release test's store (order-dependent suite)."""
    import mlflow

    from crystalfm_common.tracking import resolve_tracking_uri
    from discovery.tracking import log_evaluation
    from pretrain.release import release_checkpoint

    store = trained["tmp"] / "runs"
    release_checkpoint(store / "z0" / "checkpoints", tmp_path / "rel", alias="later-commands")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert str(store) not in mlflow.get_tracking_uri()
    later = tmp_path / "later"
    assert resolve_tracking_uri(later) == f"sqlite:///{later.resolve() / 'mlflow.db'}"
    uri, run_id = log_evaluation(later, "later-command", "eval", {}, {"x": 1.0})
    assert uri == f"sqlite:///{later.resolve() / 'mlflow.db'}"
    assert mlflow.MlflowClient(uri).get_run(run_id).data.metrics == {"x": 1.0}


def test_tracker_puts_the_process_tracking_uri_back(tmp_path, monkeypatch):
    """`MlflowTracker` points the fluent API at its store while the run is open, and `finish` restores
    what was there before: nothing, or a caller's own $MLFLOW_TRACKING_URI."""
    import mlflow

    from pretrain.tracking import MlflowTracker

    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    outer = f"sqlite:///{tmp_path / 'outer' / 'mlflow.db'}"
    for before in (None, outer):
        if before is not None:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
        tracker = MlflowTracker(tracking_uri=store, experiment="restore", run_name="r", run_dir=tmp_path / f"run-{bool(before)}",
                                run_root=tmp_path / "store")
        assert mlflow.get_tracking_uri() == store
        tracker.log_metrics({"x": 1.0}, step=1)
        tracker.finish()
        tracker.finish()  # Trainer.close() after fit() finishes again
        assert os.environ.get("MLFLOW_TRACKING_URI") == before
        assert mlflow.MlflowClient(store).get_run(tracker.run_id).data.metrics == {"x": 1.0}
    assert mlflow.get_tracking_uri() == outer


def test_wrong_paths_say_what_to_do(tmp_path):
    from pretrain.release import load_pretrained, release_checkpoint

    with pytest.raises(FileNotFoundError, match="crystalfm pretrain release"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a crystalfm checkpoint"):
        release_checkpoint(tmp_path, tmp_path / "out", register=False)


def test_licences():
    from pretrain.release import licence_of

    assert licence_of("gnome") == "CC BY-NC 4.0 (non-commercial use only)"
    assert licence_of("mp20").startswith("CC BY 4.0") and licence_of("mptrj").startswith("CC BY 4.0")
    assert licence_of("my_lab_cifs").startswith("unknown")


def test_release_refuses_mlflow_reserved_alias_before_writing(tmp_path):
    from pretrain.cli import main

    # 'latest' is reserved by MLflow's registry; the error comes before any checkpoint is read
    assert main(["release", str(tmp_path / "no-checkpoint"), "--out", str(tmp_path / "rel"), "--alias", "latest"]) == 2
    assert not (tmp_path / "rel").exists()
