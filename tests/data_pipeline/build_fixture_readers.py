"""A reader following the `data_pipeline.build.readers.base.Reader` contract, for build tests that need
crafted inputs (supercells, permuted copies, broken rows). Used through the build's
`package.module:Class` reader kind; Ray workers import it because the tests put this folder on
PYTHONPATH before starting Ray.

Input: JSON lines `{"id", "group"?, "numbers", "frac", "lattice", "energy_per_atom"?, "broken"?}`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_pipeline.build.readers.base import RawEntry, RecordError, Reject
from data_pipeline.record import CrystalRecord

KIND = "build_fixture_readers:JsonlReader"


class JsonlReader:
    name = "jsonl"

    def __init__(self, path, source: str = "jsonl"):
        self.path = Path(path)
        self.source = source
        if not self.path.is_file():
            raise FileNotFoundError(f"jsonl reader: {self.path} not found")

    def scan(self):
        with open(self.path) as handle:
            for number, line in enumerate(handle, 1):
                location = f"{self.path.name}:line {number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield Reject(key=f"{self.source}:line{number}", source=self.source, location=location,
                                 reason=f"unparsable: {exc}")
                    continue
                key = f"{self.source}:{row['id']}"
                yield RawEntry(source=self.source, key=key, group=row.get("group", ""), location=location, payload=row)

    def parse(self, entry: RawEntry) -> CrystalRecord:
        row = entry.payload
        if row.get("broken"):
            raise RecordError(f"missing_field: {row['broken']}")
        return CrystalRecord(
            key=entry.key,
            source=self.source,
            group=entry.group,
            atomic_numbers=row["numbers"],
            frac_coords=row["frac"],
            lattice=row["lattice"],
            energy_per_atom=row.get("energy_per_atom"),
        )


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def structure_row(ident, structure, **extra) -> dict:
    """A JSONL row from a pymatgen Structure."""
    return {
        "id": ident,
        "numbers": [int(site.specie.Z) for site in structure],
        "frac": np.asarray(structure.frac_coords).tolist(),
        "lattice": np.asarray(structure.lattice.matrix).tolist(),
        **extra,
    }


def crafted_rows() -> list[dict]:
    """Rock salt and copies of it (supercell, permuted, translated), zinc blende (same formula,
    another structure), silicon, a broken row and a repeated key; three 'frames' of one group."""
    from pymatgen.core import Lattice, Structure

    rocksalt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    zincblende = Structure.from_spacegroup("F-43m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    silicon = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.43), ["Si"], [[0, 0, 0]])
    supercell = rocksalt.copy()
    supercell.make_supercell([1, 2, 1])
    permuted = Structure(rocksalt.lattice, list(reversed(rocksalt.species)), list(reversed(rocksalt.frac_coords)))
    translated = rocksalt.copy()
    translated.translate_sites(list(range(len(rocksalt))), [0.11, 0.23, 0.37])
    frames = []
    for step, scale in enumerate((1.0, 1.01, 1.02)):
        frame = silicon.copy()
        frame.scale_lattice(silicon.volume * scale ** 3)
        frames.append(structure_row(f"si-traj:{step}", frame, group="si-traj", energy_per_atom=-5.4 + step * 0.01))
    return [
        structure_row("rocksalt", rocksalt, energy_per_atom=-3.4),
        structure_row("rocksalt-supercell", supercell),
        structure_row("rocksalt-permuted", permuted),
        structure_row("rocksalt-translated", translated),
        structure_row("zincblende", zincblende, energy_per_atom=-3.1),
        {"id": "broken", "numbers": [1], "frac": [[0, 0, 0]], "lattice": [[3, 0, 0], [0, 3, 0], [0, 0, 3]],
         "broken": "no structure in this row"},
        structure_row("rocksalt", rocksalt),  # the same key again
        *frames,
    ]


FAILING_KIND = "build_fixture_readers:FailingPlanReader"


class FailingPlanReader(JsonlReader):
    """Plans one part per 2 lines. A row with "die_reading" is yielded, then the reader raises
    (it breaks mid-part); a row with "die_planning" makes the plan itself raise there."""

    def plan(self, entries: int):
        lines = self.path.read_text().splitlines()

        def parts():
            for start in range(0, len(lines), 2):
                if any("die_planning" in line for line in lines[start : start + 2]):
                    raise OSError("the listing broke")
                yield {"lines": [start, start + 2]}

        return parts()

    def scan_part(self, part: dict):
        start, end = part["lines"]
        for number, line in enumerate(self.path.read_text().splitlines()[start:end], start + 1):
            row = json.loads(line)
            yield RawEntry(source=self.source, key=f"{self.source}:{row['id']}", group=row.get("group", ""),
                           location=f"{self.path.name}:line {number}", payload=row)
            if row.get("die_reading"):
                raise OSError("disk went away")
