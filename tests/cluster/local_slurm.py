"""A real single-node SLURM started privately in a temporary directory (munged + slurmctld + slurmd).

Nothing under /etc is touched: the munge key, socket, slurm.conf, spool and state directories all
live in `workdir`, and clients find the cluster through `SLURM_CONF`. `LocalSlurm.stop()` ends
exactly the daemons it started (by pid).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "srun", "scontrol")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSlurm:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.pids: list[int] = []
        self.env: dict[str, str] = {}

    # -------------------------------------------------------------- start
    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        socket_path = d / "munge" / "munge.socket"
        subprocess.run([_which("munged"), "--force", f"--key-file={key}", f"--socket={socket_path}",
                        f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'log' / 'munged.log'}",
                        f"--seed-file={d / 'munge' / 'munged.seed'}"], check=True, capture_output=True, timeout=30)
        self.pids.append(int((d / "munge" / "munged.pid").read_text()))
        conf = d / "slurm.conf"
        conf.write_text(f"""\
ClusterName=crystalfm-test
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=30
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
        self.env = {"SLURM_CONF": str(conf)}
        env = {**os.environ, **self.env}
        subprocess.run([_which("slurmctld"), "-c", "-f", str(conf)], check=True, env=env, capture_output=True, timeout=30)
        subprocess.run([_which("slurmd"), "-f", str(conf), "-N", self.host], check=True, env=env, capture_output=True,
                       timeout=30)
        for pid_file in ("slurmctld.pid", "slurmd.pid"):
            self.pids.append(self._read_pid(d / pid_file))
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"local SLURM did not become ready (node state {state!r}); see {d / 'log'}")

    @staticmethod
    def _read_pid(path: Path, timeout: float = 10.0) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if path.is_file() and path.read_text().strip():
                return int(path.read_text().strip())
            time.sleep(0.1)
        raise RuntimeError(f"{path} was not written")

    # -------------------------------------------------------------- jobs
    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env={**os.environ, **self.env, **kw.pop("env", {})}, capture_output=True,
                              text=True, **kw)

    def wait(self, job_id: str, timeout: float = 600.0) -> str:
        """Poll until the job leaves the queue; returns its final state from scontrol."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run("scontrol", "-o", "show", "job", job_id).stdout
            state = next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "")
            if state and state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED"):
                return state
            time.sleep(1.0)
        self.run("scancel", job_id)
        raise TimeoutError(f"SLURM job {job_id} did not finish in {timeout} s")

    # -------------------------------------------------------------- stop
    def stop(self) -> None:
        for pid in reversed(self.pids):  # slurmd, slurmctld, munged: only what we started
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.time() + 15
        for pid in self.pids:
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        self.pids = []
