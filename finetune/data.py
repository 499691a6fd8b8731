"""A task's records, split and subsampled, read through the data pipeline's readers.

Stages (each cheap one runs before the expensive parse, so a 5% run parses 5% of the data):

    scan     reader.scan() over every source → RawEntry (or Reject)
    assign   split rule of the source → train | val | test | skip   (from the entry's material id)
    select   train: rank by sha256(seed, id), keep the first ceil(fraction × n)  (nested fractions:
             for one seed the 5% set is inside the 10% set); val/test: rank by a fixed hash
             and keep the first `max_eval` when capped
    parse    reader.parse(entry) → CrystalRecord, data_pipeline.build.validate → the target value
             attached under the task's label name; failures become rejects (key, location, reason)
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from data_pipeline.build.readers import RawEntry, RecordError, Reject, open_reader
from data_pipeline.record import SCALAR_LABELS, CrystalRecord
from finetune.structures import iter_structure_entries
from finetune.tasks import Task, data_root, hash_split, unit_hash, val_test_split

SPLITS = ("train", "val", "test")


@dataclass
class TaskData:
    task: Task
    train: list[CrystalRecord]
    val: list[CrystalRecord]
    test: list[CrystalRecord]
    rejects: list[Reject] = field(default_factory=list)
    available: dict[str, int] = field(default_factory=dict)  # entries per split before select

    def split(self, name: str) -> list[CrystalRecord]:
        return getattr(self, name)

    def targets(self, name: str) -> list[float]:
        return [target_of(r, self.task.target) for r in self.split(name)]

    def summary(self) -> dict:
        return {
            "available": dict(self.available),
            "used": {s: len(self.split(s)) for s in SPLITS},
            "rejects": len(self.rejects),
        }


@dataclass(frozen=True)
class _Item:
    reader: object
    entry: RawEntry
    value: float | None = None  # the target when the split table carries it (JARVIS, CSV)

    @property
    def material_id(self) -> str:
        return material_id(self.entry)


def material_id(entry: RawEntry) -> str:
    """The split id of an entry: its group (the material), without the `source:` prefix."""
    group = entry.group or entry.key
    return group.split(":", 1)[1] if group.startswith(f"{entry.source}:") else group


def target_of(record: CrystalRecord, name: str) -> float:
    value = getattr(record, name) if name in SCALAR_LABELS else record.properties.get(name)
    return math.nan if value is None else float(value)


def with_target(record: CrystalRecord, name: str, value: float) -> CrystalRecord:
    if name in SCALAR_LABELS:
        return record.replace(**{name: float(value)})
    return record.replace(properties={**record.properties, name: float(value)})


# ---------------------------------------------------------------------------------------------- load
def load_task_data(
    task: Task,
    *,
    root: str | Path | None = None,
    fraction: float = 1.0,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    max_val: int | None = None,
    progress: bool = True,
) -> TaskData:
    """`max_eval` caps validation and test (None: the whole split); `max_val` caps validation only
    (None: as `max_eval`), so a run may stop early on fewer crystals and still test on all."""
    buckets, rejects = _scan_and_assign(task, root)
    available = {s: len(buckets[s]) for s in SPLITS}
    chosen = _select(buckets, fraction=fraction, seed=seed, max_train=max_train, max_eval=max_eval, max_val=max_val)
    memo = _parse_memo(task, root)
    parsed = {s: _parse_all(task, chosen[s], rejects, progress=progress, desc=f"{task.name}/{s}", memo=memo)
              for s in SPLITS}
    if not parsed["train"]:
        raise ValueError(
            f"task {task.name}: no usable training crystals ({len(rejects)} rejected"
            + (f", first: {rejects[0].key} at {rejects[0].location}: {rejects[0].reason}" if rejects else "")
            + ")"
        )
    return TaskData(task, parsed["train"], parsed["val"], parsed["test"], rejects, available)


_SCAN_CACHE: dict = {}  # (task, sources with mtimes) → scanned buckets: serial sweeps scan once
# Same key → {entry key: parsed record or reject reason}: the runs of one process (a serial sweep, the
# baseline's fractions × seeds) parse the shared validation and test crystals once.
_PARSE_CACHE: dict = {}


def _scan_and_assign(task: Task, root) -> tuple[dict[str, list[_Item]], list[Reject]]:
    key = (task, tuple(_stamp(s.path, root) for s in task.sources))
    if key not in _SCAN_CACHE:
        _SCAN_CACHE.clear()  # keep one task's entries at most
        _SCAN_CACHE[key] = _scan_sources(task, root)
    buckets, rejects = _SCAN_CACHE[key]
    return {s: list(items) for s, items in buckets.items()}, list(rejects)


def _parse_memo(task: Task, root) -> dict:
    key = (task, tuple(_stamp(s.path, root) for s in task.sources))
    if key not in _PARSE_CACHE:
        _PARSE_CACHE.clear()  # one task's records at most
        _PARSE_CACHE[key] = {}
    return _PARSE_CACHE[key]


def _stamp(path: str, root) -> tuple[str, float]:
    path = Path(path) if Path(path).is_absolute() else data_root(root) / path
    return str(path), path.stat().st_mtime if path.exists() else -1.0


def _scan_sources(task: Task, root) -> tuple[dict[str, list[_Item]], list[Reject]]:
    buckets: dict[str, list[_Item]] = {s: [] for s in SPLITS}
    rejects: list[Reject] = []
    for source in task.sources:
        path = Path(source.path)
        if not path.is_absolute():
            path = data_root(root) / path
        if source.split == "csv":
            for split, item in _csv_items(path, task, rejects):
                buckets[split].append(item)
            continue
        if not path.exists():
            raise FileNotFoundError(f"task {task.name}: {path} not found (data root: {data_root(root)})")
        table = _jarvis_table(path, task.jarvis_prop) if source.split == "jarvis" else None
        reader = open_reader(source.reader, path, **source.options)
        for entry in reader.scan():
            if isinstance(entry, Reject):
                rejects.append(entry)
                continue
            mid = material_id(entry)
            if table is not None:
                if mid not in table:
                    continue  # no value of this property for this crystal
                split, value = table[mid]
                buckets[split].append(_Item(reader, entry, value))
                continue
            split = {"train": lambda _: "train", "val_test": val_test_split, "hash": hash_split}[source.split](mid)
            buckets[split].append(_Item(reader, entry))
    return buckets, rejects


def _jarvis_table(path: Path, prop: str) -> dict[str, tuple[str, float]]:
    """jid → (official leaderboard split, value) for one property of the shared derived file."""
    table = {}
    for row in json.loads(path.read_text()):
        split = row.get("splits", {}).get(prop)
        value = row.get("targets", {}).get(prop)
        if split in SPLITS and value is not None:
            table[row["jid"]] = (split, float(value))
    return table


def _csv_items(path: Path, task: Task, rejects: list[Reject]) -> Iterable[tuple[str, _Item]]:
    """Rows of a user CSV: structure file (relative to the CSV's folder), value[, split].

    A header row is recognised by a non-numeric value column. Each structure file is read by the
    data pipeline's `structure_files` reader (see finetune.structures)."""
    if not path.is_file():
        raise FileNotFoundError(f"user CSV {path} not found")
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if rows and not _is_number(rows[0][1] if len(rows[0]) > 1 else ""):
        rows = rows[1:]  # header
    for line, row in enumerate(rows, start=1):
        where = f"{path.name}:row {line}"
        if len(row) < 2 or not _is_number(row[1]):
            rejects.append(Reject(row[0] if row else where, "csv", where, "bad_label_type: value column is not a number"))
            continue
        file = (path.parent / row[0].strip()).resolve()
        split = row[2].strip().lower() if len(row) > 2 and row[2].strip() else hash_split(file.stem)
        if split not in SPLITS:
            rejects.append(Reject(str(file), "csv", where, f"missing_field: split {split!r} is not train/val/test"))
            continue
        for item in iter_structure_entries([file]):
            if isinstance(item, Reject):
                rejects.append(Reject(item.key, item.source, f"{where}: {item.location}", item.reason))
            else:
                yield split, _Item(item[0], item[1], float(row[1]))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _select(buckets, *, fraction, seed, max_train, max_eval, max_val=None) -> dict[str, list[_Item]]:
    train = sorted(buckets["train"], key=lambda it: unit_hash(it.material_id, f"fraction:{seed}"))
    train = train[: max(1, math.ceil(fraction * len(train)))] if train else []
    if max_train is not None:
        train = train[:max_train]
    out = {"train": train}
    for split in ("val", "test"):
        items = sorted(buckets[split], key=lambda it: unit_hash(it.material_id, "eval"))
        cap = max_val if (split == "val" and max_val is not None) else max_eval
        out[split] = items[:cap] if cap is not None else items
    return out


def _parse_all(task: Task, items: list[_Item], rejects: list[Reject], *, progress: bool, desc: str,
               memo: dict | None = None):
    from data_pipeline.build.validate import validate

    records = []
    memo = {} if memo is None else memo
    iterator = items
    if progress and sum((item.entry.key, item.value) not in memo for item in items) > 200:
        from tqdm import tqdm

        iterator = tqdm(items, desc=f"parse {desc}", unit="crystal", leave=False)
    for item in iterator:
        entry = item.entry
        known = memo.get((entry.key, item.value))
        if isinstance(known, CrystalRecord):
            records.append(known)
            continue
        if known is not None:
            rejects.append(Reject(entry.key, entry.source, entry.location, known))
            continue
        try:
            record = item.reader.parse(entry)
            validate(record)
            value = item.value if item.value is not None else target_of(record, task.target)
            if not math.isfinite(value):
                raise RecordError(f"missing_field: no finite {task.target!r} label")
            records.append(with_target(record, task.target, value))
            memo[(entry.key, item.value)] = records[-1]
        except (RecordError, ValueError) as exc:
            rejects.append(Reject(entry.key, entry.source, entry.location, str(exc)))
            memo[(entry.key, item.value)] = str(exc)
    return records


# ---------------------------------------------------------------------------------------------- files
def write_split_files(directory: Path, task: Task, data: TaskData, test_pred=None) -> None:
    """test_predictions.csv (when predictions are given), split_summary.json, train_keys.txt and
    rejects.csv: the same files for neural and baseline runs, so their subsets can be compared."""
    if test_pred is not None:
        with open(directory / "test_predictions.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["key", f"{task.target}_true", f"{task.target}_pred"])
            writer.writerows(zip((r.key for r in data.test), data.targets("test"), [float(v) for v in test_pred]))
    (directory / "split_summary.json").write_text(json.dumps(data.summary(), indent=2))
    (directory / "train_keys.txt").write_text("".join(f"{r.key}\n" for r in data.train))
    if data.rejects:
        with open(directory / "rejects.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["key", "source", "location", "reason"])
            writer.writeheader()
            writer.writerows(r.as_dict() for r in data.rejects)


# ---------------------------------------------------------------------------------------------- export
def export_split(task: Task, split: str, out_dir: str | Path, *, root: str | Path | None = None) -> Path:
    """Write a split's structures as CIFs (one per crystal, named by key) plus `keys.txt`.

    Its use: keep fine-tune test sets out of pretraining. A data build lists the folder under
    `exclude: [{kind: structure_files, path: DIR, name: ...}]` and drops every matching crystal."""
    from pymatgen.io.cif import CifWriter

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data = load_task_data(task, root=root, progress=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = []
    for record in data.split(split):
        name = record.key.replace(":", "__").replace("/", "_")
        CifWriter(record.to_structure()).write_file(str(out_dir / f"{name}.cif"))
        keys.append(record.key)
    (out_dir / "keys.txt").write_text("\n".join(keys) + "\n")
    return out_dir
