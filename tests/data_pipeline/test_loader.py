"""ShardLoader: epoch-exact sharding over ranks × real DataLoader workers, atom budgets,
resampling, exact resume, corrupt shards. Shards are written here with encode_record + tarfile."""
from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.load.collate import BatchViews
from data_pipeline.load.epoch_plan import pack_by_atoms
from data_pipeline.load.loader import ShardLoader
from data_pipeline.load.shard_list import split_shards
from data_pipeline.load.tar_index import ShardCorruptError
from data_pipeline.load.neighbors import NeighborRule
from data_pipeline.record import CrystalRecord
from data_pipeline.shard_format import encode_record


def make_records(n: int, seed: int = 0, prefix: str = "syn") -> list[CrystalRecord]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        atoms = int(rng.integers(1, 21))
        records.append(
            CrystalRecord(
                key=f"{prefix}:c{i:04d}",
                source=prefix,
                atomic_numbers=rng.integers(1, 84, atoms),
                frac_coords=rng.random((atoms, 3)),
                lattice=np.diag(rng.uniform(3.0, 7.0, 3)) + rng.normal(0, 0.2, (3, 3)),
                energy_per_atom=float(rng.normal(-5, 1)),
                forces=rng.normal(0, 0.1, (atoms, 3)),
            )
        )
    return records


def write_shard(path: Path, records: list[CrystalRecord]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for record in records:
            sample = encode_record(record)
            for ext in ("json", "safetensors"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(sample[ext])
                tar.addfile(info, io.BytesIO(sample[ext]))
    return path


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """6 shards of uneven sizes (203 crystals, 1–20 atoms each) and a manifest."""
    root = tmp_path_factory.mktemp("shards")
    records = make_records(203)
    sizes = [40, 40, 40, 40, 30, 13]
    paths, start = [], 0
    for s, size in enumerate(sizes):
        paths.append(str(write_shard(root / f"train-{s:05d}.tar", records[start : start + size])))
        start += size
    manifest = {"schema_version": 1, "splits": {"train": {"shards": [
        {"path": Path(p).name, "num_samples": n} for p, n in zip(paths, sizes)]}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, paths, records


def collect(loader, limit=None):
    """Batches of one pass, or exactly the first `limit` (a trainer stopping after `limit` steps)."""
    return list(itertools.islice(iter(loader), limit))


def keys_of(batches, padding=False):
    return [tuple(b.keys) for b in batches if b.padding == padding]


VIEWS = BatchViews()


def test_split_shards_reads_manifest_shapes(shard_set, tmp_path):
    root, paths, _ = shard_set
    assert split_shards(root, "train") == paths
    with pytest.raises(KeyError, match="no split 'val'"):
        split_shards(root, "val")
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"val": ["a.tar", "/abs/b.tar"]}}))
    assert split_shards(tmp_path, "val") == [str(tmp_path / "a.tar"), "/abs/b.tar"]
    (tmp_path / "manifest.json").write_text(json.dumps(["x.tar"]))
    assert split_shards(tmp_path, "anything") == [str(tmp_path / "x.tar")]


@pytest.mark.slow
def test_two_nodes_two_workers_see_every_sample_once(shard_set):
    root, paths, records = shard_set
    per_rank, seen = [], Counter()
    for rank in range(2):
        loader = ShardLoader(split_shards(root, "train"), views=VIEWS, atom_budget=64, rank=rank, world_size=2,
                             num_workers=2, shuffle_buffer=50, seed=3)
        expected = loader.batches_per_epoch()  # of the current epoch: packing depends on the order
        batches = collect(loader)
        assert len(batches) == expected
        per_rank.append(len(batches))
        for b in batches:
            if not b.padding:
                seen.update(b.keys)
            assert int(b.num_atoms.sum()) <= 64 or b.num_crystals == 1
    assert per_rank[0] == per_rank[1]
    assert seen == Counter(r.key for r in records)  # every sample exactly once across ranks


def test_epoch_mode_single_process_ranks_partition_the_plan(shard_set):
    _, paths, records = shard_set
    world = 3
    loaders = [ShardLoader(paths, views=VIEWS, atom_budget=50, rank=r, world_size=world, seed=1) for r in range(world)]
    runs = [collect(l) for l in loaders]
    counts = {len(r) for r in runs}
    loaders[0].set_epoch(0)
    assert counts == {loaders[0].batches_per_epoch()}
    real = [k for run in runs for batch in keys_of(run) for k in batch]
    assert sorted(real) == sorted(r.key for r in records)
    padding = [b for run in runs for b in run if b.padding]
    total_global = sum(len(keys_of(run)) for run in runs)
    assert len(padding) == (-total_global) % world
    assert all(b.weight == 0.0 for b in padding)


def test_drop_remainder_gives_floor(shard_set):
    _, paths, _ = shard_set
    loaders = [ShardLoader(paths, views=VIEWS, atom_budget=50, rank=r, world_size=4, seed=1, remainder="drop")
               for r in range(4)]
    runs = [collect(l) for l in loaders]
    assert len({len(r) for r in runs}) == 1
    assert not any(b.padding for run in runs for b in run)


def test_atom_budget_and_max_crystals(shard_set):
    _, paths, records = shard_set
    loader = ShardLoader(paths, views=VIEWS, atom_budget=30, max_crystals=3, seed=0)
    batches = collect(loader)
    for b in batches:
        assert b.num_crystals <= 3
        assert int(b.num_atoms.sum()) <= 30
    assert sum(b.num_crystals for b in batches) == len(records)
    # greedy packing is tight: a batch only closes when the next crystal would not fit
    bounds = pack_by_atoms(np.array([5, 5, 25, 40, 1, 1]), 30)
    assert bounds.tolist() == [0, 2, 3, 4, 6]  # the 40-atom crystal is alone, over budget


def test_same_seed_same_batches_and_epochs_differ(shard_set):
    _, paths, _ = shard_set
    a = ShardLoader(paths, views=VIEWS, atom_budget=64, seed=7)
    b = ShardLoader(paths, views=VIEWS, atom_budget=64, seed=7)
    first_a, first_b = keys_of(collect(a)), keys_of(collect(b))
    assert first_a == first_b
    second_a = keys_of(collect(a))  # epoch advanced automatically after a full pass
    assert second_a != first_a and sorted(sum(second_a, ())) == sorted(sum(first_a, ()))
    c = ShardLoader(paths, views=VIEWS, atom_budget=64, seed=8)
    assert keys_of(collect(c)) != first_a


@pytest.mark.slow
def test_workers_preserve_plan_order_and_views(shard_set):
    _, paths, _ = shard_set
    views = BatchViews(graph=NeighborRule(kind="radius", cutoff=3.0), tokens=True)
    serial = collect(ShardLoader(paths, views=views, atom_budget=80, seed=2, rank=1, world_size=2))
    parallel = collect(ShardLoader(paths, views=views, atom_budget=80, seed=2, rank=1, world_size=2, num_workers=2))
    assert [b.keys for b in serial] == [b.keys for b in parallel]
    for s, p in zip(serial, parallel):
        assert torch.equal(s.edge_src, p.edge_src) and torch.equal(s.tokens, p.tokens)
        assert torch.equal(s.labels["forces"], p.labels["forces"])


def test_resume_equals_uninterrupted(shard_set):
    _, paths, _ = shard_set
    make = lambda: ShardLoader(paths, views=VIEWS, atom_budget=40, seed=5, rank=0, world_size=2)  # noqa: E731
    ref = make()
    epoch0 = [tuple(b.keys) for b in collect(ref)]
    epoch1 = [tuple(b.keys) for b in collect(ref)]

    interrupted = make()
    part = [tuple(b.keys) for b in collect(interrupted, limit=5)]
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["batches_consumed"] == 5
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON
    resumed.set_epoch(0)  # a trainer re-announcing the current epoch keeps the position
    rest = [tuple(b.keys) for b in collect(resumed)]
    assert part + rest == epoch0
    assert [tuple(b.keys) for b in collect(resumed)] == epoch1
    with pytest.raises(ValueError, match="world_size"):
        ShardLoader(paths, views=VIEWS, rank=0, world_size=3).load_state_dict(state)


@pytest.mark.slow
def test_resume_with_workers_and_resampled(shard_set):
    _, paths, records = shard_set
    make = lambda w: ShardLoader(paths, views=VIEWS, atom_budget=40, seed=9, mode="resampled",  # noqa: E731
                                 rank=1, world_size=2, num_workers=w)
    reference = [tuple(b.keys) for b in collect(make(0), limit=45)]
    nominal = make(0).batches_per_epoch()
    assert len(reference) == 45 > nominal  # infinite: runs past one nominal epoch
    keys = {r.key for r in records}
    assert all(k in keys for batch in reference for k in batch)
    assert len({k for batch in reference for k in batch}) < sum(len(b) for b in reference)  # with replacement
    first = make(2)
    head = [tuple(b.keys) for b in collect(first, limit=12)]
    resumed = make(2)
    resumed.load_state_dict(first.state_dict())
    tail = [tuple(b.keys) for b in collect(resumed, limit=33)]
    assert head + tail == reference


def test_truncated_tar_names_shard_and_member(shard_set, tmp_path):
    _, _, records = shard_set
    good = write_shard(tmp_path / "good.tar", records[:10])
    broken = write_shard(tmp_path / "broken.tar", records[10:20])
    data = broken.read_bytes()
    # cut inside the safetensors member of the 8th sample
    cut = data.find(b"syn_c0017") if b"syn_c0017" in data else data.find(b"syn:c0017")
    cut = data.find(b"safetensors", cut) + 700
    broken.write_bytes(data[:cut])
    with pytest.raises(ShardCorruptError) as err:
        ShardLoader([str(good), str(broken)], views=VIEWS)
    assert "broken.tar" in str(err.value) and "c0017.safetensors" in str(err.value)

    loader = ShardLoader([str(good), str(broken)], views=VIEWS, skip_corrupt=True, atom_budget=1000)
    got = [k for b in collect(loader) for k in b.keys]
    assert loader.stats["corrupt_skipped"] == 1
    assert "c0017.safetensors" in loader.stats["corrupt"][0]
    assert sorted(got) == sorted(r.key for r in records[:17])  # complete samples before the cut are kept


def test_corrupt_member_content_is_reported_at_load(shard_set, tmp_path):
    _, _, records = shard_set
    shard = write_shard(tmp_path / "bad.tar", records[:6])
    data = bytearray(shard.read_bytes())
    at = data.find(b'"source":"syn"', data.find(b"c0003.json"))
    data[at : at + 3] = b"@@@"  # invalid JSON in sample c0003 only
    shard.write_bytes(bytes(data))
    loader = ShardLoader([str(shard)], views=VIEWS, atom_budget=1000)
    with pytest.raises(ShardCorruptError, match=r"bad\.tar: member 'syn:c0003'"):
        collect(loader)
    skipping = ShardLoader([str(shard)], views=VIEWS, atom_budget=1000, skip_corrupt=True)
    got = [k for b in collect(skipping) for k in b.keys]
    assert len(got) == 5 and "syn:c0003" not in got
    assert skipping.stats["corrupt_skipped"] == 1


def test_fewer_batches_than_ranks_still_even(shard_set):
    _, paths, _ = shard_set
    tiny = paths[-1:]  # 13 crystals
    runs = [collect(ShardLoader(tiny, views=VIEWS, atom_budget=10_000, rank=r, world_size=4)) for r in range(4)]
    assert [len(r) for r in runs] == [1, 1, 1, 1]
    assert [b.padding for r in runs for b in r] == [False, True, True, True]


def test_stats_and_dtype(shard_set):
    _, paths, records = shard_set
    loader = ShardLoader(paths, views=BatchViews(tokens=True), atom_budget=100, dtype=torch.float64)
    batches = collect(loader)
    assert batches[0].frac_coords.dtype == torch.float64
    assert loader.stats["samples"] == len(records)
    assert loader.stats["atoms"] == sum(r.num_atoms for r in records)
    assert 0 < loader.stats["atom_budget_fill"] <= 1 and 0 <= loader.stats["token_padding_fraction"] < 1


def test_fast_decode_equals_decode_sample(shard_set, tmp_path):
    from data_pipeline.shard_format import decode_fast
    from data_pipeline.shard_format import decode_sample

    _, _, records = shard_set
    extra = records[0].replace(key="syn:labelled", stress=np.arange(9.0).reshape(3, 3), magmoms=np.ones(records[0].num_atoms),
                               properties={"bulk_modulus": 101.5}, band_gap=0.0, group="")
    with_rows = records[2].replace(key="syn:pdd", pdd=np.random.default_rng(0).random((records[2].num_atoms, 5)))
    for record in records + [extra, with_rows]:
        sample = encode_record(record)
        ref, fast = decode_sample(sample), decode_fast(sample["json"], sample["safetensors"])
        assert fast is not None
        for name, value in vars(ref).items():
            other = getattr(fast, name)
            if isinstance(value, np.ndarray):
                assert other.dtype == value.dtype and np.array_equal(other, value) and other.flags.writeable, name
            else:
                assert other == value, name
    assert np.array_equal(decode_sample(encode_record(with_rows)).pdd, with_rows.pdd)
    # anything unexpected goes to the reference decoder
    odd = encode_record(records[1])
    odd["json"] = odd["json"].replace(b'"source"', b'"new_field":1,"source"')
    assert decode_fast(odd["json"], odd["safetensors"]) is None


def test_index_cache_and_reference_decoder_give_same_batches(shard_set, tmp_path):
    _, paths, _ = shard_set
    views = BatchViews(tokens=True)
    ref = collect(ShardLoader(paths, views=views, atom_budget=60, seed=4, fast_decode=False))
    cold = collect(ShardLoader(paths, views=views, atom_budget=60, seed=4, index_cache=str(tmp_path / "idx")))
    assert len(list((tmp_path / "idx").glob("*.npz"))) == len(paths)
    warm = collect(ShardLoader(paths, views=views, atom_budget=60, seed=4, index_cache=str(tmp_path / "idx")))
    for a, b, c in zip(ref, cold, warm):
        assert a.keys == b.keys == c.keys
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
        assert torch.equal(a.labels["energy_per_atom"], c.labels["energy_per_atom"])
