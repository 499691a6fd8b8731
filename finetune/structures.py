"""Structure files named by the user (CIF / POSCAR files, folders, archives) as reader entries.

Folders and archives go through the data pipeline's `structure_files` reader as they are. The
reader walks containers only, so a single named file becomes one entry built with the reader's
own format rules (`structure_format`, `member_stem`, `decode_text`) and is parsed by the same
reader: parsing and validation stay in one place.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from data_pipeline.build.readers import RawEntry, Reject, open_reader

SOURCE = "files"


def iter_structure_entries(paths: Iterable[str | Path]) -> Iterator[tuple[object, RawEntry] | Reject]:
    """(reader, entry) per structure found, or a Reject naming the path and what is wrong."""
    from data_pipeline.build.readers.structure_files import decode_text, member_stem, structure_format

    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            yield Reject(str(raw), SOURCE, str(raw), "unparsable: no such file or folder")
            continue
        if path.is_dir() or _is_archive(path):
            reader = open_reader("structure_files", path, source=SOURCE)
            found = False
            for item in reader.scan():
                found = True
                yield item if isinstance(item, Reject) else (reader, item)
            if not found:
                yield Reject(str(raw), SOURCE, str(raw), "missing_field: no *.cif, POSCAR*, CONTCAR*, *.vasp or *.poscar files inside")
            continue
        fmt = structure_format(path.name)
        if fmt is None:
            yield Reject(str(raw), SOURCE, str(raw),
                         "unparsable: not a structure file name (expected *.cif, POSCAR*, CONTCAR*, *.vasp or *.poscar)")
            continue
        try:
            text = decode_text(path.read_bytes())
        except OSError as error:
            yield Reject(str(raw), SOURCE, str(raw), f"unparsable: unreadable ({error})")
            continue
        reader = open_reader("structure_files", path.parent, source=SOURCE)
        stem = member_stem(path.name)
        yield reader, RawEntry(SOURCE, f"{SOURCE}:{stem}", stem, str(path), {"format": fmt, "text": text})


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))
