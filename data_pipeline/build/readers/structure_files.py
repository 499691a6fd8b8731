"""Any folder or archive (.zip, .tar, .tar.gz/.tgz) of CIF and POSCAR files, read in place.

Files are recognised by name: `*.cif` (any case, e.g. GNoME's `.CIF`) → CIF; `POSCAR*`,
`CONTCAR*`, `*.vasp`, `*.poscar` → VASP POSCAR. Other members are ignored. Folders and zips are
read in sorted path order, tars in archive order. Key `<source>:<file stem>` (the file name
without its extension; `POSCAR-JVASP-10.vasp` → `POSCAR-JVASP-10`); when two files share a stem,
later ones are keyed by their relative path without extension. `source` defaults to the folder
or archive name (lower-case letters and digits). Options: `source`, `fast_cif` (True).
No labels: these files carry structures only.
"""
from __future__ import annotations


from pathlib import Path, PurePosixPath
from typing import Iterator

from data_pipeline.build.readers import register_reader
from data_pipeline.build.readers._archive import TRUNCATED, MemberReader, can_list, container_label, iter_members, list_members
from data_pipeline.build.readers._common import arrays_from_cif, arrays_from_poscar, batched, make_record, source_name_from_path
from data_pipeline.build.readers.base import RawEntry, Reject
from data_pipeline.record import CrystalRecord
from data_pipeline.build.validate import reject


def structure_format(member: str) -> str | None:
    name = PurePosixPath(member).name
    lower = name.lower()
    if lower.endswith(".cif"):
        return "cif"
    if lower.startswith(("poscar", "contcar")) or lower.endswith((".vasp", ".poscar")):
        return "poscar"
    return None


def member_stem(member: str) -> str:
    name = PurePosixPath(member).name
    return name.rsplit(".", 1)[0] if "." in name else name


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # old CIFs: every byte maps, the parser decides


@register_reader("structure_files")
class StructureFilesReader:
    name = "structure_files"

    def __init__(self, path, source: str | None = None, fast_cif: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"structure_files reader: {self.path} does not exist")
        self.source = source or source_name_from_path(self.path, "files")
        self.fast_cif = fast_cif

    def scan(self) -> Iterator[RawEntry | Reject]:
        seen: set[str] = set()
        where = container_label(self.path)
        for member, data in iter_members(self.path, lambda m: structure_format(m) is not None):
            if member == TRUNCATED:
                yield Reject(key=f"{self.source}:{self.path.name}", source=self.source, location=where,
                             reason=f"truncated_file: archive ends early ({data})")
                return
            stem = member_stem(member)
            if stem in seen:
                stem = member.rsplit(".", 1)[0] if "." in PurePosixPath(member).name else member
            seen.add(stem)
            key = f"{self.source}:{stem}"
            location = f"{where}{member}"
            if isinstance(data, Exception):
                yield Reject(key=key, source=self.source, location=location, reason=f"unparsable: unreadable ({data})")
                continue
            yield RawEntry(source=self.source, key=key, group=stem, location=location,
                           payload={"format": structure_format(member), "text": decode_text(data)})

    # Planned reading (readers.base): a folder or zip is listed on the driver (names, sizes, CRCs),
    # its members are read in the parse tasks. A tar stream is scanned (plan → None).
    def plan(self, entries: int) -> Iterator[dict] | None:
        if not can_list(self.path):
            return None
        return ({"members": batch} for batch in batched(self._plan_members(), entries))

    def _plan_members(self) -> Iterator[list]:
        seen: set[str] = set()
        for member, identity in list_members(self.path, lambda m: structure_format(m) is not None):
            stem = member_stem(member)
            if stem in seen:
                stem = member.rsplit(".", 1)[0] if "." in PurePosixPath(member).name else member
            seen.add(stem)
            yield [member, stem, identity]

    def scan_part(self, part: dict) -> Iterator[RawEntry | Reject]:
        where = container_label(self.path)
        if not hasattr(self, "_members"):
            self._members = MemberReader(self.path)
        for member, stem, _ in part["members"]:
            key, location, data = f"{self.source}:{stem}", f"{where}{member}", self._members.read(member)
            if isinstance(data, Exception):
                yield Reject(key=key, source=self.source, location=location, reason=f"unparsable: unreadable ({data})")
                continue
            yield RawEntry(source=self.source, key=key, group=stem, location=location,
                           payload={"format": structure_format(member), "text": decode_text(data)})

    def parse(self, entry: RawEntry) -> CrystalRecord:
        fmt, text = entry.payload["format"], entry.payload["text"]
        if fmt == "cif":
            arrays = arrays_from_cif(text, fast=self.fast_cif)
        elif fmt == "poscar":
            arrays = arrays_from_poscar(text)
        else:
            raise reject("unparsable", f"unknown structure format {fmt!r}")
        return make_record(entry.key, entry.source, arrays, group=entry.group)
