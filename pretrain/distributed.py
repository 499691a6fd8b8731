"""Process-group setup for the trainer: one place that knows about ranks, devices and backends.

Where the rank numbers come from, first match wins:

1. a launcher (`deepspeed`, `python -m deepspeed.launcher.launch`, `torchrun`) set RANK /
   LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT: they are used as they are;
2. a SLURM job step (`srun`, one task per GPU, as `cluster/templates/pretrain.sbatch` starts
   ranks): RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = SLURM_NTASKS; MASTER_ADDR
   (exported by the batch script) defaults to the first host of SLURM_JOB_NODELIST and MASTER_PORT
   to 20000 + job id mod 20000, the same rule as `cluster/templates/common.sh`, so every task of
   the step agrees without talking;
3. nothing: a plain `python -m pretrain train ...` becomes a one-rank group on a free local port.

Under srun the trainer process itself is the task SLURM signals (no launcher in between), so a
SIGUSR1/SIGTERM reaches it directly and it has the whole grace period to finish its step and save.
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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


def slurm_step_env(environ=os.environ) -> dict[str, str] | None:
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for a task of a SLURM job step, else None.

    Only a task started by srun counts (SLURM_STEP_ID is set, and it is not the batch or extern
    step): a batch script's own shell also carries SLURM_PROCID=0 and the job's SLURM_NTASKS, and
    a `python -m pretrain train` typed there must stay a one-rank run, not wait for ranks that
    never start.
    """
    needed = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_JOB_ID")
    if any(k not in environ for k in needed):
        return None
    step = environ["SLURM_STEP_ID"]
    if not step.isdigit() or int(step) >= 0xFFFFFFF0:  # batch / extern / interactive steps have special ids
        return None
    job_id = int(environ["SLURM_JOB_ID"])
    return {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "MASTER_ADDR": environ.get("MASTER_ADDR") or _first_host(environ.get("SLURM_JOB_NODELIST", "")),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + job_id % 20000),
    }


def _first_host(nodelist: str) -> str:
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"SLURM_JOB_NODELIST={nodelist!r}: `scontrol show hostnames` failed ({exc}); "
                           "export MASTER_ADDR (the first node's address) before srun") from None
    return out[0]


def _set_process_env() -> str:
    """Fill the rendezvous variables (see the module docstring); returns where they came from."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "launcher"
    slurm = slurm_step_env()
    if slurm is not None:
        for key, value in slurm.items():
            os.environ.setdefault(key, value)
        return "slurm"
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return "local"


def placement(info: "DistInfo", source: str) -> str:
    """One line naming where this rank runs: host, ranks, device, CPUs it may use, OMP threads."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        cpu_text = f"{len(cpus)} CPU(s) {_ranges(cpus)}"
    except AttributeError:  # not Linux
        cpu_text = f"{os.cpu_count()} CPU(s)"
    return (f"crystalfm rank {info.rank}/{info.world_size} local {info.local_rank} on {socket.gethostname()} "
            f"({source}): device {info.device}, {cpu_text}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"master {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")


def _ranges(values: list[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def interface_towards(master_addr: str) -> str | None:
    """The network interface this host uses to reach `master_addr` (Linux), for gloo.

    Without GLOO_SOCKET_IFNAME gloo binds the address its host name resolves to, and falls back to
    loopback when the name does not resolve (compute nodes whose names are only in SLURM, or
    resolve to 127.0.1.1): ranks on other nodes then cannot connect. None for a loopback master
    (one host: gloo's default is right) or when the interface cannot be found."""
    import fcntl
    import socket
    import struct

    try:
        addr = socket.gethostbyname(master_addr) if master_addr else ""
        if not addr or addr.startswith("127."):
            return None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((addr, 9))  # UDP: no packet is sent, the kernel just picks the route
            local = probe.getsockname()[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as query:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(query.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
                except OSError:
                    continue
                if socket.inet_ntoa(packed[20:24]) == local:
                    return name
    except OSError:
        return None
    return None


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join (or create) the default process group; returns this process's rank and device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    source = _set_process_env()
    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    if backend == "auto":
        backend = "gloo" if on_cpu else accelerator.communication_backend_name()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # srun with --gpus-per-node shows every task all the node's GPUs (index = local rank); a site
    # that binds one GPU per task (--gpus-per-task=1, --gpu-bind) shows each task one: index 0.
    device_index = local_rank % max(1, accelerator.device_count()) if not on_cpu else 0
    if not on_cpu:
        accelerator.set_device(device_index)
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
        iface = interface_towards(os.environ.get("MASTER_ADDR", ""))
        if iface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = iface
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        if on_cpu and dist.get_world_size() > 1:
            dist.barrier()  # every rank has mapped every other rank's shm all-reduce buffer by now
            unlink_shm_allreduce_buffer(dist.get_rank())
    device = torch.device("cpu") if on_cpu else torch.device(accelerator.device_name(device_index))
    info = DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)
    if source != "local":
        print(placement(info, source), file=sys.stderr, flush=True)
    return info


def shm_allreduce_buffer(rank: int, environ=os.environ) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) creates for this rank
    when all ranks share a node: deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>."""
    addr, port = environ.get("MASTER_ADDR", ""), environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_shm_allreduce_buffer(rank: int) -> bool:
    """Remove this rank's shm all-reduce buffer once every rank has mapped it. DeepSpeed never
    unlinks it, so each multi-rank CPU run left 2 × 69 MB of RAM in /dev/shm until reboot (120 files,
    8.3 GB, on a test machine); the mappings stay valid after the unlink, and the memory is freed when
    the last rank exits, crash or not. Returns whether a file was removed."""
    try:
        shm_allreduce_buffer(rank).unlink()
        return True
    except FileNotFoundError:  # not all ranks on one node (DeepSpeed skips shm), or no shm op built
        return False


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
