"""Sweeps: tasks × encoders × modes × fractions × seeds, each an independent fine-tune run.

    expand(sweep)            the run configs, in a fixed order: releases once per mode in `modes`;
                             "scratch" once per cell, as the first release's architecture randomly
                             initialised (or `train.encoder_config` when given); "baseline" once per
                             cell: the composition baseline (finetune.baseline: Magpie + gradient
                             boosting, and the training-mean predictor), same data, fractions, seeds
                             With `lr_grid` and `lr_select: first_seed`, the sweep's first seed
                             chooses each cell's learning rate and its runs are listed first
    select_shard(runs, i, n) runs[i::n]: a SLURM array task runs its share (`--shard i/n`, or
                             SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT when set)
    run_sweep(sweep)         the driver prepares the MLflow store (schema, experiments), runs the
                             configs serially or as Ray tasks (local Ray, or the cluster named by
                             RAY_ADDRESS), never lets one failed run stop the rest, then registers
                             the best run per task and prints the comparison table

Ray tasks reserve `cpus_per_run` CPUs and `gpus_per_run` GPUs each, so a single GPU node packs
several small fine-tunes.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

from finetune.config import BASELINE, FinetuneConfig, SweepConfig
from finetune.tasks import REPO_ROOT


@dataclass
class RunSummary:
    task: str
    encoder: str
    mode: str
    fraction: float
    seed: int
    ok: bool
    run_id: str | None = None
    test_mae: float | None = None
    error: str | None = None


def expand(sweep: SweepConfig, overrides: dict | None = None) -> list[FinetuneConfig]:
    train = {**sweep.train, **(overrides or {})}
    releases = [e for e in sweep.encoders if e not in ("scratch", BASELINE)]
    runs = []
    for task in sweep.tasks:
        for encoder in sweep.encoders:
            if encoder == "scratch":
                # The baseline is the architecture of the (first) release unless one is named.
                if train.get("encoder_config") is None and not releases:
                    raise ValueError("sweep: 'scratch' needs train.encoder_config or a release among encoders")
                cells = [("scratch" if train.get("encoder_config") is not None else releases[0], "scratch")]
            elif encoder == BASELINE:
                cells = [(BASELINE, BASELINE)]
            else:
                cells = [(encoder, mode) for mode in sweep.modes]
            for source, mode in cells:
                for fraction in sweep.fractions:
                    for seed in sweep.seeds:
                        fields = {**train, "task": task, "encoder": source, "mode": mode, "fraction": fraction,
                                  "seed": seed, "register": False}
                        if mode in ("scratch", BASELINE):
                            fields["head_init"] = "random"  # nothing pretrained to start a head from
                        if train.get("lr_grid") and train.get("lr_select_seed") is None:
                            fields["lr_select_seed"] = sweep.seeds[0]  # first_seed: the sweep's first seed chooses
                        runs.append(FinetuneConfig.from_dict(fields))
    # With a learning-rate grid chosen on the first seed, the choosing runs go first: shards and
    # parallel workers then start on different cells' grids instead of waiting on one cell's lock.
    choosing = [r for r in runs if r.lr_grid and r.lr_select == "first_seed" and r.mode != BASELINE]
    if choosing:
        runs.sort(key=lambda r: 0 if r.seed == r.selection_seed or not r.lr_grid or r.mode == BASELINE else 1)
    return runs


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/n' → (i, n); None → the SLURM array position when running inside an array job."""
    if text is None:
        index, count = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_ARRAY_TASK_COUNT")
        if index is None or count is None:
            return None
        offset = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(index) - offset, int(count)
    index, _, count = text.partition("/")
    i, n = int(index), int(count)
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def select_shard(runs: list, index: int, count: int) -> list:
    return runs[index::count]


def _run_one(config_dict: dict, threads: int) -> RunSummary:
    """One run in this process; failures are returned, not raised (the sweep goes on)."""
    import torch

    from finetune.run import run_finetune

    torch.set_num_threads(max(1, threads))
    config = FinetuneConfig.from_dict(config_dict)
    base = dict(task=config.task, encoder=config.encoder, mode=config.mode, fraction=config.fraction, seed=config.seed)
    try:
        if config.mode == BASELINE:
            from finetune.baseline import run_baseline

            first = run_baseline(config, progress=False, verbose=False)[0]  # magpie-hgb, then train-mean
            return RunSummary(**base, ok=True, run_id=first.run_id, test_mae=first.test.get("mae"))
        outcome = run_finetune(config, progress=False, verbose=False)
        return RunSummary(**base, ok=True, run_id=outcome.run_id, test_mae=outcome.result.test.get("mae"))
    except Exception as error:  # noqa: BLE001 - reported per run
        return RunSummary(**base, ok=False, error=f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}")


def run_sweep(
    sweep: SweepConfig, *, out: str | None = None, tracking_uri: str | None = None, shard: tuple[int, int] | None = None,
    overrides: dict | None = None, progress: bool = True, rerun: bool = False,
) -> list[RunSummary]:
    """Runs the sweep's runs (this shard's share). Runs that already FINISHED in the store with the
    same configuration (FinetuneConfig.fingerprint) are skipped unless `rerun`: an interrupted
    sweep, started again, continues where it stopped."""
    from finetune.tracking import Tracker

    overrides = dict(overrides or {})
    if out is not None:
        overrides["out"] = out
    if tracking_uri is not None:
        overrides["tracking_uri"] = tracking_uri
    runs = [_absolute_paths(r) for r in expand(sweep, overrides)]
    if shard is not None:
        runs = select_shard(runs, *shard)
    if not runs:
        print("[sweep] nothing to run", flush=True)
        return []
    first = runs[0]
    tracker = Tracker(first.out, first.tracking_uri, first.artifact_root)  # creates the SQLite schema once, here
    for task in sorted({r.task for r in runs}):
        tracker.experiment_id(task)
    if not rerun:
        finished = set().union(*(tracker.finished_fingerprints(t) for t in {r.task for r in runs}))
        todo = [r for r in runs if r.fingerprint() not in finished]
        if len(todo) < len(runs):
            print(f"[sweep] {len(runs) - len(todo)} runs already finished in the store: skipped (--rerun to redo them)",
                  flush=True)
        runs = todo
        if not runs:
            print("[sweep] nothing left to run", flush=True)
    print(f"[sweep] {len(runs)} runs, backend {sweep.backend}, tracking {tracker.uri}", flush=True)

    configs = [r.to_dict() for r in runs]
    if sweep.backend == "serial":
        summaries = []
        for config in _progress(configs, progress, len(configs)):
            summaries.append(_run_one(config, threads=int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1)))
    else:
        summaries = _run_ray(configs, sweep, progress)

    failed = [s for s in summaries if not s.ok]
    for s in failed:
        print(f"[sweep] FAILED {s.task} {s.encoder} {s.mode} f{s.fraction:g} s{s.seed}: {s.error}", flush=True)
    print(f"[sweep] {len(summaries) - len(failed)}/{len(summaries)} runs finished", flush=True)
    for task in sorted({r.task for r in runs}):
        registered = tracker.register_best(task)
        if registered:
            print(f"[sweep] registry: {registered['name']}@best → version {registered['version']} (run {registered['run_id']})")
    if sweep.compare_after and shard is None:
        from finetune.compare import compare, to_markdown

        table, paths = compare(first.out, first.tracking_uri, sorted({r.task for r in runs}))
        print(to_markdown(table))
        print(f"[sweep] comparison written to {', '.join(str(p) for p in paths.values())}", flush=True)
    return summaries


def _absolute_paths(config: FinetuneConfig) -> FinetuneConfig:
    """Workers may start in another directory: pin every path to the driver's view of it."""
    from pathlib import Path

    changes = {"out": str(Path(config.out).expanduser().resolve())}
    if config.data_root:
        changes["data_root"] = str(Path(config.data_root).expanduser().resolve())
    if config.task.startswith("csv:"):
        changes["task"] = "csv:" + str(Path(config.task[4:]).expanduser().resolve())
    if config.encoder not in ("scratch", BASELINE):
        changes["encoder"] = str(Path(config.encoder).expanduser().resolve())
    return config.replace(**changes)


def _progress(items, enabled: bool, total: int):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc="sweep", unit="run")


def _run_ray(configs: list[dict], sweep: SweepConfig, progress: bool) -> list[RunSummary]:
    import ray

    started = not ray.is_initialized()
    if started:
        # RAY_ADDRESS (set by cluster/launch.sh on a Ray cluster) joins that cluster; otherwise a
        # fresh local Ray starts ("local": never attach to whatever cluster /tmp/ray happens to
        # name). A loaded machine can take more than Ray's default ~20 s to bring up its GCS.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        address = os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":
            from crystalfm_common.console import local_ray_auth

            local_ray_auth()  # a local cluster runs without token auth: no warning about it
        env = {"PYTHONPATH": pythonpath, **{k: os.environ[k] for k in ("DS_ACCELERATOR", "CRYSTALFM_SHARED_DATA",
                                                                          "MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL")
                                            if k in os.environ}}
        ray.init(address=address, include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env})
    try:
        return _dispatch(ray, configs, sweep, progress)
    finally:
        if started:
            ray.shutdown()


def _dispatch(ray, configs: list[dict], sweep: SweepConfig, progress: bool) -> list[RunSummary]:
    threads = max(1, int(sweep.cpus_per_run))
    gpus = sweep.gpus_per_run
    if gpus and not ray.cluster_resources().get("GPU"):
        print("[sweep] no GPU in the Ray cluster: gpus_per_run ignored, runs use CPUs", flush=True)
        gpus = 0
    cpus = min(sweep.cpus_per_run, ray.cluster_resources().get("CPU", 1))  # never unschedulable
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_run_one)
    pending, summaries, config_of = [], [], {}
    limit = sweep.max_parallel or len(configs)
    queue = list(configs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(configs), desc="sweep", unit="run")
    while queue or pending:
        while queue and len(pending) < limit:
            config = queue.pop(0)
            ref = remote.remote(config, threads)
            config_of[ref] = config
            pending.append(ref)
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            try:
                summaries.append(ray.get(ref))
            except Exception as error:  # noqa: BLE001 - a crashed worker (e.g. out of memory)
                c = config_of[ref]
                summaries.append(RunSummary(c["task"], c["encoder"], c["mode"], c["fraction"], c["seed"], ok=False,
                                            error=f"worker died: {error}"))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return summaries
