"""CDVAE-style CSVs (MP-20, Perov-5, Carbon-24, MPTS-52): one row per crystal, a `cif` column.

`path` is a `.csv` / `.csv.gz` file or a folder of them (read in sorted file-name order). The CSV
module streams rows, so multi-line CIF fields cost one row of memory. Columns:

  (unnamed first column)         the upstream pandas index, ignored
  material_id                    → key `<source>:<material_id>` and split group (row number when absent)
  cif                            → structure (gemmi fast path for P1 CIFs, pymatgen otherwise)
  formation_energy_per_atom      → formation_energy_per_atom (eV/atom)
  band_gap                       → band_gap (eV)
  e_above_hull, energy_above_hull → e_above_hull (eV/atom)
  energy_per_atom                → energy_per_atom (eV/atom; Carbon-24)
  any other column whose cell is a number → properties[column] (heat_ref, heat_all, dir_gap,
                                   ind_gap, year, spacegroup.number, ...); text columns
                                   (pretty_formula, elements, formula) and booleans are skipped.

`source` defaults to the file name (or its folder's when the file is named train/val/test):
mp_20/val.csv.gz → "mp20", perov_5/val.csv → "perov5". Options: `source`, `fast_cif` (True),
`cif_column` ("cif"), `id_column` ("material_id").
"""
from __future__ import annotations

import csv
import functools
import sys
from pathlib import Path
from typing import Iterator

from data_pipeline.build.readers import register_reader
from data_pipeline.build.readers._common import MISSING_CELLS, arrays_from_cif, csv_float, make_record, open_text, source_name_from_path
from data_pipeline.build.readers.base import RawEntry, Reject
from data_pipeline.record import CrystalRecord
from data_pipeline.build.validate import reject

LABEL_COLUMNS = {
    "formation_energy_per_atom": "formation_energy_per_atom",
    "band_gap": "band_gap",
    "e_above_hull": "e_above_hull",
    "energy_above_hull": "e_above_hull",
    "energy_per_atom": "energy_per_atom",
}
_SKIP = {"", "unnamed: 0", "index"}

csv.field_size_limit(min(sys.maxsize, (1 << 31) - 1))  # CIFs of large cells exceed the 128 kB default


def csv_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.lower().endswith((".csv", ".csv.gz")))
        if not files:
            raise FileNotFoundError(f"no .csv or .csv.gz files in {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return [path]


@register_reader("cdvae_csv")
class CdvaeCsvReader:
    name = "cdvae_csv"

    def __init__(self, path, source: str | None = None, fast_cif: bool = True, cif_column: str = "cif",
                 id_column: str = "material_id"):
        self.path = Path(path)
        self.files = csv_files(self.path)
        self.source = source or source_name_from_path(self.path, "csv")
        self.fast_cif = fast_cif
        self.cif_column = cif_column
        self.id_column = id_column

    def scan(self) -> Iterator[RawEntry | Reject]:
        for file in self.files:
            with open_text(file) as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if header is None:
                    continue
                if self.cif_column not in header:
                    yield Reject(key=f"{self.source}:{file.name}", source=self.source, location=file.name,
                                 reason=f"missing_field: no {self.cif_column!r} column in header {header}")
                    continue
                cif_at = header.index(self.cif_column)
                id_at = header.index(self.id_column) if self.id_column in header else None
                for row_number, row in enumerate(reader, start=1):
                    location = f"{file.name}:row {row_number}"
                    material_id = row[id_at].strip() if id_at is not None and id_at < len(row) else ""
                    material_id = material_id or f"{file.name.split('.')[0]}-{row_number}"
                    key = f"{self.source}:{material_id}"
                    if len(row) != len(header):
                        yield Reject(key=key, source=self.source, location=location,
                                     reason=f"unparsable: row has {len(row)} fields, header has {len(header)}")
                        continue
                    labels = {name: row[i] for i, name in enumerate(header) if i not in (cif_at, id_at)}
                    yield RawEntry(source=self.source, key=key, group=material_id, location=location,
                                   payload={"cif": row[cif_at], "labels": labels})

    def parse(self, entry: RawEntry) -> CrystalRecord:
        payload = entry.payload
        arrays = arrays_from_cif(payload["cif"], fast=self.fast_cif)
        return make_record(entry.key, entry.source, arrays, group=entry.group, **map_labels(payload["labels"]))


def map_labels(cells: dict[str, str]) -> dict:
    """CSV cells → record label keyword arguments (known columns) plus `properties` (other numbers)."""
    labels: dict = {}
    properties: dict[str, float] = {}
    for column, text in cells.items():
        role = _column_role(column)
        if role is _FREE:
            value = _number_or_none(text)  # empty / NaN cells are a missing value; text columns (formula,
            if value is not None:           # elements list, booleans) are not properties
                properties[column] = value
        elif role is not _SKIPPED:  # a label column: `role` is the label's name
            value = csv_float(text, column)
            if value is not None:
                if role in labels and labels[role] != value:
                    raise reject("bad_label_type", f"columns disagree on {role}")
                labels[role] = value
    labels["properties"] = properties
    return labels


_SKIPPED, _FREE = object(), object()
# What a text float() accepts can start with (ASCII): a digit, a sign, a point, inf/infinity/nan.
_NUMBER_STARTS = frozenset("0123456789+-.iInN")


@functools.lru_cache(maxsize=4096)
def _column_role(column: str):
    """_SKIPPED (the index columns), the label name (LABEL_COLUMNS) or _FREE (a possible property):
    decided once per header name, not once per cell."""
    if column.strip().lower() in _SKIP:
        return _SKIPPED
    return LABEL_COLUMNS.get(column, _FREE)


def _number_or_none(text: str | None) -> float | None:
    """csv_float's number, or None where it returns None or refuses the text (without building and
    catching its reject: text columns are in every row)."""
    if text is None:
        return None
    text = text.strip()
    if text == "" or text.lower() in MISSING_CELLS:
        return None
    if text[0].isascii() and text[0] not in _NUMBER_STARTS:  # "CeSe2", "['Ce', 'Se']", "True": float() refuses
        return None
    try:
        return float(text)
    except ValueError:
        return None
