"""ZeRO scaling on CPU ranks: throughput at 1 vs 2 ranks and per-rank memory by stage (0/1/2/3).

    python benchmarks/zero_scaling.py [--steps 8] [--width 128] [--layers 2]

Launches `deepspeed.launcher.launch` twice (1 rank, then 2 ranks; gloo, DS_ACCELERATOR=cpu). Each
launch builds the real Trainer with the real VAE objective (PDDFormer encoder) once per ZeRO stage
and times `train_step()` on pre-collated MP-20 batches with the same atom budget per rank (weak
scaling: 2 ranks process twice the crystals per step). Per rank and stage it measures the bytes
of parameters, gradients and optimiser state this rank actually holds (tensors counted after a
step's backward / step) and the resident set size. Prints a table and the ratios
  scaling = throughput(2 ranks) / throughput(1 rank), optimiser memory(stage, 2 ranks) / stage 0.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = (0, 1, 2, 3)


# ---------------------------------------------------------------------- rank program
def _tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _memory(trainer, stage: int) -> dict:
    """Bytes this rank holds for parameters, gradients (right after backward) and optimiser state."""
    module = trainer.engine.module
    opt = trainer.engine.optimizer
    if stage == 3:
        params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in module.parameters())
    else:
        params = sum(p.numel() * p.element_size() for p in module.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in module.parameters() if p.grad is not None)
    partitioned = getattr(opt, "averaged_gradients", None)  # ZeRO-2/3: this rank's fp32 gradient partition
    if isinstance(partitioned, dict):
        grads += _tensor_bytes(list(partitioned.values()))
    inner = getattr(opt, "optimizer", opt)
    moments = _tensor_bytes([dict(s) for s in inner.state.values()])  # Adam exp_avg + exp_avg_sq (+ step)
    # ZeRO 1-3 also keep fp32 master partitions separate from the module's parameters (in fp32
    # training ZeRO-0 updates the module's parameters in place and keeps no copy).
    masters = 0
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        found = getattr(opt, name, None)
        if found is not None and stage > 0:
            masters += _tensor_bytes(list(found))
    return {"params": params, "grads": grads, "moments": moments, "masters": masters, "optimizer": moments + masters}


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT / "tests" / "pretrain"))
    from data_pipeline.load.collate import BatchViews, collate
    from pretrain.config import load_config
    from pretrain.distributed import init_distributed
    from pretrain.objectives import build_objective
    from pretrain.distributed import rank_memory_gb
    from pretrain.trainer import Trainer
    from pretrain_trainer_fixtures import load_mp20

    info = init_distributed("gloo")
    encoder = {"name": "pddformer", "width": args.width, "num_layers": args.layers, "rbf_bins": 32, "pdd_k": 24,
               "neighbor_rule": {"kind": "knn", "k": 12, "cutoff": 4.0}}
    objective_config = {"name": "vae", "latent_dim": 32, "encoder": encoder}
    records = load_mp20(8 * args.crystals)
    views = BatchViews.from_dict(build_objective(objective_config).batch_views())
    mine = records[info.rank * args.crystals:(info.rank + 1) * args.crystals]
    batch = collate(mine, views)  # the same packed batch every step: times compute + communication only

    class Repeat:
        def __init__(self):
            self.position = 0

        def __iter__(self):
            while True:
                self.position += 1
                yield batch

        def set_epoch(self, epoch): pass
        def state_dict(self): return {"position": self.position}
        def load_state_dict(self, state): self.position = state["position"]

    results = []
    for stage in STAGES:
        config = load_config(None, [
            f"run.root={args.out}", f"run.name=w{info.world_size}_z{stage}", "tracking.mlflow=false",
            "checkpoint.resume=none", f"train.zero_stage={stage}", "optim.lr=1e-4", f"train.max_steps={args.steps + 2}",
        ])
        torch.manual_seed(0)
        trainer = Trainer(config, objective=build_objective(objective_config), loader=Repeat(), log=lambda s: None)
        for _ in range(2):  # warm-up steps (first-call allocations, gloo connections)
            trainer.train_step()
        stats = trainer.forward_backward()
        memory = _memory(trainer, stage)
        trainer.optimizer_step()
        after = _memory(trainer, stage)  # optimiser state as it stands after a step
        memory.update(moments=after["moments"], masters=after["masters"], optimizer=after["optimizer"])
        dist.barrier()
        t0 = time.perf_counter()
        crystals = 0.0
        for _ in range(args.steps):
            stats = trainer.train_step()
            crystals += stats.crystals
        dist.barrier()
        elapsed = time.perf_counter() - t0
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, {**memory, "rss_gb": rank_memory_gb(trainer.device)})
        if info.rank == 0:
            results.append({"stage": stage, "world_size": info.world_size, "crystals_per_s": crystals / elapsed,
                            "atoms_per_step": stats.atoms, "ranks": gathered,
                            "num_params": sum(p.numel() for p in trainer.objective.parameters())})
        trainer.engine.destroy()
    if info.rank == 0:
        Path(args.result).write_text(json.dumps(results))


# ---------------------------------------------------------------------- driver
def launch(world: int, args, out: Path) -> list[dict]:
    result = out / f"world{world}.json"
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(world))}).encode()).decode()
    port = 29600 + world
    cmd = [sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={world_info}", "--master_addr=127.0.0.1",
           f"--master_port={port}", "--no_local_rank", str(Path(__file__).resolve()), "--worker", "--result", str(result),
           "--out", str(out), "--steps", str(args.steps), "--width", str(args.width), "--layers", str(args.layers),
           "--crystals", str(args.crystals)]
    # One core per rank, in both runs: scaling is measured in ranks, and two OpenMP threads per
    # process spin badly when the machine is busy.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    log = out / f"world{world}.log"
    with open(log, "w") as handle:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"{world}-rank launch failed ({code}); see {log}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--crystals", type=int, default=16, help="crystals per rank per step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    out = Path(tempfile.mkdtemp(prefix="zero_scaling_"))
    one, two = launch(1, args, out), launch(2, args, out)
    mib = 2**20
    print(f"VAE (PDDFormer width {args.width}, {args.layers} layers, {one[0]['num_params']:,} parameters), "
          f"{args.crystals} crystals per rank per step, fp32, {os.cpu_count()} CPU cores\n")
    print("| ZeRO | 1 rank crystals/s | 2 ranks crystals/s | scaling (2 vs 1) | efficiency | "
          "params MiB/rank (1→2) | grads MiB/rank (1→2) | optimizer MiB/rank (1→2) | RSS GiB/rank (2) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base_opt = two[0]["ranks"][0]["optimizer"]
    for a, b in zip(one, two):
        ra, rb = a["ranks"][0], b["ranks"][0]
        scale = b["crystals_per_s"] / a["crystals_per_s"]
        print(f"| {a['stage']} | {a['crystals_per_s']:.1f} | {b['crystals_per_s']:.1f} | {scale:.2f}x | {scale / 2:.0%} | "
              f"{ra['params'] / mib:.2f} → {rb['params'] / mib:.2f} | {ra['grads'] / mib:.2f} → {rb['grads'] / mib:.2f} | "
              f"{ra['optimizer'] / mib:.2f} → {rb['optimizer'] / mib:.2f} | "
              f"{max(r['rss_gb'] for r in b['ranks']):.2f} |")
    base_moments = two[0]["ranks"][0]["moments"]
    print("\noptimizer memory per rank at 2 ranks, relative to ZeRO-0: " + ", ".join(
        f"ZeRO-{b['stage']} {b['ranks'][0]['optimizer'] / base_opt:.2f}x" for b in two))
    print("  of which Adam moments: " + ", ".join(
        f"ZeRO-{b['stage']} {b['ranks'][0]['moments'] / base_moments:.2f}x" for b in two)
          + "; the rest is ZeRO's fp32 master partition (ZeRO-0 in fp32 keeps none)")
    print(f"(raw results: {out})")


if __name__ == "__main__":
    main()
