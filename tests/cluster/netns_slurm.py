"""Two real SLURM nodes on one machine, each in its own network and UTS namespace.

    this host: munged, slurmctld, the test         bridge cfm<PID>b  10.213.N.1/24
      ├── veth ── netns cfm<PID>n1: hostname node1, eth0 10.213.N.11, slurmd -N node1
      └── veth ── netns cfm<PID>n2: hostname node2, eth0 10.213.N.12, slurmd -N node2

Each node has its own network stack (its own loopback, its own `eth0`, no default route) and its
own host name, so whatever a job does between "nodes" goes over the bridge to the addresses given
here, exactly as between two hosts on a cluster network; nothing else on this machine is reached.
They still share the file system (as cluster nodes share a parallel file system), the process
table and the CPUs. The node names do not resolve (nothing adds them to /etc/hosts): SLURM knows
the nodes by `NodeAddr`, and everything the jobs need must cope, as on a cluster whose nodes have
no DNS entry for each other.

How the namespaces are entered matters (found on the development VM, SLURM 22.05): `nsenter
--net=/run/netns/NAME` plus `unshare --uts`, never `ip netns exec`, which remounts /sys and hides
/sys/fs/cgroup (slurmd then fails "Unable to initialize cgroup plugin"). `SlurmctldHost` names
this host with its bridge address, so the slurmds reach the controller over the bridge.

Needs root, `ip`, `nsenter`, `unshare` and the `slurm-wlm munge` packages. Names carry the test
process id; `start()` first removes what an earlier, crashed run left (namespaces, bridge, its
daemons, found by the state file it keeps in /run/crystalfm-netns/), and `stop()` removes
everything it made, daemons and job processes in the namespaces included, even after a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from local_slurm import LocalSlurm, _free_port, _which, missing_binaries

STATE_DIR = Path("/run/crystalfm-netns")
NET_TOOLS = ("ip", "nsenter", "unshare")
_NAME = re.compile(r"^cfm(\d+)(?:n\d+|b|h\d+)$")


class NamespacesUnavailable(RuntimeError):
    """This machine does not let us build the namespaces (not root, tools missing, or refused)."""


def unavailable_reason() -> str | None:
    """Why two namespace nodes cannot be built here, or None when they can be tried."""
    missing = missing_binaries() + [t for t in NET_TOOLS if shutil.which(t) is None]
    if missing:
        return (f"not installed: {', '.join(missing)} (run .ci/install.sh as root: apt-get install slurm-wlm munge "
                "iproute2 util-linux)")
    if os.geteuid() != 0:
        return "network namespaces, a bridge and slurmd need root; run the SLURM tests as root (CI does)"
    return None


def _sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(name: str) -> list[int]:
    out = _sh("ip", "netns", "pids", name, check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def _kill_all(pids: list[int], timeout: float = 15.0) -> None:
    """TERM, wait, then KILL what is left: only the pids given (processes this fixture started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def _remove_network(netns: list[str], bridge: str | None) -> None:
    for name in netns:
        if Path(f"/run/netns/{name}").exists():
            _kill_all(_netns_pids(name))
            _sh("ip", "netns", "del", name, check=False)
    if bridge:
        _sh("ip", "link", "del", bridge, check=False)


def clean_leftovers() -> list[str]:
    """Remove namespaces, bridges and daemons of earlier runs whose test process is gone."""
    removed = []
    if STATE_DIR.is_dir():
        for state_file in STATE_DIR.glob("*.json"):
            owner = int(state_file.stem)
            if _alive(owner):
                continue
            state = json.loads(state_file.read_text())
            _kill_all([p for p in state.get("pids", []) if _alive(p)])
            _remove_network(state.get("netns", []), state.get("bridge"))
            state_file.unlink()
            removed.append(f"run of pid {owner}")
    # Names without a state file (a run killed between creating them and writing it).
    for name in _sh("ip", "netns", "list", check=False).stdout.split():
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _remove_network([name], None)
            removed.append(name)
    for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _sh("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


def _free_subnet() -> int:
    """N for a 10.213.N.0/24 no interface or route of this machine uses."""
    used = _sh("ip", "-4", "-o", "addr", "show", check=False).stdout + _sh("ip", "-4", "route", "show",
                                                                            check=False).stdout
    start = os.getpid() % 200 + 20
    for n in [*range(start, 250), *range(20, start)]:
        if f"10.213.{n}." not in used:
            return n
    raise NamespacesUnavailable("no free 10.213.N.0/24 subnet for the test bridge")


class NetnsSlurm(LocalSlurm):
    """`start()` builds the network and starts munged, slurmctld and one slurmd per namespace node.

    `nodes`: name → address; `addr`: this host's bridge address; `env`: SLURM_CONF for clients."""

    def __init__(self, workdir: Path, n_nodes: int = 2, cpus_per_node: int = 1):
        super().__init__(workdir)
        self.tag = f"cfm{os.getpid()}"
        self.bridge = f"{self.tag}b"
        self.subnet = 0
        self.addr = ""
        self.netns: dict[str, str] = {}  # node name → namespace name
        self.nodes: dict[str, str] = {}  # node name → address
        self.n_nodes = n_nodes
        self.cpus_per_node = cpus_per_node
        self.state_file = STATE_DIR / f"{os.getpid()}.json"

    # -------------------------------------------------------------- network
    def _save_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({"netns": list(self.netns.values()), "bridge": self.bridge,
                                               "pids": self.pids}))

    def _build_network(self) -> None:
        self.subnet = _free_subnet()
        self.addr = f"10.213.{self.subnet}.1"
        self.nodes = {f"node{i}": f"10.213.{self.subnet}.{10 + i}" for i in range(1, self.n_nodes + 1)}
        self.netns = {node: f"{self.tag}n{i}" for i, node in enumerate(self.nodes, start=1)}
        self._save_state()  # before anything exists, so a crash at any point is cleaned next time
        first = _sh("ip", "link", "add", self.bridge, "type", "bridge", check=False)
        if first.returncode != 0:
            raise NamespacesUnavailable(f"`ip link add {self.bridge} type bridge` was refused: {first.stderr.strip()}")
        _sh("ip", "addr", "add", f"{self.addr}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i, (node, addr) in enumerate(self.nodes.items(), start=1):
            ns, host_end = self.netns[node], f"{self.tag}h{i}"
            made = _sh("ip", "netns", "add", ns, check=False)
            if made.returncode != 0:
                raise NamespacesUnavailable(f"`ip netns add {ns}` was refused: {made.stderr.strip()}")
            # The node's end is called eth0, as on a real node (the namespace is its own world).
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "link", "set", host_end, "master", self.bridge, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        probe = self.in_node(next(iter(self.nodes)), "hostname", check=False)
        if probe.returncode != 0:
            raise NamespacesUnavailable(f"entering a network + UTS namespace was refused: {probe.stderr.strip()}")

    def node_cmd(self, node: str, *cmd: str) -> list[str]:
        """A command line that runs `cmd` on `node`: in its network namespace, with its host name."""
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', node, *cmd]

    def in_node(self, node: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(self.node_cmd(node, *cmd), capture_output=True, text=True, timeout=60,
                             env={**os.environ, **self.env})
        if check and out.returncode != 0:
            raise RuntimeError(f"on {node}: {' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    # -------------------------------------------------------------- start
    def start(self, timeout: float = 60.0) -> "NetnsSlurm":
        clean_leftovers()
        self._build_network()
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        socket_path = d / "munge" / "munge.socket"  # a path, so the namespaced slurmds reach it too
        subprocess.run([_which("munged"), "--force", f"--key-file={key}", f"--socket={socket_path}",
                        f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'log' / 'munged.log'}",
                        f"--seed-file={d / 'munge' / 'munged.seed'}"], check=True, capture_output=True, timeout=30)
        self.pids.append(self._read_pid(d / "munge" / "munged.pid"))
        self._save_state()
        node_lines = "\n".join(f"NodeName={node} NodeAddr={addr} NodeHostname={node} CPUs={self.cpus_per_node} "
                               "State=UNKNOWN" for node, addr in self.nodes.items())
        conf = d / "slurm.conf"
        # cred_expire=5: a requeued job may start again 5 s after it ended (SLURM's default holds it
        # 120 s); sched_interval/bf_interval=1: the scheduler notices that within a second or two.
        conf.write_text(f"""\
ClusterName=crystalfm-netns
SlurmctldHost={self.host}({self.addr})
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=5
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}/%n
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'spool'}/slurmd-%n.pid
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log'}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=10
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
{node_lines}
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {"SLURM_CONF": str(conf)}
        env = {**os.environ, **self.env}
        subprocess.run([_which("slurmctld"), "-c", "-f", str(conf)], check=True, env=env, capture_output=True,
                       timeout=30)
        self.pids.append(self._read_pid(d / "slurmctld.pid"))
        self._save_state()
        for node in self.nodes:
            (d / "spool" / node).mkdir(exist_ok=True)
            started = subprocess.run(self.node_cmd(node, _which("slurmd"), "-f", str(conf), "-N", node),
                                     env=env, capture_output=True, text=True, timeout=30)
            if started.returncode != 0:
                raise RuntimeError(f"slurmd on {node} did not start: {started.stderr.strip()}")
            self.pids.append(self._read_pid(d / "spool" / f"slurmd-{node}.pid"))
            self._save_state()
        deadline = time.time() + timeout
        states: dict[str, str] = {}
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == len(self.nodes) and all(s in ("idle", "mix", "alloc") for s in states.values()):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"namespace SLURM nodes did not become ready ({states}); see {d / 'log'}")

    # -------------------------------------------------------------- stop
    def stop(self) -> None:
        """Daemons first (slurmds, slurmctld, munged), then anything left in the namespaces, then the network."""
        _kill_all([p for p in reversed(self.pids) if _alive(p)])
        self.pids = []
        _remove_network(list(self.netns.values()), self.bridge)
        if self.state_file.exists():
            self.state_file.unlink()
