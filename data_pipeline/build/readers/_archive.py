"""Read many small files from a folder, a .zip or a .tar(.gz) the same way, without extracting.

Folders and zips are walked in sorted member-name order (deterministic on every file system);
tar archives are streamed in archive order (they have no index to sort without a full pass).
Member names are POSIX relative paths ("by_id/0004e2f472.CIF") whatever the container.
"""
from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator

TRUNCATED = ""  # member name yielded (with the error) when an archive ends early
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def container_label(path: Path) -> str:
    return path.name + ("!" if is_archive(path) else "/")


def iter_members(path: Path, accept: Callable[[str], bool]) -> Iterator[tuple[str, bytes | Exception]]:
    """(member name, bytes) for every accepted member; an unreadable member yields its exception
    instead of bytes so the caller can reject it and go on."""
    path = Path(path)
    if path.is_dir():
        yield from _folder(path, accept)
    elif path.name.lower().endswith(".zip"):
        yield from _zip(path, accept)
    elif is_archive(path):
        yield from _tar(path, accept)
    else:
        raise ValueError(f"{path} is neither a folder nor a .zip/.tar/.tar.gz archive")


def _folder(root: Path, accept) -> Iterator[tuple[str, bytes | Exception]]:
    for member, _ in _folder_names(root, accept):
        try:
            yield member, (root / member).read_bytes()
        except OSError as error:
            yield member, error


def _zip(path: Path, accept) -> Iterator[tuple[str, bytes | Exception]]:
    with zipfile.ZipFile(path) as archive:
        names = sorted(info.filename for info in archive.infolist() if not info.is_dir() and accept(info.filename))
        for member in names:
            try:
                yield member, archive.read(member)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:  # CRC errors, bad members
                yield member, error


def _tar(path: Path, accept) -> Iterator[tuple[str, bytes | Exception]]:
    with tarfile.open(path, mode="r|*") as archive:  # streaming: no random access, no full index
        members = iter(archive)
        while True:
            try:
                info = next(members)
            except StopIteration:
                return
            except (tarfile.TarError, OSError, EOFError) as error:  # cut or corrupt archive: stop here
                yield TRUNCATED, error
                return
            if not info.isfile() or not accept(info.name):
                continue
            try:
                handle = archive.extractfile(info)
                data = handle.read() if handle else OSError("unreadable member")
            except (tarfile.TarError, OSError, EOFError) as error:  # a stream cannot skip a bad member
                yield TRUNCATED, OSError(f"{info.name}: {error}")
                return
            yield info.name.removeprefix("./"), data


# ------------------------------------------------------------------ planned reading (folders and zips)
def can_list(path: Path) -> bool:
    """Folders and zips can be listed cheaply on the driver and read member by member in tasks;
    a tar stream has no index (it is scanned instead)."""
    path = Path(path)
    return path.is_dir() or path.name.lower().endswith(".zip")


def list_members(path: Path, accept: Callable[[str], bool]) -> list[tuple[str, str]]:
    """(member, identity) in `iter_members` order without reading any content. The identity is
    what a resumed build compares: size and mtime for a file, size and CRC from a zip's directory."""
    path = Path(path)
    if path.is_dir():
        out = []
        for member in (m for m, _ in _folder_names(path, accept)):
            try:
                stat = (path / member).stat()
                out.append((member, f"{stat.st_size}:{stat.st_mtime_ns}"))
            except OSError as error:
                out.append((member, f"unreadable: {error}"))
        return out
    with zipfile.ZipFile(path) as archive:
        infos = sorted((i for i in archive.infolist() if not i.is_dir() and accept(i.filename)), key=lambda i: i.filename)
        return [(i.filename, f"{i.file_size}:{i.CRC}") for i in infos]


def _folder_names(root: Path, accept) -> Iterator[tuple[str, None]]:
    names = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = Path(folder).relative_to(root)
        for name in files:
            member = (rel / name).as_posix() if str(rel) != "." else name
            if accept(member):
                names.append(member)
    return ((m, None) for m in sorted(names))


class MemberReader:
    """Reads single members of a folder or zip; a zip is opened once (its central directory can
    be large: GNoME's by_id.zip lists ~380k CIFs)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None

    def read(self, member: str) -> bytes | Exception:
        try:
            if self.path.is_dir():
                return (self.path / member).read_bytes()
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            return self._zip.read(member)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as error:
            return error

    def __getstate__(self):  # an open zip handle does not travel; a copy opens its own
        return {"path": self.path, "_zip": None}
