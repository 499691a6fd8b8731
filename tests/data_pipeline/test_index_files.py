"""Index files (`<shard>.idx.npy`) written by the build and read by the loader: they equal a scan
of the tar headers on real shards, give the same batches as the scan, and shard sets without them
(built before they existed) still load, with a one-line notice. Real inline builds of shared data."""
from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.build.config import BuildConfig
from data_pipeline.build.stages import build
from data_pipeline.load.collate import BatchViews
from data_pipeline.load.loader import ShardLoader
from data_pipeline.load.shard_list import split_shards
from data_pipeline.load.tar_index import ShardCorruptError, _GlobalIndex, index_shard, read_index_file
from data_pipeline.manifest import load_manifest
from data_pipeline.shard_format import INDEX_COLUMNS, index_path


@pytest.fixture(scope="module")
def built(shared_data, tmp_path_factory):
    """300 real MP-20 rows + the MPtrj sample (749 frames), 64 KiB shards: many small shards."""
    tmp = tmp_path_factory.mktemp("index_files")
    mp20 = tmp / "mp20_head.csv.gz"
    with gzip.open(shared_data / "mp_20" / "val.csv.gz", "rt", newline="") as src, gzip.open(mp20, "wt", newline="") as dst:
        csv.writer(dst).writerows(row for _, row in zip(range(301), csv.reader(src)))
    config = BuildConfig.from_dict({
        "sources": [
            {"kind": "cdvae_csv", "path": str(mp20), "name": "mp20", "options": {"source": "mp20"}},
            {"kind": "mptrj", "path": str(shared_data / "derived_layouts" / "mptrj" / "MPtrj_sample.json.gz"),
             "name": "mptrj", "dedup": "none"},
        ],
        "out": str(tmp / "shards"), "executor": "inline", "chunk_size": 128, "shard_bytes": 64 * 1024,
    })
    result = build(config, progress=False, log=lambda _: None)
    return tmp / "shards", result.manifest


def all_shards(out: Path) -> list[str]:
    return [path for split in ("train", "val", "test") for path in split_shards(out, split)]


def test_index_files_equal_a_header_scan(built):
    out, manifest = built
    shards = all_shards(out)
    assert len(shards) > 5
    for path in shards:
        table = np.load(index_path(path), allow_pickle=False)
        scan = index_shard(path)
        assert table.dtype == np.int64 and table.shape == (len(scan), len(INDEX_COLUMNS))
        assert np.array_equal(table[:, 0:2], scan.json_span) and np.array_equal(table[:, 2:4], scan.arrays_span)
        assert np.array_equal(table[:, 4], scan.num_atoms)
        loaded = read_index_file(path)
        assert not isinstance(loaded, str), loaded
    # The manifest names each shard's index file and its sha256.
    import hashlib

    for split in manifest["splits"].values():
        for shard in split["shards"]:
            index_bytes = (out / shard["index"]["file"]).read_bytes()
            assert shard["index"]["file"] == shard["file"] + ".idx.npy"
            assert shard["index"]["sha256"] == hashlib.sha256(index_bytes).hexdigest()
    assert load_manifest(out) == manifest


def batches(loader):
    """Every batch as comparable bytes: keys, padding flag, coordinates, lattices, tokens, labels."""
    return [(tuple(b.keys), b.padding, b.frac_coords.numpy().tobytes(), b.lattice.numpy().tobytes(),
             b.atomic_numbers.numpy().tobytes(), b.tokens.numpy().tobytes(),
             sorted((k, v.numpy().tobytes()) for k, v in b.labels.items())) for b in loader]


def test_loader_batches_identical_with_and_without_index_files(built, tmp_path, capsys):
    out, _ = built
    shards = split_shards(out, "train")
    kwargs = dict(views=BatchViews(tokens=True), atom_budget=200, world_size=2, rank=1, seed=4, shuffle_buffer=64)
    with_index = ShardLoader(shards, **kwargs)
    assert capsys.readouterr().err == ""  # every shard had its index file: no notice
    assert with_index.index.names == [None] * len(shards)  # names are not loaded
    scanned = ShardLoader(shards, index_files=False, **kwargs)
    for name in ("json_span", "arrays_span", "num_atoms", "shard_start"):
        assert np.array_equal(getattr(with_index.index, name), getattr(scanned.index, name)), name
    reference = batches(scanned)
    assert len(reference) > 3 and batches(with_index) == reference

    # An old shard set: the same tars without index files.
    old = tmp_path / "old"
    old.mkdir()
    for path in out.iterdir():
        if path.is_file() and not path.name.endswith(".idx.npy"):
            shutil.copy(path, old / path.name)
    old_loader = ShardLoader(split_shards(old, "train"), **kwargs)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and notice[0].startswith(f"notice: scanning the tar headers of {len(shards)} of {len(shards)}")
    assert batches(old_loader) == reference


def test_a_stale_or_damaged_index_file_is_not_used(built, tmp_path, capsys):
    out, _ = built
    path = Path(split_shards(out, "train")[0])
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    shutil.copy(index_path(str(path)), index_path(str(copy)))
    assert not isinstance(read_index_file(str(copy)), str)

    table = np.load(index_path(str(copy)))
    np.save(index_path(str(copy)), table[:-1])  # one sample short
    assert "not the shard's last" in read_index_file(str(copy))
    np.save(index_path(str(copy)), table[1:])  # the first sample missing
    assert "first member" in read_index_file(str(copy))
    copy.write_bytes(path.read_bytes()[:-10240])  # a truncated shard
    shutil.copy(index_path(str(path)), index_path(str(copy)))
    assert "bytes" in read_index_file(str(copy))
    shutil.copy(path, copy)
    other = Path(split_shards(out, "val")[0])
    np.save(index_path(str(copy)), np.load(index_path(str(other))))  # another shard's index
    assert isinstance(read_index_file(str(copy)), str)
    index = _GlobalIndex.build([str(copy)], skip_corrupt=False)
    assert index.names[0] is not None and len(index) == len(table)  # scanned instead
    assert "notice: scanning" in capsys.readouterr().err


def test_error_message_names_the_sample_of_an_indexed_shard(built, tmp_path):
    out, _ = built
    path = Path(split_shards(out, "train")[0])
    copy = tmp_path / path.name
    shutil.copy(index_path(str(path)), index_path(str(copy)))
    data = bytearray(path.read_bytes())
    table = np.load(index_path(str(path)))
    json_offset, json_size = int(table[0, 0]), int(table[0, 1])
    data[json_offset : json_offset + json_size] = b"{" * json_size  # undecodable JSON, same size
    copy.write_bytes(bytes(data))
    scan = index_shard(str(path))
    loader = ShardLoader([str(copy)], views=BatchViews(), atom_budget=10_000, shuffle_buffer=0)
    assert loader.index.names == [None]
    with pytest.raises(ShardCorruptError, match=f"member '{scan.names[0]}'"):
        list(loader)
