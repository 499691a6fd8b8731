"""Shard loader: webdataset tar shards → CrystalBatch, for many nodes × DataLoader workers.

How it works (see LOADER.md for the reasoning and the trainer-facing rules):

1. index    every shard's tar headers are scanned once (mmap, no data decoded): for each
            sample the byte ranges of its `.json` and `.safetensors` members and its atom count
            (read from the safetensors header). Broken tars are found here.
2. plan     an epoch plan is computed from the index and (seed, epoch) alone, identically on
            every rank: shard order permuted, samples shuffled inside consecutive windows of
            `shuffle_buffer`, then packed greedily into batches under the atom budget. Global
            batch g goes to rank g % world_size (round-robin), and within a rank, batch j goes
            to DataLoader worker j % num_workers, so the DataLoader's round-robin fetch returns
            the rank's batches in plan order.
3. remainder every rank gets ceil(B / world_size) batches ("pad", the default): the missing
            batches of the last round are copies of the epoch's first batches with
            `batch.padding = True` (weight 0: the trainer multiplies their loss by 0 and counts 0
            atoms, so every rank still runs the same collectives). "drop" gives floor(B / W)
            instead and leaves that epoch's last partial round unseen.
4. load     a worker reads its batches' members by byte range from mmapped shards, decodes each
            with `shard_format.decode_sample` (JSON + safetensors, never pickles) and collates.

"resampled" mode is infinite: round c of epoch e draws `num_shards` shards with replacement
(seed, e, c), shuffles and packs them the same way, and deals floor(B_c / W) batches to every
rank. Resume is exact in both modes: the state is (epoch, batches consumed), and the plan is a
pure function of it.
"""
from __future__ import annotations

import glob
import io
import json
import math
import mmap
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from crystalfm_common.atomic import write_bytes_atomic
from data_pipeline.batch import CrystalBatch
from data_pipeline.collate import BatchViews, collate
from data_pipeline.record import ARRAY_LABELS, SCALAR_LABELS, CrystalRecord
from data_pipeline.shard_format import ARRAYS_EXT, JSON_EXT, ShardFormatError, decode_sample

MODES = ("epoch", "resampled")
REMAINDERS = ("pad", "drop")
_BLOCK = 512
_MAX_CORRUPT_DETAILS = 100


class ShardCorruptError(ShardFormatError):
    """A shard member could not be read; the message names the shard and the member."""

    def __init__(self, message: str, member: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.member, self.reason = member, reason or message


# ----------------------------------------------------------------------------- shard lists
def split_shards(shard_dir: str | os.PathLike, split: str) -> list[str]:
    """Absolute shard paths of one split, read from `<shard_dir>/manifest.json`.

    Tolerated manifest shapes for the split entry: `{"shards": [...]}` where each item is a
    file name or a dict with "path"/"name"/"file"; or a plain list of such items. The split is
    looked up under manifest["splits"][split], then manifest[split]. A manifest that is itself a
    plain list of tars is accepted for any split. Without a manifest, `<split>-*.tar` or
    `<split>/*.tar` in the folder are used.
    """
    shard_dir = Path(shard_dir)
    manifest_path = shard_dir / "manifest.json"
    if not manifest_path.exists():
        found = sorted(glob.glob(str(shard_dir / f"{split}-*.tar"))) or sorted(glob.glob(str(shard_dir / split / "*.tar")))
        if not found:
            raise FileNotFoundError(
                f"{manifest_path} does not exist and no {split}-*.tar or {split}/*.tar shards are there: "
                "build the shard set first (`crystalfm data build ...`)"
            )
        return found
    manifest = json.loads(manifest_path.read_text())
    if isinstance(manifest, list):
        entry = manifest
    else:
        splits = manifest.get("splits", manifest)
        if split not in splits:
            raise KeyError(f"{manifest_path}: no split {split!r}; splits present: {sorted(splits)}")
        entry = splits[split]
    items = entry.get("shards", entry.get("files", [])) if isinstance(entry, dict) else entry
    paths = []
    for item in items:
        name = item if isinstance(item, str) else next((item[k] for k in ("path", "name", "file") if k in item), None)
        if name is None:
            raise ValueError(f"{manifest_path}: split {split!r} has a shard entry without a path: {item!r}")
        path = Path(name)
        paths.append(str(path if path.is_absolute() else shard_dir / path))
    return paths


def expand_shards(shards: list[str] | str) -> list[str]:
    """A list of paths, a brace pattern (`train-{000..015}.tar`), a folder or one tar → paths."""
    if isinstance(shards, (str, os.PathLike)):
        shards = str(shards)
        if os.path.isdir(shards):
            found = sorted(glob.glob(os.path.join(shards, "*.tar")))
            if not found:
                raise FileNotFoundError(f"no .tar shards in folder {shards}")
            return found
        import braceexpand

        return list(braceexpand.braceexpand(shards))
    return [str(s) for s in shards]


# ----------------------------------------------------------------------------- tar index
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
    names: list[str]  # sample names (webdataset keys), for error messages
    json_span: np.ndarray  # [S, 2] int64 (offset, size)
    arrays_span: np.ndarray  # [S, 2] int64
    num_atoms: np.ndarray  # [S] int64
    corrupt: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, member, reason)

    def __len__(self) -> int:
        return len(self.names)


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
    def build(cls, paths: list[str], skip_corrupt: bool, cache_dir: str | None = None) -> "_GlobalIndex":
        shards = [cached_index_shard(p, skip_corrupt, cache_dir) for p in _progress(paths, "indexing shards")]
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
        return self.names[shard][sample - int(self.shard_start[shard])]


def _progress(items, desc):
    if len(items) < 64:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="shard")


# ----------------------------------------------------------------------------- planning
def pack_by_atoms(num_atoms: np.ndarray, atom_budget: int, max_crystals: int | None = None) -> np.ndarray:
    """Greedy in-order packing: [B + 1] batch boundaries so each batch's atoms ≤ atom_budget
    (a crystal larger than the budget gets a batch of its own) and crystals ≤ max_crystals."""
    n = len(num_atoms)
    cumulative = np.cumsum(num_atoms)
    bounds = [0]
    start = 0
    while start < n:
        base = cumulative[start - 1] if start else 0
        end = int(np.searchsorted(cumulative, base + atom_budget, side="right"))
        end = max(end, start + 1)
        if max_crystals is not None:
            end = min(end, start + max_crystals)
        bounds.append(end)
        start = end
    return np.asarray(bounds, dtype=np.int64)


def _shuffled_order(shard_start: np.ndarray, shard_order: np.ndarray, shuffle_buffer: int, rng) -> np.ndarray:
    """Samples of the shards in `shard_order`, shuffled inside consecutive windows."""
    pieces = [np.arange(shard_start[s], shard_start[s + 1]) for s in shard_order]
    order = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if shuffle_buffer > 1 and len(order):
        # window id + a uniform in [0, 1) as the sort key: samples stay inside their window.
        keys = np.arange(len(order)) // shuffle_buffer + rng.random(len(order))
        order = order[np.argsort(keys, kind="stable")]
    return order


@dataclass(frozen=True)
class _PlanConfig:
    atom_budget: int
    max_crystals: int | None
    shuffle_buffer: int
    seed: int
    mode: str


def _round_plan(index: _GlobalIndex, cfg: _PlanConfig, epoch: int, round_: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample order, batch bounds) of one epoch (epoch mode) or one resampling round."""
    num_shards = len(index.paths)
    shuffle = cfg.shuffle_buffer > 0
    if cfg.mode == "epoch":
        rng = np.random.default_rng([cfg.seed, epoch, 0])
        shard_order = rng.permutation(num_shards) if shuffle else np.arange(num_shards)
    else:
        rng = np.random.default_rng([cfg.seed, epoch, 1, round_])
        shard_order = rng.integers(0, num_shards, size=num_shards)
    order = _shuffled_order(index.shard_start, shard_order, cfg.shuffle_buffer, rng)
    bounds = pack_by_atoms(index.num_atoms[order], cfg.atom_budget, cfg.max_crystals)
    return order, bounds


def _rank_batches(num_global: int, rank: int, world_size: int, remainder: str) -> list[tuple[int, bool]]:
    """(global batch id, is_padding) dealt to `rank`: global batch g goes to rank g % W."""
    if remainder == "drop":
        per_rank = num_global // world_size
    else:
        per_rank = -(-num_global // world_size)
    out = []
    for j in range(per_rank):
        g = j * world_size + rank
        out.append((g % num_global, g >= num_global) if num_global else (0, True))
    return out


# ----------------------------------------------------------------------------- reading
class _ShardReader:
    """Keeps a bounded set of shards mmapped in one process; reads member bytes by range."""

    def __init__(self, paths: list[str], max_open: int = 64):
        self.paths = paths
        self.max_open = max_open
        self._open: OrderedDict[int, mmap.mmap] = OrderedDict()

    def buffer(self, shard: int):
        buf = self._open.get(shard)
        if buf is None:
            with open(self.paths[shard], "rb") as handle:
                buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._open[shard] = buf
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(shard)
        return buf

    def close(self):
        for buf in self._open.values():
            buf.close()
        self._open.clear()


class ShardDataset(torch.utils.data.IterableDataset):
    """The per-rank batch stream; a torch IterableDataset so DataLoader workers can split it.

    Yields (CrystalBatch, stats delta) pairs; ShardLoader unpacks them. Worker w of W yields the
    rank's batches j with (j - start) % W == w, so DataLoader's round-robin keeps plan order.
    """

    def __init__(self, index: _GlobalIndex, cfg: _PlanConfig, views: BatchViews, rank: int, world_size: int,
                 remainder: str, skip_corrupt: bool, dtype: torch.dtype):
        super().__init__()
        self.index, self.cfg, self.views = index, cfg, views
        self.rank, self.world_size, self.remainder = rank, world_size, remainder
        self.skip_corrupt, self.dtype = skip_corrupt, dtype
        self.fast_decode = True
        self.epoch = 0
        self.start = 0  # rank-local batches already consumed in this epoch
        self._reader: _ShardReader | None = None

    def __getstate__(self):  # mmaps stay in the process that opened them
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    # -------------------------------------------------------------- the plan
    def epoch_batches(self, epoch: int) -> Iterator[tuple[np.ndarray, bool]]:
        """This rank's (sample ids, is_padding) for one epoch, in order (infinite if resampled)."""
        round_ = 0
        while True:
            order, bounds = _round_plan(self.index, self.cfg, epoch, round_)
            remainder = self.remainder if self.cfg.mode == "epoch" else "drop"
            for g, padding in _rank_batches(len(bounds) - 1, self.rank, self.world_size, remainder):
                yield order[bounds[g] : bounds[g + 1]], padding
            if self.cfg.mode == "epoch":
                return
            if len(bounds) - 1 < self.world_size:
                raise ValueError(
                    f"resampled round has {len(bounds) - 1} batches for {self.world_size} ranks: "
                    "lower atom_budget or add data"
                )
            round_ += 1

    def num_batches(self, epoch: int) -> int:
        _, bounds = _round_plan(self.index, self.cfg, epoch, 0)
        remainder = self.remainder if self.cfg.mode == "epoch" else "drop"
        return len(_rank_batches(len(bounds) - 1, self.rank, self.world_size, remainder))

    # -------------------------------------------------------------- iteration
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._reader = self._reader or _ShardReader(self.index.paths)
        fallback = None
        for j, (samples, padding) in enumerate(self.epoch_batches(self.epoch)):
            if j < self.start or (j - self.start) % num_workers != worker:
                continue
            stats = {"corrupt_skipped": 0, "corrupt": []}
            records = self._load(samples, stats)
            if not records:  # every crystal of the batch was corrupt: keep the step, weight 0
                records, padding = fallback or self._load(self._first_good(), stats), True
            fallback = fallback or records
            batch = collate(records, self.views, dtype=self.dtype)
            batch.padding = bool(padding)
            yield batch, stats

    def _first_good(self) -> np.ndarray:
        for s in range(len(self.index)):
            try:
                self._decode_one(s)
                return np.array([s])
            except ShardFormatError:
                continue
        raise ShardCorruptError(f"no readable sample in {len(self.index.paths)} shard(s)")

    def _load(self, samples: np.ndarray, stats: dict) -> list:
        index = self.index
        # Python ints for the whole batch at once: numpy scalars make every slice slower.
        where = zip(samples.tolist(), index.shard_of[samples].tolist(), index.json_span[samples].tolist(),
                    index.arrays_span[samples].tolist())
        records = []
        for sample, shard, json_span, arrays_span in where:
            try:
                records.append(self._decode(sample, shard, json_span, arrays_span))
            except ShardFormatError as exc:
                if not self.skip_corrupt:
                    raise
                stats["corrupt_skipped"] += 1
                stats["corrupt"].append(str(exc))
        return records

    def _decode_one(self, sample: int):
        index = self.index
        return self._decode(sample, int(index.shard_of[sample]), index.json_span[sample].tolist(),
                            index.arrays_span[sample].tolist())

    def _decode(self, sample: int, shard: int, json_span, arrays_span):
        buf = self._reader.buffer(shard)
        (jo, js), (ao, asz) = json_span, arrays_span
        meta, arrays = buf[jo : jo + js], buf[ao : ao + asz]
        try:
            if self.fast_decode:
                record = decode_fast(meta, arrays)
                if record is not None:
                    return record
            return decode_sample({"__key__": "", JSON_EXT: meta, ARRAYS_EXT: arrays})
        except ShardFormatError as exc:
            name = self.index.name(sample)
            reason = str(exc).split(": ", 1)[-1]
            raise ShardCorruptError(f"{self.index.paths[shard]}: member {name!r}: {reason}", name, reason) from exc


# ----------------------------------------------------------------------------- fast decoding
_META_KEYS = frozenset(("key", "source", "group", "properties", *SCALAR_LABELS))
_FLOAT_ARRAYS = frozenset(("frac_coords", "lattice", *ARRAY_LABELS))
_JSON = json.JSONDecoder()


def _expected_shape(name: str, n: int) -> list[int]:
    if name in ("frac_coords", "forces"):
        return [n, 3]
    if name in ("lattice", "stress"):
        return [3, 3]
    return [n]  # magmoms


def decode_fast(meta_bytes: bytes, arrays_bytes: bytes) -> CrystalRecord | None:
    """The record `decode_sample` would return, built without its per-sample overhead.

    Reads the safetensors header itself and views the arrays with np.frombuffer over one
    writable copy of the member, and fills the record's fields directly: shards are written from
    CrystalRecords, so coordinates are already wrapped and arrays already int64/float64. Returns
    None for anything it does not recognise exactly (an unknown key, dtype or shape, a short
    buffer): the caller then uses `decode_sample`, which is the reference and reports errors.
    Equality with decode_sample is tested on every sample of the test shards.
    """
    try:
        meta = _JSON.decode(meta_bytes.decode())
        length = int.from_bytes(arrays_bytes[:8], "little")
        header = _JSON.decode(arrays_bytes[8 : 8 + length].decode())
    except (ValueError, UnicodeDecodeError):
        return None
    header.pop("__metadata__", None)
    if type(meta) is not dict or not _META_KEYS.issuperset(meta) or "key" not in meta or "source" not in meta:
        return None
    numbers = header.get("atomic_numbers")
    if numbers is None or numbers["dtype"] != "I64" or len(numbers["shape"]) != 1:
        return None
    n = numbers["shape"][0]
    data = bytearray(arrays_bytes)  # one writable copy shared by the arrays
    size, base = len(data), 8 + length
    arrays = {}
    for name, spec in header.items():
        start, end = spec["data_offsets"]
        shape = spec["shape"]
        if name == "atomic_numbers":
            dtype = np.int64
        elif name in _FLOAT_ARRAYS and spec["dtype"] == "F64" and shape == _expected_shape(name, n):
            dtype = np.float64
        else:
            return None
        count = math.prod(shape)
        if end - start != 8 * count or base + end > size:
            return None
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=base + start).reshape(shape)
    if "frac_coords" not in arrays or "lattice" not in arrays:
        return None
    record = object.__new__(CrystalRecord)
    fields = record.__dict__
    fields["key"] = meta["key"]
    fields["source"] = meta["source"]
    fields["atomic_numbers"] = arrays["atomic_numbers"]
    fields["frac_coords"] = arrays["frac_coords"]
    fields["lattice"] = arrays["lattice"]
    fields["group"] = meta.get("group") or meta["key"]
    for name in SCALAR_LABELS:
        fields[name] = meta.get(name)
    for name in ARRAY_LABELS:
        fields[name] = arrays.get(name)
    fields["properties"] = meta.get("properties", {})
    return record


def _identity(x):
    return x


def _worker_init(worker_id: int) -> None:
    """One thread per worker, and amd's JIT compiled once here rather than inside a batch."""
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    views = getattr(info.dataset, "views", None) if info is not None else None
    if views is not None and views.pdd_k is not None:
        warm_pdd(views.pdd_k)


_PDD_WARM: set[int] = set()


def warm_pdd(k: int) -> None:
    """Compile average-minimum-distance's numba code on a 1-atom cell (seconds, once per process)."""
    if k in _PDD_WARM:
        return
    from data_pipeline.collate import pdd_features
    from data_pipeline.record import CrystalRecord

    pdd_features(CrystalRecord(key="warm", source="warm", atomic_numbers=[1], frac_coords=[[0, 0, 0]],
                               lattice=np.eye(3) * 3.0), k)
    _PDD_WARM.add(k)


# ----------------------------------------------------------------------------- public loader
class ShardLoader:
    """Batches of crystals from webdataset shards, split over ranks and DataLoader workers.

    Every rank must be built with the same shards, views, budget, seed and mode. In "epoch"
    mode each sample is in exactly one real batch per epoch across all ranks, and every rank
    yields `batches_per_epoch()` batches; batches with `batch.padding` True are duplicates that
    fill the last round (weight them 0). In "resampled" mode iteration never ends.
    """

    def __init__(self, shards: list[str] | str, *, views: BatchViews, atom_budget: int = 4096,
                 max_crystals: int | None = None, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 mode: str = "epoch", shuffle_buffer: int = 1000, seed: int = 0, skip_corrupt: bool = False,
                 dtype=torch.float32, remainder: str = "pad", prefetch_factor: int = 2,
                 index_cache: str | None = None, fast_decode: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if atom_budget < 1 or (max_crystals is not None and max_crystals < 1):
            raise ValueError("atom_budget and max_crystals must be positive")
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError("no shards given")
        self.views, self.rank, self.world_size = views, rank, world_size
        self.num_workers, self.prefetch_factor, self.mode = num_workers, prefetch_factor, mode
        index_cache = index_cache or os.environ.get("CRYSTALFM_INDEX_CACHE") or None
        self.index = _GlobalIndex.build(self.shards, skip_corrupt, index_cache)
        if len(self.index) == 0:
            raise ValueError(f"no readable samples in {len(self.shards)} shard(s) (first: {self.shards[0]})")
        cfg = _PlanConfig(atom_budget, max_crystals, shuffle_buffer, seed, mode)
        self.dataset = ShardDataset(self.index, cfg, views, rank, world_size, remainder, skip_corrupt, dtype)
        self.dataset.fast_decode = fast_decode
        self.stats: dict = {
            "samples": 0, "batches": 0, "padding_batches": 0, "atoms": 0,
            "corrupt_skipped": len(self.index.corrupt),
            "corrupt": [f"{s}: member {m!r}: {r}" for s, m, r in self.index.corrupt][:_MAX_CORRUPT_DETAILS],
            "oversize_crystals": int((self.index.num_atoms > atom_budget).sum()),
            "atom_budget_fill": 0.0, "token_padding_fraction": 0.0,
        }
        self._padded_tokens = 0
        self._token_slots = 0
        self._num_batches_cache: dict[int, int] = {}

    # -------------------------------------------------------------- epoch / state
    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def num_samples(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch`; calling it with the current epoch (e.g. after a resume) keeps the position."""
        if epoch != self.dataset.epoch:
            self.dataset.epoch, self.dataset.start = int(epoch), 0

    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch (the same on every rank). In resampled mode: the
        number in one resampling round of `num_shards` draws, a nominal epoch for schedules."""
        epoch = self.dataset.epoch
        if epoch not in self._num_batches_cache:
            self._num_batches_cache[epoch] = self.dataset.num_batches(epoch)
        return self._num_batches_cache[epoch]

    def __len__(self) -> int:
        if self.mode == "resampled":
            raise TypeError("a resampled ShardLoader is infinite; use batches_per_epoch() for a nominal epoch")
        return self.batches_per_epoch()

    def state_dict(self) -> dict:
        return {"epoch": self.dataset.epoch, "batches_consumed": self.dataset.start, "seed": self.dataset.cfg.seed,
                "mode": self.mode, "world_size": self.world_size, "num_samples": len(self.index)}

    def load_state_dict(self, state: dict) -> None:
        for name, mine in (("mode", self.mode), ("world_size", self.world_size), ("seed", self.dataset.cfg.seed),
                           ("num_samples", len(self.index))):
            if name in state and state[name] != mine:
                raise ValueError(
                    f"loader state was saved with {name}={state[name]!r} but this loader has {mine!r}: "
                    "an exact resume needs the same shards, seed, mode and world size"
                )
        self.dataset.epoch = int(state["epoch"])
        self.dataset.start = int(state["batches_consumed"])

    # -------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[CrystalBatch]:
        if self.num_workers > 0:
            source = torch.utils.data.DataLoader(
                self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                worker_init_fn=_worker_init, prefetch_factor=self.prefetch_factor,
            )
        else:
            if self.views.pdd_k is not None:
                warm_pdd(self.views.pdd_k)
            source = self.dataset
        for batch, delta in source:
            self._count(batch, delta)
            self.dataset.start += 1
            yield batch
        if self.mode == "epoch":  # finished: the next iteration is the next epoch
            self.dataset.epoch += 1
            self.dataset.start = 0

    def _count(self, batch: CrystalBatch, delta: dict) -> None:
        stats = self.stats
        stats["batches"] += 1
        stats["corrupt_skipped"] += delta["corrupt_skipped"]
        stats["corrupt"] = (stats["corrupt"] + delta["corrupt"])[:_MAX_CORRUPT_DETAILS]
        if batch.padding:
            stats["padding_batches"] += 1
            return
        atoms = int(batch.num_atoms.sum())
        stats["samples"] += batch.num_crystals
        stats["atoms"] += atoms
        real = stats["batches"] - stats["padding_batches"]
        budget = self.dataset.cfg.atom_budget
        stats["atom_budget_fill"] += (min(atoms / budget, 1.0) - stats["atom_budget_fill"]) / real
        if batch.token_mask is not None:
            self._token_slots += batch.token_mask.numel()
            self._padded_tokens += int((~batch.token_mask).sum())
            stats["token_padding_fraction"] = self._padded_tokens / max(self._token_slots, 1)
