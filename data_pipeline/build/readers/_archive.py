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
    names = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = Path(folder).relative_to(root)
        for name in files:
            member = (rel / name).as_posix() if str(rel) != "." else name
            if accept(member):
                names.append(member)
    for member in sorted(names):
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
