"""manifest.json: the description of a finished shard set (written last, atomically).

`load_manifest(shard_dir)` reads it and checks the schema version; `manifest_digest(shard_dir)`
is the sha256 of its bytes, the id of the shard set a model was trained on (logged by the trainer
with `mlflow.log_input` and stored in released checkpoints). The schema is documented in
data_pipeline/README.md; `MANIFEST_SCHEMA_VERSION` changes whenever a field changes meaning.

Also here: the mergeable statistics the manifest carries (label moments, element and atom-count
histograms). Shard writers compute them per shard; the build merges them in shard order, so the
floating-point results are the same on every run.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.record import ARRAY_LABELS, SCALAR_LABELS, CrystalRecord, element_symbol

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1


class ManifestError(ValueError):
    """No usable manifest in a shard directory."""


def manifest_path(shard_dir: str | Path) -> Path:
    shard_dir = Path(shard_dir)
    return shard_dir if shard_dir.name == MANIFEST_NAME else shard_dir / MANIFEST_NAME


def read_manifest_json(shard_dir: str | Path) -> Any:
    """The parsed manifest.json of a shard directory, unchecked (the one place that reads the file)."""
    path = manifest_path(shard_dir)
    if not path.is_file():
        raise ManifestError(
            f"{path} not found: {path.parent} is not a finished shard set "
            "(run `crystalfm data build` first; an interrupted build resumes when rerun)"
        )
    try:
        return json.loads(path.read_bytes())
    except ValueError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); rebuild the shards") from None


def load_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a shard set built by this code (its schema version checked)."""
    path = manifest_path(shard_dir)
    manifest = read_manifest_json(shard_dir)
    version = manifest.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {version!r}, this code reads {MANIFEST_SCHEMA_VERSION}; rebuild the shards")
    return manifest


def manifest_digest(shard_dir: str | Path) -> str:
    return hashlib.sha256(manifest_path(shard_dir).read_bytes()).hexdigest()


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, allow_nan=False) + "\n").encode()


def shard_files(manifest: dict, split: str, shard_dir: str | Path | None = None) -> list[Path | str]:
    """The shard files of one split (joined to `shard_dir` when given)."""
    if split not in manifest["splits"]:
        raise ManifestError(f"split {split!r} not in manifest; it has {sorted(manifest['splits'])}")
    files = [s["file"] for s in manifest["splits"][split]["shards"]]
    return [Path(shard_dir) / f for f in files] if shard_dir is not None else files


# ---------------------------------------------------------------------------- statistics
class Moments:
    """count / mean / M2 / min / max with Chan's parallel merge (order-fixed → reproducible)."""

    __slots__ = ("count", "mean", "m2", "min", "max")

    def __init__(self, count=0, mean=0.0, m2=0.0, min=math.inf, max=-math.inf):  # noqa: A002
        self.count, self.mean, self.m2, self.min, self.max = int(count), float(mean), float(m2), float(min), float(max)

    def add_array(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size:
            other = Moments(values.size, values.mean(), ((values - values.mean()) ** 2).sum(), values.min(), values.max())
            self.merge(other)

    def add_scalar(self, value: float) -> None:
        # Welford's update: the same result as merging a one-element Moments, without numpy.
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)
        self.min, self.max = min(self.min, value), max(self.max, value)

    def merge(self, other: "Moments") -> None:
        if other.count == 0:
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / n
        self.m2 += other.m2 + delta * delta * self.count * other.count / n
        self.count = n
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    def to_state(self) -> list:
        return [self.count, self.mean, self.m2, self.min, self.max] if self.count else [0, 0.0, 0.0, 0.0, 0.0]

    @classmethod
    def from_state(cls, state: list) -> "Moments":
        return cls(*state) if state[0] else cls()

    def summary(self) -> dict:
        if not self.count:
            return {"count": 0}
        std = math.sqrt(self.m2 / self.count)
        return {"count": self.count, "mean": self.mean, "std": std, "min": self.min, "max": self.max}


class ShardStats:
    """What the manifest says about the samples of a shard/split: mergeable and JSON-serialisable."""

    def __init__(self):
        self.num_samples = 0
        self.num_atoms = 0
        self.atoms_hist: dict[int, int] = {}
        self.element_crystals: dict[int, int] = {}
        self.element_atoms: dict[int, int] = {}
        self.sources: dict[str, int] = {}
        self.labels: dict[str, Moments] = {}

    def add(self, record: CrystalRecord) -> None:
        n = record.num_atoms
        self.num_samples += 1
        self.num_atoms += n
        self.atoms_hist[n] = self.atoms_hist.get(n, 0) + 1
        for z, c in Counter(record.atomic_numbers.tolist()).items():
            self.element_crystals[z] = self.element_crystals.get(z, 0) + 1
            self.element_atoms[z] = self.element_atoms.get(z, 0) + c
        self.sources[record.source] = self.sources.get(record.source, 0) + 1
        for name, value in record.labels().items():
            self.labels.setdefault(name, Moments()).add_scalar(float(value))
        for name in ARRAY_LABELS:
            value = getattr(record, name)
            if value is not None:
                self.labels.setdefault(name, Moments()).add_array(value)

    def merge(self, other: "ShardStats") -> None:
        self.num_samples += other.num_samples
        self.num_atoms += other.num_atoms
        for mine, theirs in ((self.atoms_hist, other.atoms_hist), (self.element_crystals, other.element_crystals),
                             (self.element_atoms, other.element_atoms), (self.sources, other.sources)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for name in sorted(other.labels):
            self.labels.setdefault(name, Moments()).merge(other.labels[name])

    def to_state(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "num_atoms": self.num_atoms,
            "atoms_hist": {str(k): v for k, v in sorted(self.atoms_hist.items())},
            "element_crystals": {str(k): v for k, v in sorted(self.element_crystals.items())},
            "element_atoms": {str(k): v for k, v in sorted(self.element_atoms.items())},
            "sources": dict(sorted(self.sources.items())),
            "labels": {k: v.to_state() for k, v in sorted(self.labels.items())},
        }

    @classmethod
    def from_state(cls, state: dict) -> "ShardStats":
        out = cls()
        out.num_samples, out.num_atoms = state["num_samples"], state["num_atoms"]
        out.atoms_hist = {int(k): v for k, v in state["atoms_hist"].items()}
        out.element_crystals = {int(k): v for k, v in state["element_crystals"].items()}
        out.element_atoms = {int(k): v for k, v in state["element_atoms"].items()}
        out.sources = dict(state["sources"])
        out.labels = {k: Moments.from_state(v) for k, v in state["labels"].items()}
        return out

    def summary(self) -> dict:
        """The manifest view: histograms keyed by element symbol / atom count, label summaries."""
        order = [k for k in (*SCALAR_LABELS, *ARRAY_LABELS) if k in self.labels]
        order += sorted(k for k in self.labels if k not in order)
        return {
            "num_samples": self.num_samples,
            "num_atoms": self.num_atoms,
            "sources": dict(sorted(self.sources.items())),
            "atoms_per_crystal": {str(k): v for k, v in sorted(self.atoms_hist.items())},
            "elements": {
                element_symbol(z): {"crystals": self.element_crystals[z], "atoms": self.element_atoms[z]}
                for z in sorted(self.element_crystals)
            },
            "labels": {k: self.labels[k].summary() for k in order},
        }
