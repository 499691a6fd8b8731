"""The task registry: each task names its data, its target (with unit) and its split rule.

Split rules (all deterministic; none depends on file order or on the machine):

  train      every entry of the source is training data (MP-20's train.csv.gz)
  val_test   the shared data ships no test split for the generation benchmarks, so the
             validation file is carved: hash(material id) < test_share → test, else val
  hash       a single file split three ways by hash(material id): train / val / test
             (shares 0.8 / 0.1 / 0.1)
  jarvis     the official JARVIS-Leaderboard split of the property (`splits{prop: split}` in
             the shared derived file); crystals without that property are skipped
  csv        a user CSV of (structure file, value[, split]); rows without a split column are
             hashed like `hash`

`hash(material id)` is sha256 of the split group (the record's material id) mapped to [0, 1).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "CRYSTALFM_SHARED_DATA"

HASH_SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}
TEST_SHARE = 0.5  # of a validation file, for `val_test`

JARVIS_FILE = "jarvis/derived/jarvis_dft_3d_subset_poscar_with_targets.json"


@dataclass(frozen=True)
class Source:
    reader: str  # kind for data_pipeline.build.readers.open_reader
    path: str  # relative to the data root, or absolute
    split: str  # train | val_test | hash | jarvis | csv
    options: dict = field(default_factory=dict, hash=False)  # reader keyword options


@dataclass(frozen=True)
class Task:
    name: str
    target: str  # label name on the record (scalar label or `properties` key)
    unit: str
    dataset: str
    description: str
    sources: tuple[Source, ...]
    jarvis_prop: str | None = None  # the leaderboard property whose split and value are used

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "target": self.target,
            "unit": self.unit,
            "dataset": self.dataset,
            "description": self.description,
            "sources": [{"reader": s.reader, "path": s.path, "split": s.split} for s in self.sources],
            "jarvis_prop": self.jarvis_prop,
        }


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    _TASKS[task.name] = task
    return task


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, *, target_name: str | None = None, unit: str | None = None) -> Task:
    """A registered task, or a user CSV task `csv:PATH` (columns: structure file, value[, split])."""
    if name.startswith("csv:"):
        return csv_task(name[4:], target_name=target_name, unit=unit)
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {available_tasks()} or csv:PATH for your own data")
    return _TASKS[name]


def csv_task(path: str, *, target_name: str | None = None, unit: str | None = None) -> Task:
    path = str(Path(path).expanduser().resolve())
    target = target_name or Path(path).stem
    return Task(
        name=f"csv_{target}",
        target=target,
        unit=unit or "",
        dataset=path,
        description=f"user CSV {path}: (structure file, {target}[, split])",
        sources=(Source("structure_files", path, "csv"),),
    )


def data_root(override: str | os.PathLike | None = None) -> Path:
    """The shared data root: `override`, else $CRYSTALFM_SHARED_DATA, else ../shared/data beside the repo."""
    root = Path(override or os.environ.get(DATA_ENV) or REPO_ROOT.parent / "shared" / "data").expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {root} does not exist; pass --data-root DIR or set {DATA_ENV} to the folder "
            f"holding mp_20/, perov_5/, carbon_24/, mpts_52/ and jarvis/"
        )
    return root


def unit_hash(text: str, salt: str = "") -> float:
    """A stable number in [0, 1) from a string (sha256; independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(f"{salt}|{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(material_id: str) -> str:
    u = unit_hash(material_id, "split")
    if u < HASH_SHARES["train"]:
        return "train"
    return "val" if u < HASH_SHARES["train"] + HASH_SHARES["val"] else "test"


def val_test_split(material_id: str) -> str:
    return "test" if unit_hash(material_id, "split") < TEST_SHARE else "val"


# ---------------------------------------------------------------------------------------------- registry
def _cdvae(dataset: str, files: dict[str, str], target: str, unit: str, description: str, name: str) -> Task:
    sources = tuple(Source("cdvae_csv", f"{dataset}/{file}", rule) for file, rule in files.items())
    return register_task(Task(name, target, unit, dataset, description, sources))


for _target, _unit in (("formation_energy_per_atom", "eV/atom"), ("band_gap", "eV"), ("e_above_hull", "eV/atom")):
    _cdvae(
        "mp_20",
        {"train.csv.gz": "train", "val.csv.gz": "val_test"},
        _target,
        _unit,
        f"MP-20 (CDVAE split) {_target}; test carved from val.csv.gz by hash of material id",
        f"mp20_{_target}",
    )
_cdvae("perov_5", {"val.csv": "hash"}, "heat_ref", "eV/atom", "Perov-5 heat of formation (heat_ref)", "perov5_heat_ref")
_cdvae("carbon_24", {"val.csv": "hash"}, "energy_per_atom", "eV/atom", "Carbon-24 energy per atom", "carbon24_energy_per_atom")
_cdvae(
    "mpts_52", {"val.csv.gz": "hash"}, "formation_energy_per_atom", "eV/atom", "MPTS-52 formation energy per atom",
    "mpts52_formation_energy_per_atom",
)

JARVIS_TARGETS = {
    "formation_energy_peratom": ("eV/atom", "formation energy per atom (OptB88vdW)"),
    "optb88vdw_bandgap": ("eV", "band gap (OptB88vdW)"),
    "mbj_bandgap": ("eV", "band gap (TBmBJ)"),
    "ehull": ("eV/atom", "energy above the convex hull"),
    "bulk_modulus_kv": ("GPa", "Voigt bulk modulus"),
    "shear_modulus_gv": ("GPa", "Voigt shear modulus"),
    "slme": ("%", "spectroscopic limited maximum efficiency"),
    "spillage": ("", "spin-orbit spillage (topological indicator)"),
    "optb88vdw_total_energy": ("eV/atom", "total energy per atom (OptB88vdW)"),
}
for _prop, (_unit, _what) in JARVIS_TARGETS.items():
    register_task(
        Task(
            name=f"jarvis_{_prop}",
            target=_prop,
            unit=_unit,
            dataset="jarvis_dft_3d",
            description=f"JARVIS dft_3d {_what}; official leaderboard split, on the shared structure subset",
            sources=(Source("jarvis", JARVIS_FILE, "jarvis"),),
            jarvis_prop=_prop,
        )
    )
