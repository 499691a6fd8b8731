"""Two SLURM nodes with their own network stacks on this machine, driven through cluster/launch.sh.

The cluster (netns_slurm.py): node1 and node2, each a network + UTS namespace of its own (own
`eth0` on a private bridge, own loopback, own host name, no default route, names that do not
resolve), one slurmd in each, slurmctld and munged outside. A job's processes on node2 reach
node1 only through node1's bridge address, as on two hosts of a cluster network; a rendezvous on
a loopback address, or on whatever the host name happens to resolve to, fails here as it would
there. What is checked, through `cluster/launch.sh` and the templates, unchanged:

  (a) `launch.sh data --nodes 2`: a Ray head on node1 at its namespace address, a Ray worker on
      node2 that joins it, `crystalfm data build` as the driver; the worker runs build tasks,
      and the shards and manifest are byte-identical to a local single-process build. The job
      runs as a user with no Ray token yet (a fresh HOME), as on a cluster's first build.
  (b) `launch.sh pretrain --nodes 2 --gpus-per-node 1`: one DeepSpeed ZeRO-2 rank per node (gloo
      across the bridge), the real VAE with a PDDFormer encoder on the ShardLoader; one run is
      sent the time-limit warning (`scancel --signal=USR1 --batch`, what `--signal=B:USR1@GRACE`
      does) mid-run, saves, is requeued by its batch script and resumes on both nodes; its losses
      equal an uninterrupted 2-node run's, bit for bit, step for step (the trainer's CPU guarantee,
      pretrain/TRAINER.md: same world size, code, shards and threads).

Skipped, with the reason, where this machine cannot build the cluster: not root, SLURM or
iproute2/util-linux missing, or the kernel refusing network/UTS namespaces (an unprivileged
container, for instance). Any other failure to start fails the test.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LAUNCH = ROOT / "cluster" / "launch.sh"
sys.path.insert(0, str(HERE))
from netns_slurm import NamespacesUnavailable, NetnsSlurm, unavailable_reason  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"two namespace SLURM nodes cannot be built here: {reason}")
    nodes = NetnsSlurm(tmp_path_factory.mktemp("netns_slurm"))
    try:
        nodes.start()
    except NamespacesUnavailable as exc:
        nodes.stop()
        pytest.skip(f"network/UTS namespaces are not permitted on this machine: {exc}")
    except Exception as exc:
        nodes.stop()
        pytest.fail(f"could not start two namespace SLURM nodes: {exc}")
    yield nodes
    nodes.stop()


def _env(extra: dict | None = None) -> dict:
    # PYTHONPATH: the jobs, Ray's workers and the ranks import this checkout (not another editable one).
    return {**os.environ, "CRYSTALFM_PYTHON": sys.executable, "CRYSTALFM_CPU_RANKS": "1", "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0", "RAY_USAGE_STATS_ENABLED": "0", **(extra or {})}


def launch(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH), *args], cwd=ROOT, env=_env(env), capture_output=True, text=True,
                          timeout=timeout)


def submit(cluster: NetnsSlurm, *args: str, env: dict | None = None) -> str:
    job = launch(*args, env={**cluster.env, **(env or {})})
    assert job.returncode == 0, job.stderr
    return job.stdout.strip().split(";")[0]


def _job_output(log_dir: Path, job_id: str) -> str:
    found = list(log_dir.glob(f"*-{job_id}.out"))
    return found[0].read_text() if found else "(no job output)"


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else f"({path.name} missing)"


# ---------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def source(shared_data, tmp_path_factory) -> Path:
    """A data config over the first 40 real MP-20 crystals, in chunks small enough for many tasks."""
    tmp = tmp_path_factory.mktemp("two_node_data")
    csv_path = tmp / "mp20_small.csv"
    with gzip.open(shared_data / "mp_20" / "val.csv.gz", "rt") as src, open(csv_path, "w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=reader.fieldnames)
        writer.writeheader()
        for i, row in enumerate(reader):
            if i == 40:
                break
            writer.writerow(row)
    config = tmp / "data.yaml"
    config.write_text(json.dumps({"sources": [{"kind": "cdvae_csv", "path": str(csv_path), "name": "mp20"}],
                                  "splits": {"train": 0.8, "val": 0.2}, "chunk_size": 4, "shard_bytes": 65536}))
    return config


@pytest.fixture(scope="module")
def local_shards(source) -> Path:
    """The reference: `launch.sh data --local --inline`, one process on this machine."""
    out = source.parent / "local"
    local = launch("data", str(source), "--local", "--", "--out", str(out), "--inline", "--no-progress", timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    return out


def test_ray_head_on_node1_and_worker_on_node2_build_the_local_shards(cluster, source, local_shards, tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "shards"
    home = tmp_path / "home"  # a user with no ~/.ray/auth_token yet
    home.mkdir()
    job_id = submit(cluster, "data", str(source), "--nodes", "2", "--time", "10:00", "--log-dir", str(logs),
                    "--", "--out", str(out), "--no-progress", env={"HOME": str(home)})
    state = cluster.wait(job_id, timeout=600)
    output = _job_output(logs, job_id)
    job_dir = next(logs.glob(f"*-{job_id}"), logs)
    worker_log = job_dir / "ray-worker-node2-0.log"
    assert state == "COMPLETED", output + _read(job_dir / "ray-head-0.log")[-2000:] + _read(worker_log)[-2000:]
    head, worker = cluster.nodes["node1"], cluster.nodes["node2"]
    # The head is node1 at its namespace address; the worker on node2 joined it before the build began.
    assert f"Ray head {head}:" in output and "on node1, 2 node(s)" in output, output
    assert "[crystalfm] Ray: all 2 node(s) joined" in output, output + _read(worker_log)[-2000:]
    assert worker_log.is_file() and "Ray runtime started" in _read(worker_log), _read(worker_log)[-2000:]
    # Every build task ran on node2: with two nodes the head offers no CPUs to tasks (data.sbatch,
    # CRYSTALFM_RAY_HEAD_CPUS), so node1's CPUs stay the driver's. (With CPUs on the head, Ray placed
    # all of this small build's tasks on node1 even with node2 joined and idle.)
    ray_line = next((l for l in output.splitlines() if l.startswith("Ray: ")), "")
    assert f"{worker}: " in ray_line and f"{head}: " not in ray_line and "on 1 Ray node(s)" in ray_line, output
    # Byte-identical to the local build: every shard, and the manifest but for code_version.
    shards = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
    assert shards and shards == {p.name: p.read_bytes() for p in sorted(local_shards.glob("*.tar"))}
    two, local = (json.loads((d / "manifest.json").read_text()) for d in (out, local_shards))
    two.pop("code_version"), local.pop("code_version")
    assert two == local


# ---------------------------------------------------------------------- 2 nodes x 1 rank, ZeRO-2
TRAIN = """\
run: {{name: {name}, root: {root}, seed: 0}}
data: {{shards: {shards}, atom_budget: 128, num_workers: 0}}
objective:
  name: vae
  latent_dim: 8
  encoder: {{name: pddformer, width: 16, num_layers: 1, rbf_bins: 8, pdd_k: 8,
            neighbor_rule: {{kind: knn, k: 6, cutoff: 4.0}}}}
optim: {{lr: 1.0e-3}}
schedule: {{kind: warmup_cosine, warmup_steps: 2}}
train: {{max_steps: {steps}, zero_stage: 2, log_every: 1, precision: fp32}}
checkpoint: {{every_steps: 1000, keep_last: 2}}
tracking: {{experiment: two-node-test}}
"""
STEPS = 24


def _losses(run_dir: Path) -> dict[int, float]:
    """step → train/loss from metrics.jsonl; a step must appear once (none lost, none trained twice)."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["step"] not in out, f"step {record['step']} logged twice"
        out[record["step"]] = record["train/loss"]
    return out


def test_two_node_zero2_vae_signalled_requeued_resumes_with_the_uninterrupted_losses(cluster, local_shards,
                                                                                      tmp_path):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    configs = {}
    for name in ("signalled", "uninterrupted"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(TRAIN.format(name=name, root=runs, shards=local_shards, steps=STEPS))
    args = ("--nodes", "2", "--gpus-per-node", "1", "--time", "15:00", "--log-dir", str(logs))
    # Both jobs are queued now; the nodes are exclusive, so they take turns (the signalled one first).
    sig_id = submit(cluster, "pretrain", str(configs["signalled"]), *args, "--job-name", "signalled")
    ref_id = submit(cluster, "pretrain", str(configs["uninterrupted"]), *args, "--job-name", "uninterrupted")
    metrics = runs / "signalled" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    assert metrics.is_file(), _job_output(logs, sig_id)
    signalled = cluster.run("scancel", "--signal=USR1", "--batch", sig_id)
    assert signalled.returncode == 0, signalled.stderr
    states = {name: cluster.wait(job, timeout=900) for name, job in (("signalled", sig_id), ("uninterrupted", ref_id))}
    sig_dir, ref_dir = next(logs.glob(f"*-{sig_id}"), logs), next(logs.glob(f"*-{ref_id}"), logs)
    first, second = _read(sig_dir / "rank0-0.log"), _read(sig_dir / "rank0-1.log")
    assert states["uninterrupted"] == "COMPLETED", (_job_output(logs, ref_id) + _read(ref_dir / "rank0-0.log")[-3000:]
                                                    + _read(ref_dir / "rank1-0.log")[-3000:])
    assert states["signalled"] == "COMPLETED", (_job_output(logs, sig_id) + first[-3000:] + second[-3000:]
                                                + _read(sig_dir / "rank1-0.log")[-3000:])

    # One rank per node, each on its own host name; the master is node1's namespace address.
    master = cluster.nodes["node1"]
    for job_dir in (ref_dir, sig_dir):
        for rank, node in ((0, "node1"), (1, "node2")):
            log = _read(job_dir / f"rank{rank}-0.log")
            assert f"crystalfm rank {rank}/2 local 0 on {node} (slurm)" in log, log[-3000:]
            assert f"master {master}:" in log, log[-3000:]
    assert json.loads((runs / "uninterrupted" / "run_info.json").read_text())["world_size"] == 2

    # The warning reached both ranks mid-run; they stopped after the same step and saved; the batch
    # script requeued the job; the second start resumed on both nodes from that checkpoint.
    assert "rank 0 got SIGUSR1" in first and "rank 1 got SIGUSR1" in _read(sig_dir / "rank1-0.log")
    saved = [l for l in first.splitlines() if "saved checkpoint" in l]
    assert len(saved) == 1, first[-3000:]
    tag = saved[0].rsplit("/", 1)[1].strip()
    stopped_at = int(tag.split("_")[1])
    assert 3 <= stopped_at < STEPS, f"stopped at step {stopped_at}: the signal did not arrive mid-run"
    output = _job_output(logs, sig_id)
    assert "time limit near" in output and "step ended with status 0" in output, output
    assert "Restarts=1" in cluster.run("scontrol", "-o", "show", "job", sig_id).stdout
    assert f"resumed from {runs / 'signalled' / 'checkpoints' / tag}" in second, second[-3000:]
    assert "crystalfm rank 1/2 local 0 on node2 (slurm)" in _read(sig_dir / "rank1-1.log")

    # Losses: every step once, equal to the uninterrupted run's bit for bit, and really changing.
    ref, res = _losses(runs / "uninterrupted"), _losses(runs / "signalled")
    assert sorted(ref) == list(range(1, STEPS + 1)) and sorted(res) == list(range(1, STEPS + 1))
    assert res == ref
    assert len(set(ref.values())) == STEPS
