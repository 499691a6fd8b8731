"""The trainer's preflight: every rank must see the checkpoint directory rank 0 writes.

Two real CPU ranks (DeepSpeed's launcher, gloo) build the trainer: once with one shared directory
(training goes on, no token file is left behind), once with rank 1 pointed at another directory
by the trainer's test-only hook CRYSTALFM_TEST_RANK_CHECKPOINT_DIR (what a node-local disk looks
like): every rank stops before training, and the error names the directory, the rank and its host,
and what to do.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "trainer_worker.py"

JOB = """\
run: {{name: {name}, root: {root}, seed: 3}}
data: {{shards: {shards}}}
objective: {{name: linear_energy, dim: 8}}
train: {{max_steps: 2, zero_stage: 2, log_every: 1}}
tracking: {{mlflow: false}}
"""


def _launch_two_ranks(tmp: Path, name: str, extra_env: dict | None = None) -> tuple[int, str]:
    from pretrain.distributed import free_port

    shards = tmp / "shards"
    shards.mkdir(exist_ok=True)
    (shards / "manifest.json").write_text(json.dumps({"schema_version": 1, "splits": {}}))
    config = tmp / f"{name}.yaml"
    config.write_text(JOB.format(name=name, root=tmp / "runs", shards=shards))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(extra_env or {}))
    env.pop("MLFLOW_TRACKING_URI", None)
    world = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    log = tmp / f"{name}.log"
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={world}",
                             "--node_rank=0", "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER),
                             "train", str(config)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            timeout=600).returncode
    return rc, log.read_text()


def _shm_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")} if Path("/dev/shm").is_dir() else set()


@pytest.mark.slow
def test_two_ranks_sharing_the_directory_pass_and_leave_no_token(tmp_path):
    before = _shm_buffers()
    rc, log = _launch_two_ranks(tmp_path, "shared")
    assert rc == 0, log[-3000:]
    ckpt = tmp_path / "runs" / "shared" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert not list(ckpt.glob(".preflight-*"))
    # DeepSpeed's CPU shm all-reduce creates one 69 MB /dev/shm file per rank and never removes it;
    # init_distributed unlinks each rank's own once all have mapped them (pretrain/distributed.py)
    assert _shm_buffers() - before == set(), "a two-rank run left DeepSpeed all-reduce buffers in /dev/shm"


@pytest.mark.slow
def test_a_rank_that_cannot_see_the_directory_stops_every_rank_with_a_clear_error(tmp_path):
    elsewhere = tmp_path / "node_local_disk"
    elsewhere.mkdir()
    rc, log = _launch_two_ranks(tmp_path, "split", {"CRYSTALFM_TEST_RANK_CHECKPOINT_DIR": f"1:{elsewhere}"})
    assert rc != 0
    shared = tmp_path / "runs" / "split" / "checkpoints"
    assert f"checkpoint directory {shared} (written by rank 0 on" in log, log[-3000:]
    assert f"rank 1 on {os.uname().nodename}: {elsewhere}: rank 0's token file" in log
    assert "rank 0 on" not in log.split("not shared by every rank")[1].split("Checkpoints need")[0]
    assert "shared file system" in log
    assert not (tmp_path / "runs" / "split" / "metrics.jsonl").is_file()  # stopped before any step
    assert not list(shared.glob(".preflight-*"))


def test_single_process_preflight(tmp_path):
    from pretrain.checkpoint import CheckpointManager

    CheckpointManager(tmp_path / "ckpt").preflight()
    assert (tmp_path / "ckpt").is_dir() and not list((tmp_path / "ckpt").iterdir())
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(RuntimeError, match=r"rank 0 on .*cannot write there"):
        CheckpointManager(tmp_path / "file" / "ckpt").preflight()
