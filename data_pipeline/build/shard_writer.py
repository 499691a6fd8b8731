"""Deterministic tar writing: the same samples in the same order give the same bytes.

We write tars with `tarfile` ourselves rather than webdataset's TarWriter or Ray Data's
`write_webdataset`: every member gets mtime 0, uid/gid 0, empty user/group names and mode 0644,
members go in the order given (sample by sample, `.json` before `.safetensors`), and the file is
written to a temporary name and renamed, so a killed build never leaves a half shard under the
final name. Ray Data's writer names files by uuid and its default `.pt` decoder unpickles; we
store only JSON and safetensors, so reading a shard never executes code.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from data_pipeline.shard_format import ARRAYS_EXT, JSON_EXT

MEMBER_EXTS = (JSON_EXT, ARRAYS_EXT)
_BLOCK = 512


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _template() -> bytearray:
    header = bytearray(_tarinfo("x", 0).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    header[0:100] = bytes(100)
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    return header


_USTAR_TEMPLATE = _template()


def ustar_header(name: bytes, size: int) -> bytes:
    """The header `tarfile` writes for our fixed metadata (checked in the tests), patched directly:
    name (≤ 100 bytes) and size fields, then the checksum."""
    header = bytearray(_USTAR_TEMPLATE)
    header[0:len(name)] = name
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def member_bytes(name: str, size: int) -> int:
    """Bytes one member takes in a tar (header + padded data; long names add a PAX header)."""
    data = -(-size // _BLOCK) * _BLOCK
    header = _BLOCK if len(name.encode()) <= 100 else 3 * _BLOCK + -(-len(name.encode()) // _BLOCK) * _BLOCK
    return header + data


def sample_tar_bytes(name: str, sizes: dict[str, int]) -> int:
    return sum(member_bytes(f"{name}.{ext}", sizes[ext]) for ext in MEMBER_EXTS)


class DeterministicTarWriter:
    """Append webdataset samples to a tar; `close()` renames it into place and returns its sha256.

    Headers are made by `tarfile.TarInfo.tobuf` (ustar; PAX only for names over 100 bytes) and
    written directly, which is several times faster than `TarFile.addfile` for small members.
    The result is a plain POSIX tar: two zero blocks at the end, padded to 10 KiB like tarfile's.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self._file = open(self.tmp, "wb")
        self._sha = hashlib.sha256()
        self._pos = 0
        self.offsets: dict[str, tuple[int, int]] = {}
        self.num_samples = 0

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self._pos += len(data)

    def write(self, sample: dict) -> None:
        name = sample["__key__"]
        for ext in MEMBER_EXTS:
            data = sample[ext]
            data = data.encode() if isinstance(data, str) else bytes(data)
            member = f"{name}.{ext}"
            encoded = member.encode()
            if len(encoded) <= 100:
                self._put(ustar_header(encoded, len(data)))
            else:  # a PAX record carries the long name
                self._put(_tarinfo(member, len(data)).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            self.offsets[member] = (self._pos, len(data))
            self._put(data)
            if len(data) % _BLOCK:
                self._put(b"\0" * (_BLOCK - len(data) % _BLOCK))
        self.num_samples += 1

    def close(self) -> tuple[str, int]:
        """Finish the tar, fsync, rename to the final path; returns (sha256 hex, size in bytes)."""
        self._put(b"\0" * (2 * _BLOCK))
        if self._pos % tarfile.RECORDSIZE:
            self._put(b"\0" * (tarfile.RECORDSIZE - self._pos % tarfile.RECORDSIZE))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return self._sha.hexdigest(), self._pos

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "DeterministicTarWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()


class BlobWriter:
    """The build's intermediate chunk file: encoded members back to back, located by (offset, size)
    in the chunk's JSON index. Not a tar: it is never read by anything but the build."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self._file = open(self.tmp, "wb")
        self._pos = 0

    def write(self, data: bytes) -> tuple[int, int]:
        self._file.write(data)
        ref = (self._pos, len(data))
        self._pos += len(data)
        return ref

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self._file.close()
            self.tmp.unlink(missing_ok=True)


def write_tar(path: str | Path, samples: Iterable[dict]) -> tuple[str, int, int]:
    """Write samples to `path` deterministically; returns (sha256, bytes, number of samples)."""
    with DeterministicTarWriter(path) as writer:
        for sample in samples:
            writer.write(sample)
        sha, size = writer.close()
    return sha, size, writer.num_samples


def read_members(path: str | Path, refs: Iterable[tuple[str, int, int]]) -> Iterator[bytes]:
    """Read members by (name, offset, size) from a tar written by `DeterministicTarWriter`."""
    with open(path, "rb") as handle:
        for _, offset, size in refs:
            handle.seek(offset)
            yield handle.read(size)


def file_sha256(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
