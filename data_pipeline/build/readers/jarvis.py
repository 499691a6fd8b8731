"""JARVIS-DFT (dft_3d) records and ALIGNN-style POSCAR folders.

`path` may be
  * a JSON file (`.json`, `.json.gz`) holding a list of records, streamed one record at a time:
      - dft_3d / figshare style: `{jid, atoms: {lattice_mat, coords, elements, cartesian}, <targets>}`
        where every top-level number is a target and the string "na" means missing;
      - ALIGNN force-field style (`alignn_sample_data_ff/id_prop.json`): `{jid, atoms, total_energy,
        forces, stresses}`;
      - POSCAR style (`derived/jarvis_dft_3d_subset_poscar_with_targets.json`):
        `{jid, poscar, targets: {name: value}, splits: {...}}`;
  * a folder with `id_prop.csv` (ALIGNN sample data: rows `POSCAR-file,value[,value...]`, no
    header) and the POSCAR files it names; only listed files are read. Name the value columns
    with `target_names=[...]` (default `["target"]`);
  * a folder with `id_prop.json` (as the force-field sample).

Labels: every target goes to `properties` under its JARVIS name, and three also fill record
fields: formation_energy_peratom → formation_energy_per_atom (eV/atom), optb88vdw_bandgap →
band_gap (eV), ehull → e_above_hull (eV/atom). JARVIS energies (optB88vdW functional) are not
mixed into `energy`/`energy_per_atom`, which hold MP-compatible (PBE/MP2020) values elsewhere.
Force-field records: `forces` → forces (eV/Å); `total_energy` → properties["total_energy"];
`stresses` are not mapped (their unit and sign convention could not be established from the
available sources). Key `jarvis:<jid>` (`POSCAR-JVASP-10.vasp` → `JVASP-10`), group = jid;
force-field records are frames (one jid has many), keyed `jarvis:<jid>:<n>` with n counting that
jid's frames in file order.
"""
from __future__ import annotations

import csv
import numbers
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from data_pipeline.build.readers import register_reader
from data_pipeline.build.readers._common import (
    array_label,
    arrays_from_poscar,
    check_numbers,
    make_record,
    numbers_from_symbols,
    open_text,
    optional_float,
)
from data_pipeline.build.readers._jsonstream import JsonStream, Malformed, Truncated, iter_documents
from data_pipeline.build.readers.base import RawEntry, Reject
from data_pipeline.build.readers.structure_files import decode_text
from data_pipeline.record import CrystalRecord
from data_pipeline.build.validate import reject

FIELD_OF_TARGET = {
    "formation_energy_peratom": "formation_energy_per_atom",
    "optb88vdw_bandgap": "band_gap",
    "ehull": "e_above_hull",
}
MISSING = ("na", "nan", "")
_NOT_TARGETS = {"jid", "atoms", "poscar", "targets", "splits", "structure_source", "forces", "stresses"}


def jid_from_filename(name: str) -> str:
    stem = Path(name).name
    for suffix in (".vasp", ".poscar", ".POSCAR"):
        stem = stem.removesuffix(suffix)
    return stem.removeprefix("POSCAR-")


def target_value(value: Any, name: str) -> float | None:
    if isinstance(value, str) and value.strip().lower() in MISSING:
        return None
    return optional_float(value, name)


@register_reader("jarvis")
class JarvisReader:
    name = "jarvis"

    def __init__(self, path, source: str = "jarvis", target_names: list[str] | tuple[str, ...] = ("target",)):
        self.path = Path(path)
        self.source = source
        self.target_names = list(target_names)
        if self.path.is_dir():
            if (self.path / "id_prop.csv").is_file():
                self.mode, self.file = "id_prop_csv", self.path / "id_prop.csv"
            elif (self.path / "id_prop.json").is_file():
                self.mode, self.file = "json", self.path / "id_prop.json"
            else:
                raise FileNotFoundError(f"jarvis reader: {self.path} has neither id_prop.csv nor id_prop.json")
        elif self.path.is_file():
            self.mode = "id_prop_csv" if self.path.name.endswith(".csv") else "json"
            self.file = self.path
        else:
            raise FileNotFoundError(f"jarvis reader: {self.path} does not exist")

    # ------------------------------------------------------------------------------ scan
    def scan(self) -> Iterator[RawEntry | Reject]:
        yield from (self._scan_csv() if self.mode == "id_prop_csv" else self._scan_json())

    def _scan_json(self) -> Iterator[RawEntry | Reject]:
        frames: dict[str, int] = {}  # force-field files hold several frames per jid
        with open_text(self.file) as handle:
            last = "start"
            try:
                for position, doc in iter_documents(JsonStream(handle)):
                    last = position
                    location = f"{self.file.name}:{position}"
                    jid = doc.get("jid") if isinstance(doc, dict) else None
                    if not jid:
                        yield Reject(key=f"{self.source}:{location}", source=self.source, location=location,
                                     reason="missing_field: record has no jid")
                        continue
                    key = f"{self.source}:{jid}"
                    if "forces" in doc:
                        frame = frames.get(jid, 0)
                        frames[jid] = frame + 1
                        key = f"{key}:{frame}"
                    yield RawEntry(source=self.source, key=key, group=str(jid), location=location, payload=doc)
            except (Truncated, Malformed) as error:
                code = "truncated_file" if isinstance(error, Truncated) else "unparsable"
                yield Reject(key=f"{self.source}:{self.file.name}", source=self.source,
                             location=f"{self.file.name}:after {last}", reason=f"{code}: {error}")

    def _scan_csv(self) -> Iterator[RawEntry | Reject]:
        folder = self.file.parent
        with open(self.file, newline="") as handle:
            for row_number, row in enumerate(csv.reader(handle), start=1):
                if not row or not row[0].strip():
                    continue
                name = row[0].strip()
                jid = jid_from_filename(name)
                key, location = f"{self.source}:{jid}", f"{self.file.name}:row {row_number}"
                poscar = folder / name
                if not poscar.is_file():
                    yield Reject(key=key, source=self.source, location=location,
                                 reason=f"missing_field: POSCAR file {name} not found in {folder}")
                    continue
                values = row[1:]
                names = self.target_names if len(self.target_names) == len(values) else [
                    f"target_{i}" if i else "target" for i in range(len(values))
                ]
                yield RawEntry(source=self.source, key=key, group=jid, location=f"{location} → {name}",
                               payload={"jid": jid, "poscar": decode_text(poscar.read_bytes()),
                                        "targets": dict(zip(names, values))})

    # ----------------------------------------------------------------------------- parse
    def parse(self, entry: RawEntry) -> CrystalRecord:
        doc = entry.payload
        if not isinstance(doc, dict):
            raise reject("unparsable", f"record is {type(doc).__name__}, expected an object")
        if isinstance(doc.get("atoms"), dict):
            arrays = arrays_from_jarvis_atoms(doc["atoms"])
        elif isinstance(doc.get("poscar"), str):
            arrays = arrays_from_poscar(doc["poscar"])
        else:
            raise reject("missing_field", "record has neither an atoms dict nor a poscar string")

        targets: dict[str, Any] = dict(doc["targets"]) if isinstance(doc.get("targets"), dict) else {}
        for name, value in doc.items():  # dft_3d style: top-level numbers (and "na") are targets
            if name in _NOT_TARGETS or name in targets:
                continue
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                targets[name] = value
            elif isinstance(value, str) and value.strip().lower() == "na":
                targets[name] = None
        properties: dict[str, float] = {}
        labels: dict[str, Any] = {}
        for name, value in targets.items():
            value = target_value(_csv_number(value), name)
            if value is None:
                continue
            properties[name] = value
            if name in FIELD_OF_TARGET:
                labels[FIELD_OF_TARGET[name]] = value
        forces = array_label(doc["forces"], "forces") if doc.get("forces") is not None else None
        return make_record(entry.key, entry.source, arrays, group=entry.group, forces=forces,
                           properties=properties, **labels)


def _csv_number(value: Any) -> Any:
    """id_prop.csv cells are text: numbers in them are numbers, not `bad_label_type`."""
    if isinstance(value, str) and value.strip().lower() not in MISSING:
        try:
            return float(value)
        except ValueError:
            return value
    return value


def arrays_from_jarvis_atoms(atoms: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A jarvis-tools `Atoms.to_dict()` → (numbers, frac, lattice)."""
    for name in ("lattice_mat", "coords", "elements"):
        if name not in atoms:
            raise reject("missing_field", f"atoms dict has no {name!r}")
    lattice = array_label(atoms["lattice_mat"], "lattice_mat")
    coords = array_label(atoms["coords"], "coords")
    if lattice.shape != (3, 3):
        raise reject("unparsable", f"lattice_mat shape {lattice.shape} != (3, 3)")
    if len(atoms["elements"]) == 0:
        raise reject("empty", "atoms dict has no elements")
    if coords.shape != (len(atoms["elements"]), 3):
        raise reject("label_shape", f"coords shape {coords.shape} != ({len(atoms['elements'])}, 3)")
    numbers_ = check_numbers(numbers_from_symbols(atoms["elements"]))
    if atoms.get("cartesian"):
        det = np.linalg.det(lattice)
        if not np.isfinite(det) or abs(det) < 1e-12:
            raise reject("degenerate_lattice", "singular lattice_mat with Cartesian coordinates")
        coords = coords @ np.linalg.inv(lattice)
    return numbers_, coords, lattice
