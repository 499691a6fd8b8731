"""Build options without Ray (the inline executor runs the same stage functions in-process; the Ray
tests show both give identical bytes): benchmark exclusion, split grouping, config checking and
what happens to an existing output directory."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

from data_pipeline.build.stages import BuildError, build
from data_pipeline.build.config import BuildConfig, ConfigError, SourceSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_fixture_readers import KIND, crafted_rows, structure_row, write_jsonl  # noqa: E402


def quiet(config: BuildConfig):
    return build(config, progress=False, log=lambda _: None)


def rows_by_id() -> dict[str, dict]:
    return {row["id"]: row for row in crafted_rows()}


def exclusion_inputs(tmp_path: Path) -> tuple[Path, Path]:
    rows = rows_by_id()
    silicon = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.43), ["Si"], [[0, 0, 0]])
    cscl = Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    lif = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.03), ["Li", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    main = [rows["rocksalt"], rows["zincblende"],
            structure_row("mx:0", silicon, group="mx"), structure_row("mx:1", cscl, group="mx"),  # one material
            structure_row("lif", lif)]
    # The benchmark's test set: a supercell of rock salt (a structural match) and an exact copy of
    # the silicon frame (under another id).
    test_set = [{**rows["rocksalt-supercell"], "id": "bench-1"}, structure_row("bench-2", silicon)]
    return write_jsonl(tmp_path / "main.jsonl", main), write_jsonl(tmp_path / "bench_test.jsonl", test_set)


def test_benchmark_test_set_structures_are_excluded(tmp_path):
    main, bench = exclusion_inputs(tmp_path)
    config = BuildConfig.from_dict({
        "sources": [{"kind": KIND, "path": str(main), "name": "main", "dedup": "none"}],
        "exclude": [{"kind": KIND, "path": str(bench), "name": "bench_test", "options": {"source": "bench"}}],
        "out": str(tmp_path / "out"), "executor": "inline",
    })
    m = quiet(config).manifest
    assert m["counts"]["excluded"] == 3 and m["counts"]["written"] == 2 and m["counts"]["balanced"]
    assert m["counts"]["dropped_by_how"] == {"excluded": 1, "excluded_exact": 1, "excluded_group": 1}
    assert m["sources"]["main"]["excluded"] == 3
    assert m["exclude"]["sources"]["bench_test"]["records_in"] == 2 and m["exclude"]["reference_structures"] == 2
    dropped = {d["key"]: (d["how"], d["matched"]) for d in map(json.loads, (tmp_path / "out" / "duplicates.jsonl").open())}
    assert dropped == {
        "jsonl:rocksalt": ("excluded", "bench:bench-1"),
        "jsonl:mx:0": ("excluded_exact", "bench:bench-2"),
        "jsonl:mx:1": ("excluded_group", "bench:bench-2"),  # another frame of the matched material
    }
    assert m["statistics"]["all"]["elements"].keys() == {"Na", "Cl", "Li", "F"}  # zinc blende and LiF remain


def test_exact_exclusion_without_group_expansion(tmp_path):
    main, bench = exclusion_inputs(tmp_path)
    config = BuildConfig.from_dict({
        "sources": [{"kind": KIND, "path": str(main), "name": "main", "dedup": "none"}],
        "exclude": [{"kind": KIND, "path": str(bench), "name": "bench_test", "options": {"source": "bench"}}],
        "exclude_match": "exact", "exclude_whole_group": False,
        "out": str(tmp_path / "out"), "executor": "inline",
    })
    m = quiet(config).manifest
    assert m["counts"]["dropped_by_how"] == {"excluded_exact": 1}
    assert m["counts"]["written"] == 4


def test_split_by_reduced_formula_keeps_a_composition_together(tmp_path):
    rows = [structure_row(f"nacl-{i}", Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.0 + 0.05 * i), ["Na", "Cl"],
                                                                [[0, 0, 0], [0.5, 0.5, 0.5]]))
            for i in range(24)]
    path = write_jsonl(tmp_path / "nacl.jsonl", rows)
    common = {"sources": [{"kind": KIND, "path": str(path), "name": "nacl", "dedup": "none"}],
              "splits": {"train": 0.5, "val": 0.5}, "executor": "inline"}
    by_group = quiet(BuildConfig.from_dict({**common, "out": str(tmp_path / "g")})).manifest
    by_formula = quiet(BuildConfig.from_dict({**common, "out": str(tmp_path / "f"), "split_by": "reduced_formula"})).manifest
    assert by_group["splits"]["train"]["num_samples"] > 0 and by_group["splits"]["val"]["num_samples"] > 0
    assert sorted(s["num_samples"] for s in by_formula["splits"].values()) == [0, 24]


def test_shards_respect_the_target_size(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", crafted_rows())
    m = quiet(BuildConfig.from_dict({
        "sources": [{"kind": KIND, "path": str(path), "name": "c", "dedup": "none"}],
        "splits": {"train": 1.0}, "shard_bytes": 8192, "out": str(tmp_path / "out"), "executor": "inline",
    })).manifest
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 1
    assert all(s["bytes"] <= 8192 + 10240 for s in shards)  # tar pads its end to a 10 KiB record
    assert [s["file"] for s in shards] == [f"train-{i:06d}.tar" for i in range(len(shards))]


def test_existing_outputs_are_guarded(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", crafted_rows()[:2])
    config = BuildConfig.from_dict({"sources": [{"kind": KIND, "path": str(path), "name": "c"}],
                                    "out": str(tmp_path / "out"), "executor": "inline"})
    quiet(config)
    with pytest.raises(BuildError, match="different config"):
        quiet(config.replace(seed=3))
    replaced = quiet(config.replace(seed=3, force=True))
    assert replaced.manifest["build_config"]["seed"] == 3
    # An unfinished build of another config in the same place is not mixed in.
    (tmp_path / "out2" / "_work").mkdir(parents=True)
    (tmp_path / "out2" / "_work" / "config.json").write_text(json.dumps({"fingerprint": "other"}))
    with pytest.raises(BuildError, match="unfinished build of a different config"):
        quiet(config.replace(out=str(tmp_path / "out2")))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="not a shard set"):
        quiet(config.replace(out=str(tmp_path / "foreign")))
    with pytest.raises(BuildError, match="cannot be opened"):
        quiet(BuildConfig.from_dict({"sources": [{"kind": "mptrj", "path": str(tmp_path / "missing.json")}],
                                     "out": str(tmp_path / "out3"), "executor": "inline"}))


def test_config_is_typed_and_strict(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'shard_size'; did you mean 'shard_bytes'\?"):
        BuildConfig.from_dict({"shard_size": 10})
    with pytest.raises(ConfigError, match=r"unknown config key 'sources\[0\].dedupe'; did you mean 'sources\[0\].dedup'\?"):
        BuildConfig.from_dict({"sources": [{"kind": "mptrj", "path": "x", "dedupe": "exact"}]})
    with pytest.raises(ConfigError, match="dedup must be one of"):
        BuildConfig.from_dict({"sources": [{"kind": "mptrj", "path": "x", "dedup": "fuzzy"}]})
    with pytest.raises(ConfigError, match="sum to 1"):
        BuildConfig.from_dict({"splits": {"train": 0.9, "val": 0.2}})
    with pytest.raises(ConfigError, match="unique"):
        BuildConfig.from_dict({"sources": ["mptrj:a.json:x", "cdvae_csv:b.csv:x"]})
    with pytest.raises(ConfigError, match="unknown config key 'matcher.ltoll'; did you mean 'matcher.ltol'"):
        BuildConfig.from_dict({"matcher": {"ltoll": 0.1}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [mptrj:a.json]\nsplit_by: material\n")
    with pytest.raises(ConfigError, match="bad.yaml: split_by must be one of"):
        BuildConfig.from_yaml(bad)

    spec = SourceSpec.parse("cdvae_csv:../data/mp_20/train.csv.gz:mp20")
    assert (spec.kind, spec.path, spec.name) == ("cdvae_csv", "../data/mp_20/train.csv.gz", "mp20")
    spec = SourceSpec.parse("mptrj:/data/MPtrj_2022.9_full.json")
    assert (spec.path, spec.name) == ("/data/MPtrj_2022.9_full.json", "mptrj:MPtrj_2022.9_full")
    # Runtime fields do not change the fingerprint; data fields do.
    base = BuildConfig.from_dict({"sources": ["mptrj:a.json"]})
    assert base.replace(out="elsewhere", num_workers=7, executor="inline").fingerprint() == base.fingerprint()
    assert base.replace(seed=1).fingerprint() != base.fingerprint()
    # The YAML view round-trips.
    again = tmp_path / "again.yaml"
    again.write_text(base.to_yaml())
    assert BuildConfig.from_yaml(again) == base


def test_tar_writer_is_deterministic_and_matches_tarfile(tmp_path):
    import io
    import tarfile

    from data_pipeline.build.shard_writer import DeterministicTarWriter, _tarinfo, ustar_header

    for name, size in [("a.json", 0), ("mp20:mp-1234.safetensors", 12345), ("x" * 100, 8**11 - 1)]:
        assert ustar_header(name.encode(), size) == _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    samples = [{"__key__": "k" * 120, "json": b'{"a":1}', "safetensors": b"x" * 700},
               {"__key__": "mp20:mp-1", "json": b'{"b":2}', "safetensors": b"y" * 3}]
    # The same samples written by the standard library's tarfile with the same metadata.
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            for ext in ("json", "safetensors"):
                tar.addfile(_tarinfo(f"{sample['__key__']}.{ext}", len(sample[ext])), io.BytesIO(sample[ext]))
    writer = DeterministicTarWriter(tmp_path / "s.tar")
    for sample in samples:
        writer.write(sample)
    sha, size = writer.close()
    assert (tmp_path / "s.tar").read_bytes() == reference.getvalue() and size == len(reference.getvalue())
    with tarfile.open(tmp_path / "s.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members][1] == "k" * 120 + ".safetensors"
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.mode == 0o644 for m in members)
        for m in members:
            offset, length = writer.offsets[m.name]
            assert (m.offset_data, m.size) == (offset, length)
    assert not list(tmp_path.glob("*.tmp*"))


def test_crash_in_write_stage_resumes_without_redoing_work(tmp_path, monkeypatch):
    """A build that dies inside the write stage resumes: parsed chunks, structural-match results and finished
    shards are reused (not rewritten), and the result equals an uninterrupted build."""
    import data_pipeline.build.stages as build_module

    path = write_jsonl(tmp_path / "c.jsonl", crafted_rows() * 1)
    data = {"sources": [{"kind": KIND, "path": str(path), "name": "c", "dedup": "structural"}],
            "splits": {"train": 1.0}, "shard_bytes": 8192, "chunk_size": 3, "executor": "inline"}
    reference = quiet(BuildConfig.from_dict({**data, "out": str(tmp_path / "ref")}))

    real_write_shard = build_module.write_shard
    calls = {"n": 0}

    def dies_on_second_shard(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_write_shard(*args)

    monkeypatch.setattr(build_module, "write_shard", dies_on_second_shard)
    config = BuildConfig.from_dict({**data, "out": str(tmp_path / "out")})
    with pytest.raises(KeyboardInterrupt):
        quiet(config)
    assert not (tmp_path / "out" / "manifest.json").exists()
    first_shard = tmp_path / "out" / "train-000000.tar"
    stamp = first_shard.stat().st_mtime_ns
    monkeypatch.setattr(build_module, "write_shard", real_write_shard)

    logs: list[str] = []
    resumed = build(config, progress=False, log=logs.append)
    assert "resumed: 4 chunk(s) were already parsed" in logs  # 10 rows / 3 per chunk
    assert first_shard.stat().st_mtime_ns == stamp  # the finished shard was kept, not rewritten
    ref_files = {p.name: p.read_bytes() for p in (tmp_path / "ref").glob("*.tar")}
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")} == ref_files and len(ref_files) >= 2
    strip = lambda m: {k: v for k, v in m.items() if k != "code_version"}  # noqa: E731
    assert strip(resumed.manifest) == strip(reference.manifest)


@pytest.mark.slow  # amd's first call JIT-compiles (seconds)
def test_pdd_rows_are_stored_on_request_and_read_by_the_loader(tmp_path):
    """`pdd_k` stores each sample's PDD rows (the numbers `pdd_features` gives); the loader's batches
    are the per-batch ones, number for number. Without it the config record has no such key and
    no sample an extra array (what a build wrote before the option existed)."""
    import numpy as np
    import torch

    from data_pipeline.load.collate import BatchViews
    from data_pipeline.load.loader import ShardLoader
    from data_pipeline.load.shard_list import split_shards
    from data_pipeline.load.shard_records import iter_records
    from data_pipeline.record import pdd_features

    path = write_jsonl(tmp_path / "c.jsonl", crafted_rows())
    common = {"sources": [{"kind": KIND, "path": str(path), "name": "c", "dedup": "none"}],
              "splits": {"train": 1.0}, "executor": "inline"}
    plain = quiet(BuildConfig.from_dict({**common, "out": str(tmp_path / "plain")})).manifest
    stored = quiet(BuildConfig.from_dict({**common, "out": str(tmp_path / "pdd"), "pdd_k": 12})).manifest
    assert "pdd_k" not in plain["build_config"] and "pdd_k" not in BuildConfig.from_dict(common).to_dict()
    assert stored["build_config"]["pdd_k"] == 12
    assert plain["config_fingerprint"] != stored["config_fingerprint"]

    plain_records = list(iter_records(tmp_path / "plain"))
    stored_records = list(iter_records(tmp_path / "pdd"))
    assert plain_records and all(r.pdd is None for r in plain_records)
    assert [r.key for r in plain_records] == [r.key for r in stored_records]
    for a, b in zip(plain_records, stored_records):
        assert np.array_equal(a.frac_coords, b.frac_coords) and np.array_equal(a.lattice, b.lattice)
        assert b.pdd.shape == (b.num_atoms, 13) and np.array_equal(b.pdd, pdd_features(a, 12)), b.key

    for views in (BatchViews(pdd_k=12), BatchViews(pdd_k=5)):  # k=5: the stored rows do not fit, computed
        batches = [list(ShardLoader(split_shards(tmp_path / name, "train"), views=views, atom_budget=64, seed=0))
                   for name in ("plain", "pdd")]
        assert len(batches[0]) == len(batches[1]) > 0
        for a, b in zip(*batches):
            assert a.keys == b.keys and torch.equal(a.pdd, b.pdd)


def test_pdd_k_is_checked():
    with pytest.raises(ConfigError, match="pdd_k must be a positive integer"):
        BuildConfig.from_dict({"pdd_k": 0})
    with pytest.raises(ConfigError, match="pdd_k must be a positive integer"):
        BuildConfig.from_dict({"pdd_k": "92"})
