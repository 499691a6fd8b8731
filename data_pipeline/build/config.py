"""The typed config of one shard build: what to read, how to deduplicate and split, where to write.

Every field has a default, so `crystalfm data build --source cdvae_csv:train.csv.gz --out shards/`
works without a file; a YAML file (`configs/data_*.yaml`) sets the same fields. Unknown keys are
rejected with the closest valid name, so a typo never silently falls back to a default.

Fields are split in two: the *data* fields decide the bytes of the shard set (they are stored in
the manifest and fingerprinted; a rerun with different data fields refuses to resume), the
*runtime* fields (`out`, `executor`, `ray_address`, `num_workers`, `force`, `keep_work`) only
decide where and how fast it runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crystalfm_common.config import ConfigError, check_keys, from_dict

DEDUP_MODES = ("none", "exact", "structural")
SPLIT_BY = ("group", "reduced_formula")
EXCLUDE_MATCH = ("exact", "structural")
RUNTIME_FIELDS = ("out", "executor", "ray_address", "num_workers", "force", "keep_work", "plan_sources")
EXECUTORS = ("ray", "inline")
DEFAULT_DEDUP_GROUP_SIZE = 128


@dataclass(frozen=True)
class SourceSpec:
    """One raw source: a reader kind, its path, and how its records are deduplicated.

    dedup: `none` keeps everything but repeated keys; `exact` also drops records whose structure
    is byte-for-byte the same as an earlier one (same lattice and sites up to atom order);
    `structural` also drops records that pymatgen's StructureMatcher calls the same crystal as an
    earlier kept one (supercells, permutations, translations, small distortions).
    options: passed to the reader as keyword arguments.
    """

    kind: str
    path: str
    name: str = ""
    dedup: str = "exact"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", _default_name(self.kind, self.path))
        if self.dedup not in DEDUP_MODES:
            raise ConfigError(f"source {self.name!r}: dedup must be one of {DEDUP_MODES}, got {self.dedup!r}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"source {self.name!r}: options must be a mapping, got {type(self.options).__name__}")

    @classmethod
    def from_dict(cls, data: Any, where: str = "source") -> "SourceSpec":
        if isinstance(data, str):
            return cls.parse(data)
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping {{kind, path, ...}} or 'kind:path[:name]', got {data!r}")
        check_keys(cls, data, where)
        missing = [k for k in ("kind", "path") if k not in data]
        if missing:
            raise ConfigError(f"{where}: missing required key(s) {missing}")
        return cls(**{**data, "path": str(data["path"]), "options": dict(data.get("options") or {})})

    @classmethod
    def parse(cls, text: str, dedup: str = "exact") -> "SourceSpec":
        """`kind:path[:name]` as given on the command line."""
        kind, sep, rest = text.partition(":")
        if not sep or not kind or not rest:
            raise ConfigError(f"--source {text!r}: expected KIND:PATH[:NAME], e.g. cdvae_csv:data/mp_20/train.csv.gz:mp20")
        path, name = rest, ""
        head, sep, tail = rest.rpartition(":")
        # A trailing ':name' is a name only if it has no path separator (keeps 'C:\\x' style paths whole).
        if sep and head and "/" not in tail and "\\" not in tail and "." not in tail:
            path, name = head, tail
        return cls(kind=kind, path=path, name=name, dedup=dedup)


def _default_name(kind: str, path: str) -> str:
    stem = Path(str(path).rstrip("/")).name
    for suffix in (".gz", ".zip", ".json", ".csv", ".jsonl"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return f"{kind}:{stem}" if stem else kind


@dataclass(frozen=True)
class MatcherConfig:
    """pymatgen StructureMatcher tolerances (its defaults)."""

    ltol: float = 0.2
    stol: float = 0.3
    angle_tol: float = 5.0
    primitive_cell: bool = True
    scale: bool = True
    symprec: float = 0.1  # spglib tolerance; kept for config compatibility (matching buckets by shape now, see dedup.py)

    @classmethod
    def from_dict(cls, data: dict | None) -> "MatcherConfig":
        return from_dict(cls, data, "matcher", typed=False)


@dataclass(frozen=True)
class BuildConfig:
    sources: tuple[SourceSpec, ...] = ()
    exclude: tuple[SourceSpec, ...] = ()  # benchmark test sets kept out of the shards
    exclude_match: str = "structural"  # how a record is matched against `exclude`
    exclude_whole_group: bool = True  # one matching frame excludes its whole group (material)
    splits: dict = field(default_factory=lambda: {"train": 0.9, "val": 0.05, "test": 0.05})
    split_by: str = "group"
    seed: int = 0
    shard_bytes: int = 128 * 1024 * 1024  # target tar size; a shard closes once it would pass this
    chunk_size: int = 256  # raw entries per Ray task (and per resumable work file)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    # Store each crystal's PDD rows (k neighbours, `record.pdd_features`) in its sample, so loaders
    # of PDDFormer-style encoders (k = 92) read them instead of computing them every epoch. None:
    # not stored, and the key is left out of the config record (shards, manifest and fingerprint
    # of a build without it are those of a build before the option existed).
    pdd_k: int | None = None
    # Structural matching: a (reduced formula) bucket of more records than this is cut into pieces of
    # whole shape bins, matched in parallel, and their representatives compared across pieces
    # (dedup.py). The cut depends only on the data and this number, never on the worker count. Left
    # out of the config record at its default (a build of data without near-duplicates writes the
    # manifest it wrote before the option existed).
    dedup_group_size: int = DEFAULT_DEDUP_GROUP_SIZE
    # runtime fields (do not change the output bytes)
    out: str = "shards"
    executor: str = "ray"  # "inline" runs the same stages in this process without Ray
    ray_address: str | None = None
    num_workers: int | None = None
    force: bool = False
    keep_work: bool = False
    # Readers that can plan (folders and zips of CIFs, GNoME, a plain MPtrj .json) are split into
    # parts on the driver and read in the parse tasks (readers.base); False: the driver scans every
    # source and ships the entries, as before. The output is the same either way.
    plan_sources: bool = True

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.split_by not in SPLIT_BY:
            raise ConfigError(f"split_by must be one of {SPLIT_BY}, got {self.split_by!r}")
        if self.exclude_match not in EXCLUDE_MATCH:
            raise ConfigError(f"exclude_match must be one of {EXCLUDE_MATCH}, got {self.exclude_match!r}")
        if not self.splits or any((not isinstance(v, (int, float))) or v < 0 for v in self.splits.values()):
            raise ConfigError(f"splits must map split names to non-negative fractions, got {self.splits!r}")
        if abs(sum(self.splits.values()) - 1.0) > 1e-9:
            raise ConfigError(f"split fractions must sum to 1, got {self.splits!r} (sum {sum(self.splits.values())})")
        for name in self.splits:
            if not name.isidentifier():
                raise ConfigError(f"split name {name!r} must be a plain identifier (it names shard files)")
        if self.shard_bytes < 4096:
            raise ConfigError(f"shard_bytes must be at least 4096, got {self.shard_bytes}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.pdd_k is not None and (isinstance(self.pdd_k, bool) or not isinstance(self.pdd_k, int) or self.pdd_k < 1):
            raise ConfigError(f"pdd_k must be a positive integer (PDDFormer: 92) or null, got {self.pdd_k!r}")
        if isinstance(self.dedup_group_size, bool) or not isinstance(self.dedup_group_size, int) or self.dedup_group_size < 2:
            raise ConfigError(f"dedup_group_size must be an integer of at least 2, got {self.dedup_group_size!r}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ConfigError(f"num_workers must be positive, got {self.num_workers}")
        names = [s.name for s in self.sources + self.exclude]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"source names must be unique, repeated: {dup} (set `name:` on each source)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict) -> "BuildConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a build config is a mapping, got {type(data).__name__}")
        check_keys(cls, data)
        data = dict(data)
        data["sources"] = tuple(SourceSpec.from_dict(s, f"sources[{i}]") for i, s in enumerate(data.get("sources") or ()))
        data["exclude"] = tuple(SourceSpec.from_dict(s, f"exclude[{i}]") for i, s in enumerate(data.get("exclude") or ()))
        data["matcher"] = MatcherConfig.from_dict(data.get("matcher"))
        if "splits" in data:
            data["splits"] = {str(k): float(v) for k, v in dict(data["splits"]).items()}
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "BuildConfig":
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def replace(self, **changes: Any) -> "BuildConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["sources"] = [dataclasses.asdict(s) for s in self.sources]
        out["exclude"] = [dataclasses.asdict(s) for s in self.exclude]
        if out["pdd_k"] is None:
            del out["pdd_k"]  # off: the record of the config is the one from before the option
        if out["dedup_group_size"] == DEFAULT_DEDUP_GROUP_SIZE:
            del out["dedup_group_size"]  # likewise at its default
        return out

    def data_dict(self) -> dict:
        """The fields that decide the output bytes (stored in the manifest, fingerprinted)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def runtime_dict(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k in RUNTIME_FIELDS}

    def fingerprint(self) -> str:
        text = json.dumps(self.data_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)
