"""cluster/templates/netaddr.sh: the rendezvous address (Ray head, DeepSpeed master) other nodes can reach.

`pick_addr` is pure and tested directly. `node_addr` gathers candidates from `scontrol`, `ip`,
`hostname` and `getent`; the multi-node cases need a second node this machine does not have, so
those four commands are replaced by small scripts on PATH that answer as a Debian node would
(its /etc/hosts mapping the host name to 127.0.1.1). The last test runs the real commands here.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NETADDR = ROOT / "cluster" / "templates" / "netaddr.sh"


def sh(call: str, path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run(["bash", "-c", f"source {NETADDR}; {call}"], env=env, capture_output=True, text=True)


def test_pick_addr_skips_loopback_link_local_and_non_ipv4():
    assert sh("pick_addr 4 127.0.1.1 169.254.3.4 fd00::2 node7 10.1.2.3 192.168.0.9").stdout == "10.1.2.3\n"
    assert sh("pick_addr 4 '' 0.0.0.0 300.1.1.1 172.16.0.5").stdout == "172.16.0.5\n"


def test_pick_addr_allows_loopback_only_for_one_node():
    assert sh("pick_addr 1 127.0.1.1").stdout == "127.0.1.1\n"
    assert sh("pick_addr 1").stdout == "127.0.0.1\n"
    multi = sh("pick_addr 2 127.0.1.1 127.0.0.1")
    assert multi.returncode == 1 and multi.stdout == ""
    assert "127.0.1.1" in multi.stderr and "CRYSTALFM_MASTER_ADDR" in multi.stderr


def _fake_node(tmp: Path, *, node_addrs: dict[str, str], route_src: str | None, hostname_i: str) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(parents=True)
    cases = "\n".join(f'  {name}) echo "NodeName={name} Arch=x86_64 NodeAddr={addr} NodeHostName={name}";;'
                      for name, addr in node_addrs.items())
    scripts = {
        "scontrol": f'[ "$1 $2" = "show node" ] || exit 1\ncase "$3" in\n{cases}\n  *) exit 1;;\nesac\n',
        "ip": (f'echo "$4 via 10.0.0.1 dev eth0 src {route_src} uid 0"; echo "    cache"\n' if route_src
               else "exit 2\n"),
        "hostname": f'[ "$1" = "-I" ] && {{ echo "{hostname_i}"; exit 0; }}\necho nodeA\n',
        "getent": 'echo "127.0.1.1       STREAM nodeA"\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_node_addr_takes_the_route_to_another_node(tmp_path):
    fake = _fake_node(tmp_path, node_addrs={"nodeA": "nodeA", "nodeB": "10.0.0.12"}, route_src="10.0.0.11",
                      hostname_i="127.0.1.1 10.9.9.9")
    assert sh("node_addr nodeA nodeA nodeB", fake).stdout == "10.0.0.11\n"


def test_node_addr_falls_back_to_node_addr_then_hostname_I(tmp_path):
    fake = _fake_node(tmp_path, node_addrs={"nodeA": "10.0.0.11", "nodeB": "10.0.0.12"}, route_src=None,
                      hostname_i="10.9.9.9")
    assert sh("node_addr nodeA nodeA nodeB", fake).stdout == "10.0.0.11\n"
    fake2 = _fake_node(tmp_path / "b", node_addrs={"nodeA": "nodeA"}, route_src=None, hostname_i="127.0.1.1 10.9.9.9")
    assert sh("node_addr nodeA nodeA nodeB", fake2).stdout == "10.9.9.9\n"


def test_node_addr_fails_clearly_when_only_loopback_is_known(tmp_path):
    fake = _fake_node(tmp_path, node_addrs={"nodeA": "nodeA"}, route_src=None, hostname_i="127.0.1.1")
    out = sh("node_addr nodeA nodeA nodeB", fake)
    assert out.returncode == 1 and "CRYSTALFM_MASTER_ADDR" in out.stderr
    assert sh("node_addr nodeA nodeA", fake).stdout == "127.0.1.1\n"  # one node: loopback is fine


def test_node_addr_on_this_machine_is_an_ipv4_address():
    out = sh("node_addr $(hostname) $(hostname)")
    assert out.returncode == 0, out.stderr
    assert sh(f"is_ipv4 {out.stdout.strip()}").returncode == 0
