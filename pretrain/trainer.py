"""One DeepSpeed engine loop for every pretraining objective (VAE, joint latent flow, JEPA).

How one optimiser step works (`Trainer.train_step`):

1. data      each rank takes `grad_accum` micro-batches from its loader shard (time = data wait);
2. counts    one all-reduce sums atoms and crystals over every rank and micro-batch of the step
             (and carries the "stop" flag of a rank that got SIGTERM, so all ranks agree);
3. loss      the objective divides its per-atom terms by the global atom count and its per-crystal
             terms by the global crystal count (`LossNorm`), so the summed gradient over ranks and
             micro-batches is exactly the gradient of one big batch, however uneven the batches;
4. backward  `engine.backward(loss * world_size, scale_wrt_gas=False)`: DeepSpeed averages
             gradients over ranks and would divide by the accumulation steps; the world-size
             factor undoes the first, `scale_wrt_gas=False` turns off the second;
5. step      `engine.step()` after each micro-batch (DeepSpeed steps the optimiser, clips and
             advances the lr schedule only at the accumulation boundary); then the objective's
             `after_step()` hook (EMA targets; under ZeRO-3 with gathered parameters).

Model code never imports DeepSpeed: the objective is a plain nn.Module; this file wraps it.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from crystalfm_common.metrics import grouped, metric_name
from crystalfm_common.provenance import git_commit
from crystalfm_common.tracking import resolve_tracking_uri
from pretrain.checkpoint import CheckpointManager, rng_state, set_rng_state
from pretrain.config import JobConfig
from pretrain.distributed import DistInfo, init_distributed, rank_memory_gb, seed_all
from pretrain.optim import build_lr_scheduler, build_optimizer
from pretrain.parallelize import deepspeed_config, parallelize
from pretrain.objectives.base import LossNorm
from pretrain.tracking import MlflowTracker, NullTracker, manifest_sha256

FAULT_ENV = "CRYSTALFM_FAULT"  # "STEP:KILL" or "STEP:TERM": rank 0 sends itself that signal after STEP (tests)
# Test-only hooks (tests/cluster, tests/pretrain/test_checkpoint_preflight.py); never set them in a real run:
SLOW_SAVE_ENV = "CRYSTALFM_TEST_SLOW_SAVE_S"  # seconds a checkpoint saved after a stop signal takes longer
RANK_DIR_ENV = "CRYSTALFM_TEST_RANK_CHECKPOINT_DIR"  # "RANK:PATH": that rank uses PATH (a node-local disk)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class StepStats:
    loss: torch.Tensor  # local share of the global loss, summed over micro-batches
    atoms: float  # global over ranks and micro-batches
    crystals: float
    local_atoms: int
    local_crystals: int
    data_s: float
    compute_s: float
    padding: float  # mean token padding fraction of this rank's micro-batches (nan: no token view)
    metrics: dict[str, float]


class Trainer:
    """Builds objective, loader, DeepSpeed engine, checkpoints and tracking from one JobConfig.

    `objective` and `loader` may be passed in (tests, notebooks); otherwise they are built from
    `config.objective` (`pretrain.objectives.build_objective`) and `config.data`
    (`data_pipeline.load.loader.ShardLoader`).
    """

    def __init__(self, config: JobConfig, *, objective: torch.nn.Module | None = None, loader=None,
                 val_loader=None, log: Callable[[str], None] | None = None, verbose: bool = False):
        self.config = config
        self.verbose = verbose  # print the full config (it is always written to <run dir>/config.yaml)
        self._stop_signal: str | None = None
        self._previous_handlers = self._catch_stop_signals()  # during setup too: a warning then is kept
        self.dist: DistInfo = init_distributed(config.train.backend)
        self.rank, self.world_size, self.device = self.dist.rank, self.dist.world_size, self.dist.device
        self.is_main = self.rank == 0
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.run_dir = config.run_dir
        self._write_run_files()

        # Model init is identical on every rank; stochastic terms then differ per rank.
        seed_all(config.run.seed)
        if objective is None:
            from pretrain.release import build_with_init  # init_from is loaded before the objective is built

            objective = build_with_init(config.objective)
        self.objective = objective
        self.views = self.objective.batch_views()
        seed_all(config.run.seed + 1000 * (self.rank + 1))
        self.loader = loader if loader is not None else self._build_loader(config.data.train_split)
        self.val_loader = val_loader
        if self.val_loader is None and config.train.eval_every > 0 and loader is None:
            self.val_loader = self._build_loader(config.data.val_split, mode="epoch")

        optimizer = build_optimizer(self.objective, config)
        self.ds_config = deepspeed_config(config)
        self.engine, self.optimizer, self.lr_scheduler = parallelize(
            self.objective, optimizer, build_lr_scheduler(optimizer, config), self.ds_config)

        self.step = 0
        self.epoch = 0
        self._iter = None
        self._fresh_epoch = True  # call loader.set_epoch before the next iter() (False right after a resume)
        self._stop_agreed = False
        self.last_metrics: dict[str, float] = {}
        self._pending_steps = 0  # engine.step() calls of the current optimiser step so far
        self._grad_norm: float | None = None  # measured by optimizer_step when DeepSpeed reports none
        self._step_s = 0.0  # seconds of the last optimizer_step
        self._val_start: dict | None = None  # the validation loader's state at the first evaluation
        self.manifest_sha256 = manifest_sha256(config.data.shards) if config.data.shards else None
        self.checkpoints = CheckpointManager(_rank_checkpoint_dir(config.checkpoint_dir, self.rank),
                                             config.checkpoint.keep_last)
        self.checkpoints.preflight()  # every rank must see the directory rank 0 writes (shared file system)
        self.tracker = self._build_tracker()
        self.resumed_from = self._maybe_resume()
        # Setup is over: give the caller its handlers back until fit() (a trainer driven step by step, as
        # benchmarks and tests do, must still die on SIGTERM). A signal that came during setup is kept in
        # _stop_signal, so fit() stops after its first step and saves.
        self._restore_signal_handlers()

    # -------------------------------------------------------------- setup helpers
    def _write_run_files(self) -> None:
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = self.config.to_yaml()
        if self.verbose:
            self._log(f"crystalfm pretrain: full config\n{text}")
        else:
            self._log(f"crystalfm pretrain: {self.config.objective.get('name')} on {self.world_size} rank(s), "
                      f"{self.config.train.max_steps} steps → {self.run_dir} (config.yaml there; --verbose prints it)")
        (self.run_dir / "config.yaml").write_text(text)
        info = {"git_commit": git_commit(), "world_size": self.world_size, "backend": self.dist.backend,
                "device": str(self.device), "torch": torch.__version__, "argv": sys.argv,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2))

    def _build_loader(self, split: str, mode: str | None = None):
        from data_pipeline.load.collate import BatchViews
        from data_pipeline.load.loader import ShardLoader
        from data_pipeline.load.shard_list import split_shards

        data = self.config.data
        if not data.shards:
            raise ValueError("data.shards is empty: point it at a shard set made by `crystalfm data build` "
                             "(e.g. `data.shards=runs/shards`)")
        return ShardLoader(
            split_shards(data.shards, split), views=BatchViews.from_dict(self.views), atom_budget=data.atom_budget,
            max_crystals=data.max_crystals, rank=self.rank, world_size=self.world_size,
            num_workers=data.num_workers, mode=mode or data.mode, shuffle_buffer=data.shuffle_buffer,
            seed=self.config.run.seed, skip_corrupt=data.skip_corrupt)

    def _build_tracker(self):
        tracking = self.config.tracking
        if not (self.is_main and tracking.mlflow):
            return NullTracker()
        uri = resolve_tracking_uri(self.config.run.root, tracking.tracking_uri)
        tracker = MlflowTracker(tracking_uri=uri, experiment=tracking.experiment,
                                run_name=tracking.run_name or self.config.run.name, run_dir=self.run_dir,
                                run_root=Path(self.config.run.root))
        tracker.log_config(self.config.to_dict(), self.run_dir / "config.yaml")
        tracker.log_dataset(self.config.data.shards, self.manifest_sha256)
        tracker.set_tags({"objective": self.config.objective.get("name"), "world_size": self.world_size,
                          "zero_stage": self.config.train.zero_stage, "precision": self.config.train.precision,
                          "git_commit": git_commit()})
        return tracker

    def _maybe_resume(self) -> str | None:
        found = self.checkpoints.resolve(self.config.checkpoint.resume)
        if found is None:
            return None
        directory, tag = found
        state, meta = self.checkpoints.load(self.engine, directory, tag, self.world_size)
        self.step, self.epoch = int(meta["step"]), int(meta["epoch"])
        self.loader.load_state_dict(state["loader"])
        self._fresh_epoch = False
        set_rng_state(state["rng"])
        if self.is_main:
            self._log(f"crystalfm pretrain: resumed from {directory / tag} at step {self.step}")
        return str(directory / tag)

    # -------------------------------------------------------------- data
    def _next_batch(self):
        if self._iter is None:
            if self._fresh_epoch:
                self.loader.set_epoch(self.epoch)
            self._iter = iter(self.loader)
        try:
            return next(self._iter)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            self._iter = iter(self.loader)
            return next(self._iter)

    # -------------------------------------------------------------- one optimiser step
    def forward_backward(self) -> StepStats:
        """Data + counts + loss + backward for every micro-batch of one step (no optimiser step)."""
        t0 = time.perf_counter()
        batches = [self._next_batch() for _ in range(self.config.train.grad_accum)]
        data_s = time.perf_counter() - t0

        # Padding batches (copies that even out the last round across ranks) count nothing and weigh 0.
        local_atoms = sum(b.num_nodes for b in batches if not getattr(b, "padding", False))
        local_crystals = sum(b.num_crystals for b in batches if not getattr(b, "padding", False))
        counts = torch.tensor([local_atoms, local_crystals, float(self._stop_signal is not None)],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)  # [global atoms, global crystals, ranks asking to stop]
        norm = LossNorm(atoms=max(float(counts[0]), 1.0), crystals=max(float(counts[1]), 1.0))
        self._stop_agreed = bool(counts[2] > 0)

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        metric_sums: dict[str, float] = {}
        paddings = []
        self._pending_steps = 0
        for batch in batches:
            weight = 0.0 if getattr(batch, "padding", False) else 1.0
            if batch.token_mask is not None and weight:
                paddings.append(1.0 - float(batch.token_mask.float().mean()))
            batch = batch.to(self.device)  # stays fp32: autocast lowers only the network (pretrain/precision.py)
            loss, metrics = self.engine(batch, norm)
            loss = loss * weight
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            self._pending_steps += 1
            if self._pending_steps < len(batches):
                self.engine.step()  # not a boundary: DeepSpeed only advances its micro-step counter
            loss_sum += loss.detach().double()
            for key, value in (metrics or {}).items() if weight else ():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
        compute_s = time.perf_counter() - t0 - data_s
        n = max(1, sum(0 if getattr(b, "padding", False) else 1 for b in batches))
        return StepStats(loss=loss_sum, atoms=norm.atoms, crystals=norm.crystals, local_atoms=local_atoms,
                         local_crystals=local_crystals, data_s=data_s, compute_s=compute_s,
                         padding=float(np.mean(paddings)) if paddings else float("nan"),
                         metrics={k: v / n for k, v in metric_sums.items()})

    def optimizer_step(self) -> None:
        """The accumulation-boundary `engine.step()`, then the objective's after-step hook."""
        t0 = time.perf_counter()
        self._grad_norm = None
        if self.config.train.zero_stage == 0 and self.config.train.precision != "fp16":
            # DeepSpeed reports no norm for a plain fp32 optimiser (bf16 autocast keeps fp32 weights and
            # unscaled gradients); gradients are already all-reduced here.
            grads = [p.grad for p in self.objective.parameters() if p.grad is not None]
            self._grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
                if grads else None
        self.engine.step()
        self._after_step_hook()
        self.step += 1
        self._step_s = time.perf_counter() - t0

    def _after_step_hook(self) -> None:
        hook = getattr(self.objective, "after_step", None)
        if hook is None:
            return
        if self.config.train.zero_stage == 3:  # params are partitioned: gather, update on rank 0, re-scatter
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.objective.parameters()), modifier_rank=0):
                hook()
        else:
            hook()

    def train_step(self) -> StepStats:
        stats = self.forward_backward()
        self.optimizer_step()
        stats.compute_s += self._step_s
        return stats

    # -------------------------------------------------------------- metrics
    def _reduce_metrics(self, stats: StepStats) -> dict[str, float]:
        """All ranks: gather this step's numbers; returns the global view (on every rank)."""
        local = {"loss": float(stats.loss), "data_s": stats.data_s, "compute_s": stats.compute_s,
                 "padding": stats.padding, "mem_gb": rank_memory_gb(self.device), **stats.metrics}
        gathered: list[dict] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, local)
        step_s = max(g["data_s"] + g["compute_s"] for g in gathered)
        data_s = max(g["data_s"] for g in gathered)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._grad_norm
        # Names: crystalfm_common/metrics.py (train/, val/, throughput/), the same in metrics.jsonl,
        # MLflow and the model card. The objective's own "loss" is this rank's share: train/loss is global.
        train = {
            "loss": sum(g["loss"] for g in gathered),  # local shares of the global mean add up
            "lr": float(self.lr_scheduler.get_last_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        }
        throughput = {
            "crystals_per_s": stats.crystals / step_s if step_s > 0 else float("nan"),
            "atoms_per_s": stats.atoms / step_s if step_s > 0 else float("nan"),
            "crystals_per_step": stats.crystals,
            "atoms_per_step": stats.atoms,
            "budget_fill": stats.atoms / (self.world_size * self.config.train.grad_accum * self.config.data.atom_budget),
            "padding_fraction": float(np.nanmean([g["padding"] for g in gathered]))
            if any(g["padding"] == g["padding"] for g in gathered) else float("nan"),
            "data_wait_s": data_s,
            "compute_s": max(g["compute_s"] for g in gathered),
            "data_wait_frac": data_s / step_s if step_s > 0 else float("nan"),
            "mem_gb_max_rank": max(g["mem_gb"] for g in gathered),
            **{f"mem_gb_rank{r}": g["mem_gb"] for r, g in enumerate(gathered)},
        }
        keys = sorted(({k for g in gathered for k in g} - set(local) | set(stats.metrics)) - set(train))
        for key in keys:
            train[key] = float(np.mean([g[key] for g in gathered if key in g]))
        out = {**grouped("train", train), **grouped("throughput", throughput)}
        return out

    def evaluate(self) -> dict[str, float]:
        """Mean loss over `train.eval_batches` validation batches per rank (no gradients)."""
        if self.val_loader is None:
            return {}
        # The same validation batches every time: rewind the loader to where it started.
        if self._val_start is None:
            self._val_start = self.val_loader.state_dict()
        self.val_loader.load_state_dict(self._val_start)
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for i, batch in enumerate(self.val_loader):
                if i >= self.config.train.eval_batches:
                    break
                if getattr(batch, "padding", False):
                    continue
                loss, _ = self.engine(batch.to(self.device), LossNorm.of(batch))
                total += torch.tensor([float(loss), 1.0], dtype=torch.float64, device=self.device)
        self.engine.train()
        dist.all_reduce(total)
        return {metric_name("val", "loss"): float(total[0] / total[1])} if total[1] > 0 else {}

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self, pause_s: float = 0.0) -> Path:
        meta = {
            "step": self.step, "epoch": self.epoch, "world_size": self.world_size,
            # export_config() inlines what init_from pointed at, so a release never needs the
            # directory it was started from (stage 2 from a stage-1 release, refined generators).
            "config": self.config.to_dict(), "views": _jsonable(self.views),
            "objective": self.objective.export_config() if hasattr(self.objective, "export_config") else self.config.objective,
            "manifest_sha256": self.manifest_sha256, "git_commit": git_commit(),
            "metrics": self.last_metrics, "zero_stage": self.config.train.zero_stage,
            "precision": self.config.train.precision, "time": time.time(),
            "mlflow": {"tracking_uri": self.tracker.tracking_uri, "run_id": self.tracker.run_id},
        }
        rank_state = {"loader": self.loader.state_dict(), "rng": rng_state()}
        path = self.checkpoints.save(self.engine, self.step, rank_state, meta, pause_s=pause_s)
        if self.is_main:
            self._log(f"crystalfm pretrain: saved checkpoint {path}")
        return path

    # -------------------------------------------------------------- the loop
    def _catch_stop_signals(self) -> dict:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread (notebooks, test threads)
        return {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def _restore_signal_handlers(self) -> None:
        for s, handler in self._previous_handlers.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signal.Signals(signum).name
        rank = getattr(self, "rank", os.environ.get("RANK", "?"))  # may come before the process group exists
        print(f"crystalfm pretrain: rank {rank} got {self._stop_signal}: saving a checkpoint after this step",
              file=sys.stderr, flush=True)

    def fit(self) -> dict[str, Any]:
        """Train to `train.max_steps` (or until SIGTERM/SIGUSR1: then checkpoint and return)."""
        cfg = self.config
        self._catch_stop_signals()
        fault = _parse_fault(os.environ.get(FAULT_ENV)) if self.is_main else None
        metrics_file = open(self.run_dir / "metrics.jsonl", "a") if self.is_main else None
        bar = self._progress_bar()
        status = "finished"
        try:
            while self.step < cfg.train.max_steps:
                stats = self.train_step()
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps or self._stop_agreed:
                    self.last_metrics = self._reduce_metrics(stats)
                    if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                        self.last_metrics.update(self.evaluate())
                    self._emit(self.last_metrics, metrics_file, bar)
                if self._stop_agreed:
                    self.save_checkpoint(pause_s=float(os.environ.get(SLOW_SAVE_ENV) or 0))
                    status = "preempted"
                    break
                if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.train.max_steps:
                    self.save_checkpoint()
                if fault and fault[0] == self.step:
                    os.kill(os.getpid(), fault[1])
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        finally:
            self._restore_signal_handlers()
            if metrics_file:
                metrics_file.close()
            if bar is not None:
                bar.close()
        self.tracker.finish("KILLED" if status == "preempted" else "FINISHED")
        summary = {"status": status, "step": self.step, "run_dir": str(self.run_dir),
                   "checkpoint_dir": str(self.checkpoints.dir), "mlflow_run_id": self.tracker.run_id,
                   "tracking_uri": self.tracker.tracking_uri, "metrics": self.last_metrics}
        if self.is_main:
            self._log(f"crystalfm pretrain: {status} at step {self.step}; checkpoints in {self.checkpoints.dir}")
        return summary

    def _progress_bar(self):
        if not (self.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.train.max_steps, initial=self.step, desc="pretrain", unit="step")

    def _emit(self, metrics: dict[str, float], metrics_file, bar) -> None:
        if not self.is_main:
            return
        record = {"step": self.step, "epoch": self.epoch, "time": time.time(), **metrics}
        line = json.dumps(record, default=_json_float)
        metrics_file.write(line + "\n")
        metrics_file.flush()
        self.tracker.log_metrics(metrics, step=self.step)
        if bar is not None:
            bar.n = self.step
            bar.set_postfix(loss=f"{metrics[metric_name('train', 'loss')]:.4g}",
                            atoms_s=f"{metrics[metric_name('throughput', 'atoms_per_s')]:.0f}", refresh=False)
            bar.refresh()
        else:  # clusters: structured JSON lines on stdout
            print(line, flush=True)

    def close(self) -> None:
        self.tracker.finish()


def _parse_fault(value: str | None):
    if not value or value.lower() == "none":
        return None
    try:
        step, name = value.split(":")
        return int(step), getattr(signal, f"SIG{name.upper()}")
    except (ValueError, AttributeError):
        raise ValueError(f"{FAULT_ENV}={value!r}: expected STEP:SIGNAL, e.g. 7:KILL or 3:TERM") from None


def _rank_checkpoint_dir(directory: Path, rank: int) -> Path:
    """The checkpoint directory, or (test-only, RANK_DIR_ENV) another one for one rank."""
    hook = os.environ.get(RANK_DIR_ENV)
    if hook:
        hook_rank, _, path = hook.partition(":")
        if hook_rank.strip() == str(rank):
            return Path(path)
    return Path(directory)


def _json_float(value):
    return float(value)


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "__dict__", str(v))))


def train(config: JobConfig, verbose: bool = False) -> dict[str, Any]:
    """Build a trainer from config and train it (the body of `crystalfm pretrain train`)."""
    trainer = Trainer(config, verbose=verbose)
    return trainer.fit()
