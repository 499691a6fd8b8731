"""pretrain/distributed.py: how a task started by srun becomes a rank (no launcher in between)."""
from __future__ import annotations

from pretrain.distributed import slurm_step_env

TASK = {"SLURM_JOB_ID": "4321", "SLURM_STEP_ID": "0", "SLURM_PROCID": "13", "SLURM_LOCALID": "5",
        "SLURM_NTASKS": "32", "MASTER_ADDR": "10.0.0.11"}


def test_srun_task_maps_to_rank_local_rank_world_and_port():
    env = slurm_step_env(TASK)
    assert env == {"RANK": "13", "LOCAL_RANK": "5", "WORLD_SIZE": "32", "MASTER_ADDR": "10.0.0.11",
                   "MASTER_PORT": str(20000 + 4321 % 20000)}  # the same port rule as cluster/templates/common.sh
    assert slurm_step_env({**TASK, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"


def test_batch_shell_and_non_slurm_processes_stay_single_rank():
    batch = {k: v for k, v in TASK.items() if k != "SLURM_STEP_ID"}
    assert slurm_step_env(batch) is None
    assert slurm_step_env({**TASK, "SLURM_STEP_ID": "4294967291"}) is None  # the batch step's special id
    assert slurm_step_env({}) is None
