"""Plain sequential reading of records from a shard set, for tools that want every crystal once
(reference sets, evaluation) rather than training batches (that is `loader.ShardLoader`)."""
from __future__ import annotations

import itertools
import os
import tarfile
from typing import Iterable, Iterator

from data_pipeline.load.shard_list import split_shards
from data_pipeline.record import CrystalRecord
from data_pipeline.shard_format import decode_sample


def iter_records(shard_dir: str | os.PathLike, splits: Iterable[str] = ("train",),
                 limit: int | None = None) -> Iterator[CrystalRecord]:
    """Every record of the given splits (the first `limit` when given), in shard order."""
    records = _iter_all(shard_dir, splits)
    return records if limit is None else itertools.islice(records, limit)


def _iter_all(shard_dir: str | os.PathLike, splits: Iterable[str]) -> Iterator[CrystalRecord]:
    # Members of a sample are adjacent in a shard: a new key closes the previous sample.
    for split in splits:
        for path in split_shards(shard_dir, split):
            sample: dict = {}
            with tarfile.open(path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name, _, ext = member.name.partition(".")
                    if sample and sample["__key__"] != name:
                        yield decode_sample(sample)
                        sample = {}
                    sample["__key__"] = name
                    sample[ext] = tar.extractfile(member).read()
            if sample:
                yield decode_sample(sample)
