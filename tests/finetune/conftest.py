"""Fixtures for the fine-tune tests: a tiny encoder preset, a real released objective saved with
`pretrain.release.save_release`, and small real MP-20 task data (from the shared `mp20_records`)."""
from __future__ import annotations

import pytest

# Small enough for 2 CPU cores; the token encoder needs no neighbour lists, so collation is cheap.
TINY_ENCODER = {"name": "jepa_transformer", "width": 16, "num_layers": 1, "heads": 2, "num_frequencies": 2}


@pytest.fixture(scope="session")
def tiny_encoder() -> dict:
    return dict(TINY_ENCODER)


@pytest.fixture(scope="session")
def release_dir(tmp_path_factory):
    """A real release of a (randomly initialised) VAE objective around the tiny encoder, recording
    the MLflow run of its pretraining as the trainer does."""
    import torch

    from pretrain.objectives import build_objective
    from pretrain.release import save_release

    torch.manual_seed(123)
    config = {"name": "vae", "encoder": dict(TINY_ENCODER), "latent_dim": 8}
    objective = build_objective(config)
    out = tmp_path_factory.mktemp("release") / "tiny-vae"
    return save_release(objective, config, out, views=objective.batch_views(), extra={"mlflow_run_id": "pretrain-run-0123"})


@pytest.fixture(scope="session")
def mp20_task_data(mp20_records):
    """40 / 12 / 12 real MP-20 crystals as the formation-energy task."""
    from finetune.data import TaskData
    from finetune.tasks import get_task

    task = get_task("mp20_formation_energy_per_atom")
    return TaskData(task, mp20_records[:40], mp20_records[40:52], mp20_records[52:64])
