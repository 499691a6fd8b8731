"""MPtrj (`MPtrj_2022.9_full.json`, CHGNet's training set): `{mp_id: {frame_id: frame}}`.

The upstream file is ~11 GB, so `scan` never loads it: `_jsonstream` walks the two outer objects
and decodes one frame at a time (bare NaN/Infinity tokens included, which strict JSON parsers
refuse). A file cut mid-frame yields every complete frame before the cut, then one
`truncated_file` reject. Plain `.json` or `.json.gz`.

Frame → record (units as in `data_pipeline.record`):
  structure                 pymatgen Structure dict (read directly, not via Structure.from_dict)
  corrected_total_energy    → energy (eV)
  energy_per_atom           → energy_per_atom (eV/atom; MP2020-corrected, CHGNet's target)
  ef_per_atom               → formation_energy_per_atom (eV/atom)
  bandgap                   → band_gap (eV)
  force                     → forces (eV/Å, N×3) — required
  stress                    → stress (GPa) = -0.1 × file value: the file holds VASP kBar with
                              VASP's sign (positive = compressive); CHGNet's convention.
  magmom                    → magmoms (μB, N; may be null, kept as signed in the file)
  uncorrected_total_energy, e_per_atom_relaxed, ef_per_atom_relaxed → properties
Key `mptrj:<mp_id>:<frame_id>`; group `<mp_id>` so every frame of a material lands in one split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline.build.readers import register_reader
from data_pipeline.build.readers._common import (
    array_label,
    arrays_from_structure_dict,
    file_identity,
    make_record,
    open_text,
    optional_float,
)
from data_pipeline.build.readers._jsonindex import (
    block_ranges,
    chain_blocks,
    index_block,
    member_boundaries,
    plan_ranges,
    read_members,
)
from data_pipeline.build.readers._jsonstream import JsonStream, Malformed, Truncated, iter_object
from data_pipeline.build.readers.base import RawEntry, Reject
from data_pipeline.record import CrystalRecord
from data_pipeline.build.validate import reject

KBAR_TO_GPA_CHGNET = -0.1  # VASP kBar (positive = compressive) → GPa (positive = tensile)
_REQUIRED = ("structure", "energy_per_atom", "force", "stress")
_PROPERTY_KEYS = ("uncorrected_total_energy", "e_per_atom_relaxed", "ef_per_atom_relaxed")
INDEX_BLOCK = 1 << 26  # bytes per parallel index task (64 MB: ~0.3 s of numpy each; 11 GB → 170 tasks)
BYTES_PER_FRAME = 7000  # MPtrj_2022.9_full.json: ~11 GB over 1.58 M frames; sizes the planned parts


@register_reader("mptrj")
class MPtrjReader:
    name = "mptrj"

    def __init__(self, path, source: str = "mptrj", **options):
        self.path = Path(path)
        self.source = source
        self.chunk = int(options.pop("chunk_chars", 1 << 20))
        self.part_bytes = options.pop("part_bytes", None)  # planned part size; default entries × BYTES_PER_FRAME
        if options:
            raise TypeError(f"mptrj reader: unknown options {sorted(options)}")
        if not self.path.is_file():
            raise FileNotFoundError(f"mptrj reader: {self.path} is not a file (expected MPtrj_*.json or .json.gz)")

    def scan(self) -> Iterator[RawEntry | Reject]:
        with open_text(self.path) as handle:
            yield from self._walk(JsonStream(handle, chunk=self.chunk))

    # Planned reading (data_pipeline.build.readers.base): the driver indexes the material boundaries
    # of a plain .json in one numpy pass; each part is a byte range of whole materials that a task
    # decodes itself. A gzip file cannot be read from the middle, so it is scanned (plan → None).
    def identity(self) -> str:
        return file_identity(self.path)

    def plan(self, entries: int, map_tasks=None) -> list[dict] | None:
        """`map_tasks(fn, [args, ...])` (from the build: its executor) indexes blocks of a file
        bigger than one block in parallel tasks; without it the driver indexes sequentially."""
        if self.path.name.lower().endswith(".gz"):
            return None
        if map_tasks is not None and self.path.stat().st_size > INDEX_BLOCK:
            boundaries = chain_blocks(self.path, map_tasks(index_block, block_ranges(self.path, INDEX_BLOCK)))
        else:
            boundaries = member_boundaries(self.path)
        if boundaries is None:
            return None  # not an object: the scan reports what it is
        return [dict(part, identity=self.identity()) for part in plan_ranges(boundaries, int(self.part_bytes or entries * BYTES_PER_FRAME))]

    def scan_part(self, part: dict) -> Iterator[RawEntry | Reject]:
        """The entries of one planned byte range. A syntax error skips the rest of this part only
        (a sequential scan loses the rest of the file)."""
        yield from self._walk(read_members(self.path, part["start"], part["end"], part["char"], self.chunk))

    def _walk(self, stream: JsonStream) -> Iterator[RawEntry | Reject]:
        mp_id = frame_id = None
        try:
            for mp_id, _ in iter_object(stream):
                frame_id = None
                if stream.peek() != "{":
                    value = stream.value()
                    yield self._reject(f"{self.source}:{mp_id}", f"material {mp_id}", "unparsable",
                                       f"material {mp_id} is {type(value).__name__}, expected an object of frames")
                    continue
                for frame_id, _ in iter_object(stream):
                    frame = stream.value()
                    yield RawEntry(
                        source=self.source,
                        key=f"{self.source}:{mp_id}:{frame_id}",
                        group=mp_id,
                        location=f"{self.path.name}:{mp_id}/{frame_id}",
                        payload=frame,
                    )
                frame_id = None
        except Truncated as error:
            key = f"{self.source}:{mp_id}:{frame_id}" if frame_id else f"{self.source}:{self.path.name}"
            yield self._reject(key, f"after {mp_id}/{frame_id}" if mp_id else "start", "truncated_file", str(error))
        except Malformed as error:
            key = f"{self.source}:{mp_id}:{frame_id}" if frame_id else f"{self.source}:{self.path.name}"
            yield self._reject(key, f"after {mp_id}/{frame_id}" if mp_id else "start", "unparsable",
                               f"{error}; the rest of the file is skipped")

    def _reject(self, key: str, where: str, code: str, detail: str) -> Reject:
        return Reject(key=key, source=self.source, location=f"{self.path.name}:{where}", reason=f"{code}: {detail}")

    def parse(self, entry: RawEntry) -> CrystalRecord:
        frame = entry.payload
        if not isinstance(frame, dict):
            raise reject("unparsable", f"frame is {type(frame).__name__}, expected an object")
        for name in _REQUIRED:
            if name not in frame:
                raise reject("missing_field", f"frame has no {name!r}")
        numbers, frac, lattice, _ = arrays_from_structure_dict(frame["structure"])
        stress = array_label(frame["stress"], "stress")
        magmom = frame.get("magmom")
        return make_record(
            entry.key,
            entry.source,
            (numbers, frac, lattice),
            group=entry.group,
            energy=optional_float(frame.get("corrected_total_energy"), "corrected_total_energy"),
            energy_per_atom=optional_float(frame["energy_per_atom"], "energy_per_atom"),
            formation_energy_per_atom=optional_float(frame.get("ef_per_atom"), "ef_per_atom"),
            band_gap=optional_float(frame.get("bandgap"), "bandgap"),
            forces=array_label(frame["force"], "force"),
            stress=None if stress is None else kbar_to_gpa(stress),
            magmoms=None if magmom is None else array_label(magmom, "magmom"),
            properties={name: optional_float(frame.get(name), name) for name in _PROPERTY_KEYS},
        )


def kbar_to_gpa(stress_kbar: np.ndarray) -> np.ndarray:
    """MPtrj/VASP stress (kBar, positive = compressive) → record stress (GPa, positive = tensile)."""
    return KBAR_TO_GPA_CHGNET * np.asarray(stress_kbar, dtype=np.float64)
