"""Process-group setup for the trainer: one place that knows about ranks, devices and backends.

Launchers (`deepspeed`, `python -m deepspeed.launcher.launch` one per node under srun, or
`torchrun`) set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. A plain
`python -m pretrain train ...` has none of them: it becomes a one-rank group on a free local port.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _set_single_process_env() -> None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    # SLURM without a launcher (srun one task per GPU) also works: map its variables.
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "MASTER_ADDR" in os.environ:
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join (or create) the default process group; returns this process's rank and device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _set_single_process_env()
    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    if backend == "auto":
        backend = "gloo" if on_cpu else accelerator.communication_backend_name()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not on_cpu:
        accelerator.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    device = torch.device("cpu") if on_cpu else torch.device(accelerator.device_name(local_rank))
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)


# ---------------------------------------------------------------------- rank helpers
def rank_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: allocator peak on GPUs, resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
