"""The tar index: for every shard the byte ranges of each sample's `.json` and `.safetensors`
members and its atom count.

Read from the shard's index file (`<shard>.idx.npy`, written by the build; `np.load(mmap_mode="r")`,
so the ranks of a node share one copy in the page cache) when there is one that fits the shard
(its size and first member header agree). Otherwise (shard sets built before index files, shards
written by other tools) every header is scanned once (mmap, no data decoded), broken tars are
found here, and the scan can be cached per shard (keyed by path, size and mtime). Sample names
are not kept for indexed shards: one is read from the tar only for an error message."""
from __future__ import annotations

import io
import json
import mmap
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from crystalfm_common.atomic import write_bytes_atomic
from data_pipeline.shard_format import (
    ARRAYS_EXT,
    INDEX_COLUMNS,
    INDEX_DTYPE,
    JSON_EXT,
    ShardFormatError,
    index_path,
)


_BLOCK = 512
_MAX_CORRUPT_DETAILS = 100


class ShardCorruptError(ShardFormatError):
    """A shard member could not be read; the message names the shard and the member."""

    def __init__(self, message: str, member: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.member, self.reason = member, reason or message


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(bytes([field_bytes[0] & 0x7F]) + field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    # the checksum is the byte sum with its own 8-byte field counted as spaces
    field_bytes = header[148:156]
    return _octal(field_bytes) == sum(header) - sum(field_bytes) + 8 * 32


def iter_tar_members(buf, path: str) -> Iterator[tuple[str, int, int]]:
    """(member name, data offset, size) of every regular file in an uncompressed tar buffer.

    Handles ustar, PAX ('x' path records) and GNU long names. Raises ShardCorruptError naming the
    shard and member when a header is damaged or a member runs past the end of the file.
    """
    pos, end_of_file = 0, len(buf)
    long_name = None
    last = "<start of archive>"
    while True:
        if pos + _BLOCK > end_of_file:
            if pos < end_of_file:
                raise ShardCorruptError(f"{path}: truncated tar: partial header after member {last!r}",
                                        member=f"<header after {last}>", reason="truncated tar: partial header")
            return  # archive ends on a member boundary without the end marker: tolerated, as tar does
        header = buf[pos : pos + _BLOCK]
        if header.count(0) == _BLOCK:
            return  # end-of-archive marker
        if not _checksum_ok(header):
            raise ShardCorruptError(f"{path}: damaged tar header at byte {pos} (after member {last!r})",
                                    member=f"<header at byte {pos}>", reason="damaged tar header (bad checksum)")
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345]:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        size = _octal(header[124:136])
        kind = header[156:157]
        data = pos + _BLOCK
        shown = long_name or name
        if data + size > end_of_file:
            reason = f"truncated tar: the member needs {size} bytes at offset {data}, the file ends at {end_of_file}"
            raise ShardCorruptError(f"{path}: member {shown!r}: {reason}", member=shown, reason=reason)
        if kind in (b"x", b"X"):
            long_name = _pax_path(bytes(buf[data : data + size])) or long_name
        elif kind == b"L":
            long_name = bytes(buf[data : data + size]).split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind in (b"0", b"\0", b"7"):
            last = shown
            yield shown, data, size
            long_name = None
        else:  # directories, links, global PAX headers: nothing to read
            long_name = None if kind != b"g" else long_name
        pos = data + -(-size // _BLOCK) * _BLOCK


def _pax_path(records: bytes) -> str | None:
    path = None
    pos = 0
    while pos < len(records):
        space = records.index(b" ", pos)
        length = int(records[pos:space])
        key, _, value = records[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "replace")
        pos += length
    return path


_BASE_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's split: key up to the first dot


def _safetensors_num_atoms(buf, offset: int, size: int) -> int:
    """Atom count from a safetensors member's header, without reading its arrays."""
    if size < 8:
        raise ValueError("member shorter than the safetensors length prefix")
    length = int.from_bytes(buf[offset : offset + 8], "little")
    if length > size - 8:
        raise ValueError(f"safetensors header length {length} exceeds the member size {size}")
    header = json.loads(bytes(buf[offset + 8 : offset + 8 + length]))
    shape = header["atomic_numbers"]["shape"]
    return int(shape[0])


@dataclass
class ShardIndex:
    """Where each sample of one shard lives, and how many atoms it has."""

    path: str
    names: list[str] | None  # sample names (webdataset keys), for error messages; None: read when needed
    json_span: np.ndarray  # [S, 2] int64 (offset, size)
    arrays_span: np.ndarray  # [S, 2] int64
    num_atoms: np.ndarray  # [S] int64
    corrupt: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, member, reason)

    def __len__(self) -> int:
        return int(self.num_atoms.shape[0])


_RECORD = 10240  # tar files are padded to 20 blocks (tarfile.RECORDSIZE), as the build writes them


def read_index_file(path: str) -> ShardIndex | str:
    """The shard's index from `<shard>.idx.npy`, or why it cannot be used (no file, or it does not fit).

    Fits means: an int64 [S, 5] table whose last member is followed by the tar's two zero end
    blocks and padding to the file's size, and whose first member is the tar's first. Cheap (two
    small reads); the manifest's sha256 of each index file is the full check."""
    file = index_path(path)
    try:
        table = np.load(file, mmap_mode="r", allow_pickle=False)  # [S, 5]
    except FileNotFoundError:
        return "no index file"
    except (OSError, ValueError) as exc:
        return f"unreadable index file ({type(exc).__name__}: {exc})"
    if table.dtype != INDEX_DTYPE or table.ndim != 2 or table.shape[1] != len(INDEX_COLUMNS) or not len(table):
        return f"index file has dtype {table.dtype} and shape {table.shape}, expected int64 [S, {len(INDEX_COLUMNS)}]"
    end = -(-int(table[-1, 2] + table[-1, 3]) // _BLOCK) * _BLOCK  # the last member's padded end
    expected = -(-(end + 2 * _BLOCK) // _RECORD) * _RECORD
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size != expected:
                return f"index file describes a {expected}-byte tar, the shard has {size} bytes"
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                end_marker = buf[end : end + 2 * _BLOCK]
                try:
                    _, first_offset, first_size = next(iter_tar_members(buf, path))
                except (StopIteration, ShardCorruptError):
                    first_offset = first_size = -1
    except OSError as exc:
        raise FileNotFoundError(f"cannot open shard {path}: {exc}") from exc
    if end_marker != bytes(2 * _BLOCK):
        return f"index file's last member is not the shard's last (no end-of-archive blocks at byte {end})"
    if (first_offset, first_size) != (int(table[0, 0]), int(table[0, 1])):
        return "index file's first member is not the shard's first"
    return ShardIndex(path=path, names=None, json_span=table[:, 0:2], arrays_span=table[:, 2:4],
                      num_atoms=table[:, 4])


def sample_names(path: str) -> dict[int, str]:
    """{data offset of a sample's `.json` member: sample name} from a scan of the shard's headers
    (as far as they are readable): for error messages about shards read through an index file."""
    names = {}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            for member, offset, _ in iter_tar_members(buf, path):
                match = _BASE_EXT.match(member)
                if match is not None and match.group(2) == JSON_EXT:
                    names[offset] = match.group(1)
        except ShardCorruptError:
            pass
    return names


def index_shard(path: str, skip_corrupt: bool = False) -> ShardIndex:
    """Scan one shard's headers. Broken samples raise ShardCorruptError, or are listed in
    `corrupt` and left out with `skip_corrupt=True` (a truncated tar keeps its whole samples)."""
    corrupt: list[tuple[str, str, str]] = []

    def bad(member: str, reason: str) -> None:
        if not skip_corrupt:
            raise ShardCorruptError(f"{path}: member {member!r}: {reason}", member=member, reason=reason)
        corrupt.append((path, member, reason))

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as exc:
        raise FileNotFoundError(f"cannot open shard {path}: {exc}") from exc

    names, json_span, arrays_span, num_atoms = [], [], [], []
    groups: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
    try:
        for member, offset, length in iter_tar_members(buf, path):
            match = _BASE_EXT.match(member)
            if match is None:
                continue
            groups.setdefault(match.group(1), {})[match.group(2)] = (offset, length)
    except ShardCorruptError as exc:  # the rest of the tar is unreadable; keep what came before
        bad(exc.member, exc.reason)
        match = _BASE_EXT.match(exc.member)
        if match is not None:  # the truncated sample is counted once, not again as incomplete
            groups.pop(match.group(1), None)
    for name, members in groups.items():
        missing = [ext for ext in (JSON_EXT, ARRAYS_EXT) if ext not in members]
        if missing:
            bad(f"{name}.{missing[0]}", f"sample {name!r} has no .{missing[0]} member (incomplete sample)")
            continue
        try:
            n = _safetensors_num_atoms(buf, *members[ARRAYS_EXT])
        except Exception as exc:  # noqa: BLE001 - any header failure is this sample's corruption
            bad(f"{name}.{ARRAYS_EXT}", f"unreadable safetensors header ({type(exc).__name__}: {exc})")
            continue
        names.append(name)
        json_span.append(members[JSON_EXT])
        arrays_span.append(members[ARRAYS_EXT])
        num_atoms.append(n)
    if isinstance(buf, mmap.mmap):
        buf.close()
    return ShardIndex(
        path=path,
        names=names,
        json_span=np.asarray(json_span, dtype=np.int64).reshape(-1, 2),
        arrays_span=np.asarray(arrays_span, dtype=np.int64).reshape(-1, 2),
        num_atoms=np.asarray(num_atoms, dtype=np.int64),
        corrupt=corrupt,
    )


def _cache_file(cache_dir: str, path: str) -> Path:
    import hashlib

    st = os.stat(path)
    ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()
    return Path(cache_dir) / f"{hashlib.sha1(ident).hexdigest()}.npz"


def cached_index_shard(path: str, skip_corrupt: bool, cache_dir: str | None) -> ShardIndex:
    """index_shard, kept in `cache_dir` keyed by (absolute path, size, mtime) when given.

    Shards are immutable once their manifest is written, so a cached index stays valid; a
    rewritten shard changes size or mtime and is indexed again. Only clean shards are cached."""
    if cache_dir is None:
        return index_shard(path, skip_corrupt)
    file = _cache_file(cache_dir, path)
    if file.exists():
        try:
            with np.load(file, allow_pickle=False) as data:
                return ShardIndex(path=path, names=data["names"].tolist(), json_span=data["json_span"],
                                  arrays_span=data["arrays_span"], num_atoms=data["num_atoms"])
        except (OSError, KeyError, ValueError):
            pass  # unreadable cache entry: index again and overwrite it
    index = index_shard(path, skip_corrupt)
    if not index.corrupt:
        file.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, names=np.array(index.names, dtype=str), json_span=index.json_span,
                 arrays_span=index.arrays_span, num_atoms=index.num_atoms)
        write_bytes_atomic(file, buffer.getvalue())
    return index


@dataclass
class _GlobalIndex:
    """All shards' samples concatenated: sample id → (shard, spans, atoms)."""

    paths: list[str]
    names: list[list[str]]
    shard_of: np.ndarray  # [S] int32
    shard_start: np.ndarray  # [num_shards + 1] int64: samples of shard s are [start[s], start[s+1])
    json_span: np.ndarray  # [S, 2]
    arrays_span: np.ndarray  # [S, 2]
    num_atoms: np.ndarray  # [S]
    corrupt: list[tuple[str, str, str]]

    @classmethod
    def build(cls, paths: list[str], skip_corrupt: bool, cache_dir: str | None = None,
              use_index_files: bool = True) -> "_GlobalIndex":
        """Index files where they fit, a header scan for the other shards (with a one-line notice)."""
        shards, scanned = [], []
        for path in _progress(paths, "indexing shards"):
            index = read_index_file(path) if use_index_files else "index files not used"
            if isinstance(index, str):
                scanned.append((path, index))
                index = cached_index_shard(path, skip_corrupt, cache_dir)
            shards.append(index)
        if scanned and use_index_files:
            path, why = scanned[0]
            print(f"notice: scanning the tar headers of {len(scanned)} of {len(paths)} shard(s) ({path}: {why}; "
                  "shard sets built before index files have none: rebuild to start faster)", file=sys.stderr)
        counts = np.array([len(s) for s in shards], dtype=np.int64)
        return cls(
            paths=paths,
            names=[s.names for s in shards],
            shard_of=np.repeat(np.arange(len(shards), dtype=np.int32), counts),
            shard_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            json_span=np.concatenate([s.json_span for s in shards]) if shards else np.zeros((0, 2), np.int64),
            arrays_span=np.concatenate([s.arrays_span for s in shards]) if shards else np.zeros((0, 2), np.int64),
            num_atoms=np.concatenate([s.num_atoms for s in shards]) if shards else np.zeros(0, np.int64),
            corrupt=[c for s in shards for c in s.corrupt],
        )

    def __len__(self) -> int:
        return int(self.num_atoms.shape[0])

    def name(self, sample: int) -> str:
        shard = int(self.shard_of[sample])
        names = self.names[shard]
        if names is None:  # read through an index file: the name is in the tar header before the member
            offset = int(self.json_span[sample, 0])
            return sample_names(self.paths[shard]).get(offset, f"<sample at byte {offset}>")
        return names[sample - int(self.shard_start[shard])]


def _progress(items, desc):
    if len(items) < 64:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="shard")
