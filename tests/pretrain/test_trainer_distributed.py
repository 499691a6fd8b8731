"""The trainer on real DeepSpeed engines with 2 CPU ranks (gloo), launched as real processes.

Launches (DeepSpeed process starts are slow, so each run is checked for several things):
  * a 2-node rendezvous: two `deepspeed.launcher.launch` processes with node ranks 0 and 1 and
    the master on 127.0.0.1, one CPU rank each; for ZeRO stages 0-3 the summed gradient of an
    accumulation step over uneven batches equals the single-process gradient of one big batch;
  * an uninterrupted 8-step run (reference losses, MLflow, release);
  * the same run stopped by SIGTERM (saves and exits 0), resumed and killed by SIGKILL, and
    resumed again: its losses equal the reference's step for step, and its weights are identical.
"""
from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "trainer_worker.py"

# Six DeepSpeed launches: allow for a busy machine beyond CI's per-test default.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

JOB = """\
run: {{name: {name}, root: {root}, seed: 3}}
data: {{shards: {shards}}}
objective: {{name: linear_energy, dim: 8, noise: 0.05}}
optim: {{name: adamw, lr: 0.01, grad_clip: 1.0}}
schedule: {{kind: warmup_cosine, warmup_steps: 2}}
train: {{max_steps: 8, grad_accum: 2, zero_stage: 2, log_every: 1}}
checkpoint: {{every_steps: 2, keep_last: 2}}
tracking: {{experiment: trainer-test}}
"""

# A shard-set manifest naming its sources (the runs log its digest; the model card its licences).
MANIFEST = {"schema_version": 1, "splits": {"train": {"sources": {"gnome": 10, "mp20": 54}}}}


def _world_info(nodes: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(nodes).encode()).decode()


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _launch(args: list[str], port: int, *, fault: str | None = None, node_rank: int = 0, nodes: dict | None = None,
            log: Path):
    from pretrain.distributed import free_port  # noqa: F401  (import check only)

    env = _env()
    if fault:
        env["CRYSTALFM_FAULT"] = fault
    cmd = [sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={_world_info(nodes or {'localhost': [0, 1]})}",
           f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}", str(WORKER), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _run(args, port, log, **kw) -> int:
    proc = _launch(args, port, log=log, **kw)
    return proc.wait(timeout=600)


def _losses(run_dir: Path) -> dict[int, float]:
    """step → loss from metrics.jsonl; a step logged twice (rerun after SIGKILL) must agree."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["step"] in out:
            assert out[record["step"]] == record["train/loss"], f"step {record['step']} rerun after resume differs"
        out[record["step"]] = record["train/loss"]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    from pretrain.distributed import free_port

    tmp = tmp_path_factory.mktemp("trainer")
    shards = tmp / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps(MANIFEST))
    out = {"tmp": tmp, "rc": {}}

    # 1. two launchers, node ranks 0 and 1, one CPU rank each: gradients for ZeRO 0-3.
    grads = tmp / "grads"
    grads.mkdir()
    port = free_port()
    nodes = {"node0": [0], "node1": [0]}
    procs = [_launch(["grads", str(grads)], port, node_rank=r, nodes=nodes, log=tmp / f"grads{r}.log") for r in (0, 1)]
    out["rc"]["grads"] = [p.wait(timeout=600) for p in procs]
    out["grads"] = grads

    # 2. reference run, then SIGTERM → resume + SIGKILL → resume.
    for name in ("ref", "res"):
        (tmp / f"{name}.yaml").write_text(JOB.format(name=name, root=tmp / "runs", shards=shards))
    out["rc"]["ref"] = _run(["train", str(tmp / "ref.yaml")], free_port(), tmp / "ref.log")
    out["rc"]["term"] = _run(["train", str(tmp / "res.yaml")], free_port(), tmp / "term.log", fault="3:TERM")
    out["latest_after_term"] = (tmp / "runs/res/checkpoints/latest").read_text()
    out["rc"]["kill"] = _run(["train", str(tmp / "res.yaml")], free_port(), tmp / "kill.log", fault="7:KILL")
    out["latest_after_kill"] = (tmp / "runs/res/checkpoints/latest").read_text()
    out["rc"]["final"] = _run(["train", str(tmp / "res.yaml")], free_port(), tmp / "final.log")
    return out


def _tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.is_file() else "(no log)"


def test_two_node_rendezvous_gradient_equals_single_process(runs):
    from safetensors.torch import load_file

    from data_pipeline.load.collate import collate
    from pretrain_trainer_fixtures import LinearEnergy, load_mp20

    assert runs["rc"]["grads"] == [0, 0], _tail(runs["tmp"] / "grads0.log") + _tail(runs["tmp"] / "grads1.log")
    records = {r.key: r for r in load_mp20(48)}
    for stage in (0, 1, 2, 3):
        keys = json.loads((runs["grads"] / f"keys_stage{stage}.json").read_text())  # [rank][micro-batch][key]
        sizes = [[len(batch) for batch in rank] for rank in keys]
        micro_atoms = [[sum(records[k].num_atoms for k in batch) for batch in rank] for rank in keys]
        assert sizes[0] != sizes[1] and micro_atoms[0] != micro_atoms[1], "ranks must see uneven batches"
        big = collate([records[k] for rank in keys for batch in rank for k in batch])
        model = LinearEnergy(dim=8)
        model.load_state_dict(load_file(str(runs["grads"] / f"init_stage{stage}.safetensors")))
        loss, _ = model.loss(big)  # one big batch, ordinary means
        loss.backward()
        got = load_file(str(runs["grads"] / f"grads_stage{stage}.safetensors"))
        for name, param in model.named_parameters():
            torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"ZeRO-{stage} {name}: {m}")


def test_sigterm_saves_and_exits_then_sigkill_resume_is_exact(runs):
    tmp = runs["tmp"]
    assert runs["rc"]["ref"] == 0, _tail(tmp / "ref.log")
    # SIGTERM to rank 0 after step 3: every rank agrees to stop after step 4, saves, exits 0.
    assert runs["rc"]["term"] == 0, _tail(tmp / "term.log")
    assert "got SIGTERM" in (tmp / "term.log").read_text()
    assert runs["latest_after_term"] == "step_00000004"
    # SIGKILL after step 7 (checkpoint at 6): the launcher fails; latest still names a complete step.
    assert runs["rc"]["kill"] != 0
    assert runs["latest_after_kill"] == "step_00000006"
    assert runs["rc"]["final"] == 0, _tail(tmp / "final.log")
    ref, res = _losses(tmp / "runs/ref"), _losses(tmp / "runs/res")
    assert sorted(ref) == list(range(1, 9)) and sorted(res) == list(range(1, 9))
    assert res == ref  # bit-identical, step for step
    assert len(set(ref.values())) == 8  # losses really change from step to step
    # keep_last=2, no half-written folders left behind
    ckpt = tmp / "runs/res/checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000006", "step_00000008"]
    assert (ckpt / "latest").read_text() == "step_00000008"
    meta = json.loads((ckpt / "step_00000008/meta.json").read_text())
    assert meta["step"] == 8 and meta["world_size"] == 2 and meta["config"]["train"]["zero_stage"] == 2
    # the run directory keeps the printed config
    assert "zero_stage: 2" in (tmp / "runs/res/config.yaml").read_text()


def test_mlflow_run_is_continued_and_names_its_data(runs):
    import hashlib

    import mlflow

    tmp = runs["tmp"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    run_id = (tmp / "runs/res/mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, 9))  # three processes, one MLflow run
    assert run.data.params["train.zero_stage"] == "2"
    for key in ("throughput/crystals_per_s", "throughput/atoms_per_s", "throughput/data_wait_frac", "train/grad_norm",
                "throughput/mem_gb_max_rank", "train/mean_energy"):
        assert key in run.data.metrics, key
    # One name per series, grouped as MLflow's UI groups charts, the same in metrics.jsonl (#17).
    from crystalfm_common.metrics import GROUPS, group_of

    assert all(group_of(k) in ("train", "val", "throughput") for k in run.data.metrics), sorted(run.data.metrics)
    records = [json.loads(line) for line in (tmp / "runs/res/metrics.jsonl").read_text().splitlines()]
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731  (MLflow keeps finite values)
    jsonl_keys = {k for r in records for k, v in r.items() if finite(v)} - {"step", "epoch", "time"}
    assert set(run.data.metrics) == jsonl_keys
    assert "train/loss" in jsonl_keys and "loss" not in jsonl_keys and set(GROUPS) >= {k.split("/")[0] for k in jsonl_keys}
    digest = hashlib.sha256((tmp / "shards/manifest.json").read_bytes()).hexdigest()
    assert run.data.tags["data.manifest_sha256"] == digest
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == digest[:36]
    assert run.info.artifact_uri.startswith((tmp / "runs/mlartifacts").as_uri())


def test_release_round_trip_and_registry(runs):
    import mlflow
    from safetensors.torch import load_file

    from data_pipeline.load.collate import collate
    from pretrain.release import load_pretrained, release_checkpoint, release_id
    from pretrain_trainer_fixtures import load_mp20, register

    register()
    tmp = runs["tmp"]
    ref = release_checkpoint(tmp / "runs/ref/checkpoints", tmp / "release_ref", alias="candidate")
    res = release_checkpoint(tmp / "runs/res/checkpoints/step_00000008", tmp / "release_res", alias="champion")
    # Exact resume: the interrupted run ends with the very same weights.
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(res / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in a.values())
    # Reloaded model gives identical outputs to the consolidated weights.
    model = load_pretrained(res)
    from pretrain_trainer_fixtures import LinearEnergy

    fresh = LinearEnergy(dim=8, noise=0.05).eval()
    fresh.load_state_dict(b)
    batch = collate(load_mp20(8))
    assert torch.equal(model.atom_energies(batch), fresh.atom_energies(batch))
    config = json.loads((res / "config.json").read_text())
    assert config["step"] == 8 and config["manifest_sha256"] and config["objective"]["name"] == "linear_energy"
    card = (res / "MODEL_CARD.md").read_text()
    assert "CC BY-NC 4.0" in card and "gnome" in card and "step 8" in card and "Intended use" in card
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    version = client.get_model_version_by_alias("crystalfm-linear_energy", "champion")
    assert version.tags["release_id"] == release_id(res)
    assert client.get_model_version_by_alias("crystalfm-linear_energy", "candidate").version != version.version
    # CLI: same consolidation through `crystalfm pretrain release`.
    from pretrain.cli import main

    assert main(["release", str(tmp / "runs/res/checkpoints"), "--out", str(tmp / "release_cli"), "--no-register"]) == 0
    assert release_id(tmp / "release_cli") == release_id(res)
