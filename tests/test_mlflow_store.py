"""A new SQLite MLflow store opened by several processes at once (parallel pretraining runs,
fine-tune Ray workers) is created once, under a lock, and every process gets a working client.

Without the lock this fails: two `crystalfm pretrain train` started together on a fresh run root
died in MLflow's schema migration with "No such constraint: 'uq_registered_models_name'" (seen
2026-12-03). Real processes and a real store, no mocks."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

OPENER = r"""
import sys, time
from pathlib import Path
go = Path(sys.argv[2])
import mlflow  # imported before the barrier, so every process reaches the store at the same time
from crystalfm_common.tracking import ensure_experiment, open_client
while not go.exists():
    time.sleep(0.005)
client = open_client(sys.argv[1])
experiment = ensure_experiment(client, "race", sys.argv[1])
run = client.create_run(experiment)
client.log_metric(run.info.run_id, "x", 1.0)
print(experiment)
"""


@pytest.mark.slow
def test_processes_opening_one_new_store_at_once_all_succeed(tmp_path: Path):
    repo = Path(__file__).resolve().parents[1]
    for attempt in range(2):  # the race needs the processes to meet in the migration; two rounds of four
        folder = tmp_path / f"store{attempt}"
        folder.mkdir()
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        go = folder / "go"
        procs = [subprocess.Popen([sys.executable, "-c", OPENER, uri, str(go)], cwd=repo, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        time.sleep(8)  # every process has imported mlflow and waits at the barrier
        go.touch()
        results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
        failed = [err[-600:] for rc, _, err in results if rc != 0]
        assert not failed, f"attempt {attempt}: {len(failed)} of 4 processes failed opening a new store:\n" + "\n".join(failed)
        experiments = {out.strip() for _, out, _ in results}
        assert len(experiments) == 1, f"one experiment expected, the processes saw {experiments}"
        from mlflow.tracking import MlflowClient

        runs = MlflowClient(uri).search_runs([experiments.pop()])
        assert len(runs) == 4
