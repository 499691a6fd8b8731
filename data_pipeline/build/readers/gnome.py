"""GNoME (google-deepmind/materials_discovery): `stable_materials_summary.csv` + `by_id/<MaterialId>.CIF`.

`path` may be
  * a folder holding a `stable_materials_summary*.csv` and `by_id.zip` or `by_id/`;
  * the summary CSV itself (its structures are looked for as `by_id.zip` / `by_id/` beside it,
    then one folder up; or pass `structures=` explicitly);
  * a `by_id.zip` or `by_id/` folder alone (structures without labels).
The zip is read in place (never extracted). With a CSV, rows are read in CSV order and each row's
CIF `by_id/<MaterialId>.CIF` is fetched from the zip/folder (a row without one is a
`missing_field` reject); CIFs without a row are not read. Without a CSV, every `.CIF` is read in
sorted order.

MaterialId is always text: the csv module never converts cells, so ids such as `0952432756`,
`21e1799121` or `70960736e3` (which pandas may turn into 952432756, inf, 7.096e10) stay intact.
Column names are matched case-insensitively ignoring spaces and punctuation, so the 2023-12
(21 columns), 2024-08 (`Unnamed: 0` + 21) and current (`Uncorrected Energy`/`UnCorrected Energy`,
`Data Directory`) headers all work; empty cells are missing values.

Labels: Formation Energy Per Atom → formation_energy_per_atom (eV/atom); Corrected Energy →
energy (eV, total) and energy_per_atom (÷ number of atoms); Bandgap → band_gap (eV);
Uncorrected Energy and the five Decomposition Energy columns → properties
(`uncorrected_energy`, `decomposition_energy_per_atom`, `..._all`, `..._relative`, `..._mp`,
`..._mp_oqmd`; eV or eV/atom). Key `gnome:<MaterialId>`, group = MaterialId.
"""
from __future__ import annotations


import csv
import io
import re
import zipfile
from pathlib import Path
from typing import Iterator

from data_pipeline.build.readers import register_reader
from data_pipeline.build.readers._archive import MemberReader, can_list, container_label, iter_members, list_members
from data_pipeline.build.readers._jsonindex import csv_record_ends
from data_pipeline.build.readers._common import arrays_from_cif, batched, csv_float, file_identity, make_record, open_text
from data_pipeline.build.readers.base import RawEntry, Reject
from data_pipeline.build.readers.structure_files import decode_text, member_stem
from data_pipeline.record import CrystalRecord

# normalised column name → (record field | "properties.<name>")
COLUMNS = {
    "formationenergyperatom": "formation_energy_per_atom",
    "correctedenergy": "energy",
    "bandgap": "band_gap",
    "uncorrectedenergy": "properties.uncorrected_energy",
    "decompositionenergyperatom": "properties.decomposition_energy_per_atom",
    "decompositionenergyperatomall": "properties.decomposition_energy_per_atom_all",
    "decompositionenergyperatomrelative": "properties.decomposition_energy_per_atom_relative",
    "decompositionenergyperatommp": "properties.decomposition_energy_per_atom_mp",
    "decompositionenergyperatommpoqmd": "properties.decomposition_energy_per_atom_mp_oqmd",
}
ID_COLUMN = "materialid"


def normalise(column: str) -> str:
    return re.sub(r"[^a-z0-9]", "", column.lower())


class _Structures:
    """Random access to `by_id/<id>.CIF` in a zip or a folder."""

    def __init__(self, path: Path):
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.is_file() else None
        if self.zip is not None:
            # id → member name; accepts by_id/<id>.CIF at any depth and any extension case
            self.members = {member_stem(n): n for n in self.zip.namelist() if n.lower().endswith(".cif")}

    def locate(self, material_id: str) -> tuple[str, str | None, str]:
        """(location, member or None when there is no CIF, identity) without reading the CIF."""
        if self.zip is not None:
            member = self.members.get(material_id)
            if member is None:
                return f"{self.path.name}!by_id/{material_id}.CIF", None, ""
            info = self.zip.getinfo(member)
            return f"{self.path.name}!{member}", member, f"{info.file_size}:{info.CRC}"
        for name in (f"{material_id}.CIF", f"{material_id}.cif"):
            file = self.path / name
            if file.is_file():
                stat = file.stat()
                return f"{self.path.name}/{name}", name, f"{stat.st_size}:{stat.st_mtime_ns}"
        return f"{self.path.name}/{material_id}.CIF", None, ""

    def read(self, material_id: str) -> tuple[str, bytes | None]:
        if self.zip is not None:
            member = self.members.get(material_id)
            return (f"{self.path.name}!{member or f'by_id/{material_id}.CIF'}",
                    None if member is None else self.zip.read(member))
        for name in (f"{material_id}.CIF", f"{material_id}.cif"):
            file = self.path / name
            if file.is_file():
                return f"{self.path.name}/{name}", file.read_bytes()
        return f"{self.path.name}/{material_id}.CIF", None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _header(reader) -> tuple[int | None, list[tuple[int, str]], object]:
    """(MaterialId column or None, [(column, field)], the reader past the header) of a summary CSV."""
    header = [normalise(c) for c in next(reader, [])]
    id_at = header.index(ID_COLUMN) if ID_COLUMN in header else None
    return id_at, [(i, COLUMNS[name]) for i, name in enumerate(header) if name in COLUMNS], reader


def find_structures(folder: Path) -> Path | None:
    for candidate in (folder / "by_id.zip", folder / "by_id"):
        if candidate.exists():
            return candidate
    return None


@register_reader("gnome")
class GnomeReader:
    name = "gnome"

    def __init__(self, path, source: str = "gnome", structures=None, fast_cif: bool = True):
        self.path = Path(path)
        self.source = source
        self.fast_cif = fast_cif
        self.csv: Path | None = None
        if self.path.is_file() and self.path.name.lower().endswith((".csv", ".csv.gz")):
            self.csv = self.path
        elif self.path.is_dir() and self.path.name != "by_id":
            found = sorted(self.path.glob("stable_materials_summary*.csv*"))
            self.csv = found[0] if found else None
        if structures is not None:
            self.structures = Path(structures)
        elif self.csv is not None:
            self.structures = find_structures(self.csv.parent) or find_structures(self.csv.parent.parent)
        elif self.path.is_dir() and self.path.name != "by_id":
            self.structures = find_structures(self.path) or self.path  # or a plain folder of CIFs
        else:
            self.structures = self.path  # by_id.zip or by_id/
        if self.structures is None or not self.structures.exists():
            raise FileNotFoundError(
                f"gnome reader: no by_id.zip or by_id/ next to {self.csv}; pass structures=PATH to the CIFs"
            )

    # ------------------------------------------------------------------------------ scan
    def scan(self) -> Iterator[RawEntry | Reject]:
        if self.csv is None:
            yield from self._scan_structures_only()
        else:
            yield from self._scan_csv()

    def _scan_structures_only(self) -> Iterator[RawEntry | Reject]:
        where = container_label(self.structures)
        for member, data in iter_members(self.structures, lambda m: m.lower().endswith(".cif")):
            material_id = member_stem(member)
            key = f"{self.source}:{material_id}"
            if isinstance(data, Exception) or member == "":
                yield Reject(key=key, source=self.source, location=f"{where}{member}",
                             reason=f"unparsable: unreadable member ({data})")
                continue
            yield RawEntry(source=self.source, key=key, group=material_id, location=f"{where}{member}",
                           payload={"cif": decode_text(data), "labels": {}})

    # Planned reading (readers.base): the driver reads the summary CSV rows and the zip's central
    # directory (or the folder listing); the parse tasks read and decode the CIFs.
    def plan(self, entries: int) -> Iterator[dict] | None:
        if self.csv is None:
            if not can_list(self.structures):
                return None
            items = (["read", f"{self.source}:{member_stem(m)}", member_stem(m), m, {}, identity]
                     for m, identity in list_members(self.structures, lambda m: m.lower().endswith(".cif")))
        else:
            if not can_list(self.structures):
                return None
            if self.structures.is_file() and not self.csv.name.lower().endswith(".gz") and self._csv_header()[0] is not None:
                return self._plan_csv_ranges(entries)
            # A .gz cannot be read from the middle, and a folder of CIFs has no one identity: plan
            # row by row (each CIF's size and mtime in the part).
            items = self._plan_csv()
        csv_identity = file_identity(self.csv) if self.csv is not None else ""
        return ({"items": batch, "csv": csv_identity} for batch in batched(items, entries))

    def _csv_header(self) -> tuple[int | None, list[tuple[int, str]]]:
        """(MaterialId column or None, [(column, field)]) from the CSV's first record."""
        with open_text(self.csv) as handle:
            return _header(csv.reader(handle))[:2]

    def _no_id_column(self) -> tuple[str, str, str]:
        """(key, location, reason) of the one reject for a summary CSV without a MaterialId column."""
        return f"{self.source}:{self.csv.name}", self.csv.name, f"missing_field: no MaterialId column in {self.csv.name}"

    def _plan_csv_ranges(self, entries: int) -> Iterator[dict]:
        """Parts of `entries` CSV records each, as byte ranges found by one numpy pass: the driver
        reads neither the rows nor the zip's directory; each task parses its rows and fetches their
        CIFs (the zip's directory is read once per worker process)."""
        ends = csv_record_ends(self.csv)
        size = self.csv.stat().st_size
        if not ends or ends[-1] != size:
            ends.append(size)  # a last record without a final newline
        identity = f"{file_identity(self.csv)}|{file_identity(self.structures)}"
        for first in range(1, len(ends), entries):  # record 0 is the header
            last = min(first + entries, len(ends)) - 1
            yield {"rows": [ends[first - 1], ends[last], first], "identity": identity}

    def _plan_csv(self) -> Iterator[list]:
        """One item per CSV row: ["reject", key, location, reason] or
        ["read", key, material_id, member, labels, identity]."""
        structures = _Structures(self.structures)
        try:
            with open_text(self.csv) as handle:
                id_at, wanted, reader = _header(csv.reader(handle))
                if id_at is None:
                    yield ["reject", *self._no_id_column()]
                    return
                for row_number, row in enumerate(reader, start=1):
                    row_at = f"{self.csv.name}:row {row_number}"
                    material_id = row[id_at].strip() if id_at < len(row) else ""
                    if not material_id:
                        yield ["reject", f"{self.source}:{row_at}", row_at, "missing_field: empty MaterialId"]
                        continue
                    location, member, identity = structures.locate(material_id)
                    if member is None:
                        yield ["reject", f"{self.source}:{material_id}", f"{row_at} → {location}",
                               f"missing_field: no CIF {location} for this row"]
                        continue
                    labels = {field: row[i] for i, field in wanted if i < len(row)}
                    yield ["read", f"{self.source}:{material_id}", material_id, member, labels, identity,
                           f"{row_at} → {location}"]
        finally:
            structures.close()

    def scan_part(self, part: dict) -> Iterator[RawEntry | Reject]:
        if "rows" in part:
            yield from self._scan_rows(*part["rows"])
            return
        where = container_label(self.structures)
        if not hasattr(self, "_members"):
            self._members = MemberReader(self.structures)
        for item in part["items"]:
            if item[0] == "reject":
                _, key, location, reason = item
                yield Reject(key=key, source=self.source, location=location, reason=reason)
                continue
            _, key, material_id, member, labels, _identity, *at = item
            location = at[0] if at else f"{where}{member}"
            data = self._members.read(member)
            if isinstance(data, Exception):
                yield Reject(key=key, source=self.source, location=location,
                             reason=f"unparsable: unreadable member ({data})")
                continue
            yield RawEntry(source=self.source, key=key, group=material_id, location=location,
                           payload={"cif": decode_text(data), "labels": labels})

    def _scan_rows(self, start: int, end: int, first_row: int) -> Iterator[RawEntry | Reject]:
        """The records of CSV bytes [start, end), numbered from `first_row` (as `_scan_csv` numbers them)."""
        if not hasattr(self, "_columns"):
            self._columns = self._csv_header()
            self._structures = _Structures(self.structures)
        id_at, wanted = self._columns
        with open(self.csv, "rb") as handle:
            handle.seek(start)
            text = handle.read(end - start).decode("utf-8")
        rows = csv.reader(io.StringIO(text, newline=""))
        yield from self._row_entries(rows, first_row, id_at, wanted, self._structures)

    def _row_entries(self, rows, first_row: int, id_at: int, wanted: list, structures: "_Structures") -> Iterator[RawEntry | Reject]:
        for row_number, row in enumerate(rows, start=first_row):
            row_at = f"{self.csv.name}:row {row_number}"
            material_id = row[id_at].strip() if id_at < len(row) else ""
            if not material_id:
                yield Reject(key=f"{self.source}:{row_at}", source=self.source, location=row_at,
                             reason="missing_field: empty MaterialId")
                continue
            key = f"{self.source}:{material_id}"
            location, data = structures.read(material_id)
            if data is None:
                yield Reject(key=key, source=self.source, location=f"{row_at} → {location}",
                             reason=f"missing_field: no CIF {location} for this row")
                continue
            labels = {field: row[i] for i, field in wanted if i < len(row)}
            yield RawEntry(source=self.source, key=key, group=material_id, location=f"{row_at} → {location}",
                           payload={"cif": decode_text(data), "labels": labels})

    def _scan_csv(self) -> Iterator[RawEntry | Reject]:
        structures = _Structures(self.structures)
        try:
            with open_text(self.csv) as handle:
                id_at, wanted, reader = _header(csv.reader(handle))
                if id_at is None:
                    key, location, reason = self._no_id_column()
                    yield Reject(key=key, source=self.source, location=location, reason=reason)
                    return
                yield from self._row_entries(reader, 1, id_at, wanted, structures)
        finally:
            structures.close()

    # ----------------------------------------------------------------------------- parse
    def parse(self, entry: RawEntry) -> CrystalRecord:
        arrays = arrays_from_cif(entry.payload["cif"], fast=self.fast_cif)
        labels: dict = {}
        properties: dict[str, float] = {}
        for field, text in entry.payload["labels"].items():
            value = csv_float(text, field)
            if value is None:
                continue
            if field.startswith("properties."):
                properties[field.split(".", 1)[1]] = value
            else:
                labels[field] = value
        if "energy" in labels:
            labels["energy_per_atom"] = labels["energy"] / len(arrays[0])
        return make_record(entry.key, entry.source, arrays, group=entry.group, properties=properties, **labels)
