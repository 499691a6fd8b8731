"""Force-field relaxations and single points with CHGNet (its wheel ships its weights: offline).

Every crystal gets a `RelaxResult`, whatever happens: a relaxation that raises, returns
non-finite energies, or blows the cell up is recorded with its status and message, never dropped.
Many crystals run in parallel over Ray actors (each loads CHGNet once); a handful run in-process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.record import CrystalRecord

EXPLODED_VOLUME_RATIO = 5.0  # a cell that grows or shrinks 5× while relaxing has exploded
CHGNET_MAX_Z = 94  # CHGNet's element table stops at plutonium


@dataclass(frozen=True)
class RelaxConfig:
    optimizer: str = "FIRE"
    fmax: float = 0.1  # eV/Å
    steps: int = 300
    relax_cell: bool = True


@dataclass
class RelaxResult:
    key: str
    status: str  # ok | not_converged | exploded | failed
    energy_per_atom: float = math.nan  # CHGNet, eV/atom (MP2020-corrected scale)
    steps: int = 0
    record: CrystalRecord | None = None  # the relaxed crystal (None when failed)
    message: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        """Has a finite energy and a sane relaxed structure (converged or not)."""
        return self.status in ("ok", "not_converged")


class CHGNetRelaxer:
    """Holds one CHGNet model; relaxes or single-points records one at a time."""

    def __init__(self, config: RelaxConfig = RelaxConfig()):
        import warnings

        from chgnet.model import CHGNet, StructOptimizer

        warnings.filterwarnings("ignore", module="chgnet")
        self.config = config
        self.model = CHGNet.load(verbose=False)
        self.optimizer = StructOptimizer(model=self.model, optimizer_class=config.optimizer)

    def single_point(self, record: CrystalRecord) -> float:
        """CHGNet energy per atom of the crystal as it is (eV/atom)."""
        prediction = self.model.predict_structure(record.to_structure(), task="e")
        return float(np.asarray(prediction["e"]).reshape(-1)[0])

    def single_points(self, records: list[CrystalRecord], batch_size: int = 32) -> list[float]:
        """CHGNet energies per atom in batches; NaN for a crystal CHGNet cannot take (Z > 94, or it
        raises on its own after its batch did)."""
        energies = [math.nan] * len(records)
        usable = [i for i, r in enumerate(records) if int(r.atomic_numbers.max(initial=0)) <= CHGNET_MAX_Z]
        for start in range(0, len(usable), batch_size):
            chunk = usable[start : start + batch_size]
            try:
                out = self.model.predict_structure([records[i].to_structure() for i in chunk], task="e", batch_size=batch_size)
                values = [float(np.asarray(p["e"]).reshape(-1)[0]) for p in out]
            except Exception:  # noqa: BLE001 - one bad crystal must not lose its batch: retry one by one
                values = []
                for i in chunk:
                    try:
                        values.append(self.single_point(records[i]))
                    except Exception:  # noqa: BLE001
                        values.append(math.nan)
            for i, value in zip(chunk, values):
                energies[i] = value
        return energies

    def relax(self, record: CrystalRecord) -> RelaxResult:
        cfg = self.config
        if int(record.atomic_numbers.max(initial=0)) > CHGNET_MAX_Z:
            beyond = sorted({int(z) for z in record.atomic_numbers if z > CHGNET_MAX_Z})
            return RelaxResult(record.key, "failed", message=f"CHGNet covers Z ≤ {CHGNET_MAX_Z}; this crystal has Z = {beyond}")
        try:
            out = self.optimizer.relax(
                record.to_structure(), fmax=cfg.fmax, steps=cfg.steps, relax_cell=cfg.relax_cell, verbose=False
            )
        except Exception as exc:  # noqa: BLE001 - any failure is a recorded outcome
            return RelaxResult(record.key, "failed", message=f"{type(exc).__name__}: {exc}")
        final = out["final_structure"]
        trajectory = out["trajectory"]
        n_steps = len(trajectory.energies)
        energy = trajectory.energies[-1] / len(final) if n_steps else math.nan
        relaxed = CrystalRecord.from_structure(final, key=record.key, source=record.source)
        ratio = relaxed.volume / max(record.volume, 1e-12)
        if not math.isfinite(energy):
            return RelaxResult(record.key, "failed", steps=n_steps, message="non-finite energy")
        if not (1 / EXPLODED_VOLUME_RATIO < ratio < EXPLODED_VOLUME_RATIO):
            return RelaxResult(
                record.key, "exploded", energy, n_steps, relaxed, f"volume changed {ratio:.2f}× while relaxing"
            )
        forces = np.asarray(trajectory.forces[-1]) if trajectory.forces else np.zeros((1, 3))
        converged = float(np.linalg.norm(forces, axis=1).max()) <= cfg.fmax + 1e-9
        return RelaxResult(record.key, "ok" if converged else "not_converged", energy, n_steps, relaxed)


def relax_records(
    records: list[CrystalRecord], config: RelaxConfig = RelaxConfig(), num_workers: int = 1, progress: bool = True
) -> list[RelaxResult]:
    """Relax every record; results in input order. num_workers > 1 uses Ray actors."""
    if not records:
        return []
    if num_workers <= 1 or len(records) < 2:
        from tqdm.auto import tqdm

        relaxer = CHGNetRelaxer(config)
        return [relaxer.relax(r) for r in tqdm(records, desc="relax (CHGNet)", disable=not progress)]
    return _relax_with_ray(records, config, num_workers, progress)


def _relax_with_ray(records, config, num_workers, progress):
    import ray
    from tqdm.auto import tqdm

    started = not ray.is_initialized()
    if started:
        # a fresh local Ray: never attach to a stale cluster file left by a killed run
        from crystalfm_common.console import local_ray_auth

        local_ray_auth()  # a local cluster: no token auth, and no warning about it
        ray.init(address="local", num_cpus=num_workers, include_dashboard=False, log_to_driver=False)
    try:
        actor_cls = ray.remote(num_cpus=1)(_RelaxActor)
        actors = [actor_cls.remote(config) for _ in range(num_workers)]
        pending = {actors[i % num_workers].relax.remote(r): i for i, r in enumerate(records)}
        results: list[RelaxResult | None] = [None] * len(records)
        with tqdm(total=len(records), desc=f"relax (CHGNet × {num_workers})", disable=not progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(done[0])
                try:
                    results[index] = ray.get(done[0])
                except Exception as exc:  # noqa: BLE001 - a dead worker still yields a recorded failure
                    results[index] = RelaxResult(records[index].key, "failed", message=f"worker error: {exc}")
                bar.update(1)
        return results  # type: ignore[return-value]
    finally:
        if started:
            ray.shutdown()


class _RelaxActor:
    def __init__(self, config: RelaxConfig):
        import torch

        torch.set_num_threads(1)
        self.relaxer = CHGNetRelaxer(config)

    def relax(self, record: CrystalRecord) -> RelaxResult:
        return self.relaxer.relax(record)
