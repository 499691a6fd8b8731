"""Shard loader: webdataset tar shards → CrystalBatch, for many nodes × DataLoader workers.

How it works (see LOADER.md for the reasoning and the trainer-facing rules):

1. index    for each sample the byte ranges of its `.json` and `.safetensors` members and its
            atom count, read from the shard's index file (`<shard>.idx.npy`, mmapped) when the
            build wrote one, else from a scan of the tar headers (mmap, no data decoded; atom
            counts from the safetensors headers; broken tars are found here).
            `index_files=False` always scans.
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

Where each step lives: shard_list.py (which files), tar_index.py (1), epoch_plan.py (2, 3), this
file (4: the dataset and `ShardLoader`), `shard_format.decode_fast` (the fast decoder).

"resampled" mode is infinite: round c of epoch e draws `num_shards` shards with replacement
(seed, e, c), shuffles and packs them the same way, and deals floor(B_c / W) batches to every
rank. Resume is exact in both modes: the state is (epoch, batches consumed), and the plan is a
pure function of it.
"""
from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from typing import Iterator

import numpy as np
import torch

from data_pipeline.load.batch import CrystalBatch
from data_pipeline.load.collate import BatchViews, collate
from data_pipeline.load.epoch_plan import _PlanConfig, _rank_batches, _round_plan
from data_pipeline.load.shard_list import expand_shards
from data_pipeline.load.tar_index import _MAX_CORRUPT_DETAILS, ShardCorruptError, _GlobalIndex
from data_pipeline.shard_format import ARRAYS_EXT, JSON_EXT, ShardFormatError, decode_fast, decode_sample


MODES = ("epoch", "resampled")
REMAINDERS = ("pad", "drop")


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
    from data_pipeline.record import pdd_features
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
                 index_cache: str | None = None, fast_decode: bool = True, index_files: bool = True):
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
        self.index = _GlobalIndex.build(self.shards, skip_corrupt, index_cache, use_index_files=index_files)
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
