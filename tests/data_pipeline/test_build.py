"""The Ray build end to end, on one local Ray session shared by this module.

Real readers on real files (MPtrj sample and its broken variants) plus crafted JSON-lines input
(supercells, permuted copies, broken rows) through a contract reader; real local Ray; real tars.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.build.stages import BuildError, build
from data_pipeline.build.config import BuildConfig
from data_pipeline.manifest import load_manifest, manifest_digest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from build_fixture_readers import KIND, crafted_rows, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def ray_session():
    import ray

    # Ray workers import the contract reader from this folder.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def small_config(shared_data: Path, tmp_path: Path, out: Path, **changes) -> BuildConfig:
    """One input of every reader kind and layout family, small enough to build three times."""
    mptrj = shared_data / "derived_layouts" / "mptrj"
    jsonl = write_jsonl(tmp_path / "crafted.jsonl", crafted_rows())
    mp20_head = tmp_path / "mp20_head.csv.gz"  # the first 200 real MP-20 rows, same columns
    with gzip.open(shared_data / "mp_20" / "val.csv.gz", "rt", newline="") as src, \
            gzip.open(mp20_head, "wt", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerows(row for _, row in zip(range(201), csv.reader(src)))  # header + 200 rows
    gnome = shared_data / "derived_layouts" / "gnome"
    jarvis = shared_data / "jarvis"
    data = {
        "sources": [
            {"kind": KIND, "path": str(jsonl), "name": "crafted", "dedup": "structural"},
            {"kind": "mptrj", "path": str(mptrj / "MPtrj_sample.json.gz"), "name": "mptrj", "dedup": "none"},
            {"kind": "mptrj", "path": str(mptrj / "bad" / "nan_force.json"), "name": "mptrj_nan",
             "options": {"source": "mptrj_nan"}},
            {"kind": "mptrj", "path": str(mptrj / "bad" / "truncated.json"), "name": "mptrj_truncated",
             "options": {"source": "mptrj_trunc"}},
            {"kind": "cdvae_csv", "path": str(mp20_head), "name": "mp20", "options": {"source": "mp20"}},
            {"kind": "gnome", "path": str(gnome / "header_variants" / "stable_materials_summary_2024-08.csv"),
             "name": "gnome", "options": {"structures": str(gnome / "by_id.zip")}},
            {"kind": "structure_files", "path": str(jarvis / "alignn_sample_data"), "name": "poscars"},
            {"kind": "jarvis", "path": str(jarvis / "alignn_sample_data_ff"), "name": "jarvis_ff"},
            {"kind": "mp_docs", "path": str(shared_data / "mp_entries"), "name": "mp_docs"},
        ],
        "chunk_size": 64,
        "shard_bytes": 256 * 1024,
        "out": str(out),
    }
    return BuildConfig.from_dict(data).replace(**changes)


@pytest.fixture(scope="module")
def small_build(ray_session, shared_data, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("small")
    config = small_config(shared_data, tmp_path, tmp_path / "a")
    return config, build(config, progress=False, log=lambda _: None), tmp_path


def test_ray_build_counts_rejects_duplicates_and_groups(small_build):
    config, first, tmp_path = small_build
    m = first.manifest
    counts = m["counts"]
    assert counts["balanced"]
    assert counts["records_in"] == counts["written"] + counts["rejects"] + counts["duplicates"] + counts["excluded"]
    assert m["sources"]["mptrj"]["records_in"] == 749 and m["sources"]["mptrj"]["written"] == 749  # dedup none
    # The broken-variant files repeat frames of the sample: 17 good frames are exact duplicates.
    assert m["sources"]["mptrj_nan"] == {"kind": "mptrj", "records_in": 18, "parsed": 17, "rejects": 1,
                                         "duplicates": 17, "excluded": 0, "written": 0}
    crafted = m["sources"]["crafted"]
    # 10 rows: broken → reject; repeated key, permuted (exact), supercell, translated and the two
    # isotropically scaled Si frames (structural; the matcher scales volumes by default) → dropped.
    assert crafted == {"kind": KIND, "records_in": 10, "parsed": 9, "rejects": 1, "duplicates": 6,
                       "excluded": 0, "written": 3}
    dups = [json.loads(line) for line in (tmp_path / "a" / "duplicates.jsonl").read_text().splitlines()]
    crafted_dups = {d["key"]: (d["how"], d["matched"]) for d in dups if d["source"] == "crafted"}
    assert crafted_dups == {
        "jsonl:rocksalt-supercell": ("structural", "jsonl:rocksalt"),
        "jsonl:rocksalt-permuted": ("exact", "jsonl:rocksalt"),
        "jsonl:rocksalt-translated": ("structural", "jsonl:rocksalt"),
        "jsonl:rocksalt": ("duplicate_key", "jsonl:rocksalt"),
        "jsonl:si-traj:1": ("structural", "jsonl:si-traj:0"),
        "jsonl:si-traj:2": ("structural", "jsonl:si-traj:0"),
    }
    rejects = [json.loads(line) for line in (tmp_path / "a" / "rejects.jsonl").read_text().splitlines()]
    assert {"key": "jsonl:broken", "source": "jsonl", "location": "crafted.jsonl:line 6",
            "reason": "missing_field: no structure in this row"} in rejects
    nan = [r for r in rejects if r["source"] == "mptrj_nan"]
    assert len(nan) == 1 and nan[0]["key"] == "mptrj_nan:mp-24066:mp-24066-1-5" and nan[0]["reason"].startswith("non_finite")
    assert "nan_force.json" in nan[0]["location"]
    assert counts["rejects_by_code"]["non_finite"] == 1 and counts["rejects_by_code"]["truncated_file"] == 1
    assert sum(s["num_samples"] for s in m["splits"].values()) == counts["written"]
    for name in ("mp20", "gnome", "poscars", "jarvis_ff", "mp_docs"):  # every reader kind wrote records
        assert m["sources"][name]["written"] > 0, name
    assert m["sources"]["mp20"]["records_in"] == 200 and m["sources"]["gnome"]["records_in"] == 12
    assert m["sources"]["poscars"]["records_in"] == 70 and m["sources"]["jarvis_ff"]["records_in"] == 50
    assert m["sources"]["mp_docs"]["rejects"] == counts["rejects_by_code"]["missing_field"] - 1  # docs without structure
    for split in m["splits"].values():
        for shard in split["shards"]:
            path = tmp_path / "a" / shard["file"]
            assert path.stat().st_size == shard["bytes"]
    assert "config_fingerprint" in m and m["build_config"]["sources"][0]["name"] == "crafted"
    assert m["units"]["stress"] == "GPa"
    assert not (tmp_path / "a" / "_work").exists()

    # Every frame of one MPtrj material is in one split.
    from data_pipeline.load.shard_records import iter_records

    split_of: dict[str, set] = {}
    for split in m["splits"]:
        for record in iter_records(tmp_path / "a", [split]):
            if record.source == "mptrj":
                split_of.setdefault(record.group, set()).add(split)
    assert len(split_of) == 40 and all(len(s) == 1 for s in split_of.values())


def test_rebuild_with_ray_and_inline_is_byte_identical(small_build):
    config, first, tmp_path = small_build
    m = first.manifest
    logs: list[str] = []
    # Same input + config → byte-identical shards and manifest, with Ray and without it.
    second = build(config.replace(out=str(tmp_path / "b")), progress=False, log=logs.append)
    inline = build(config.replace(out=str(tmp_path / "c"), executor="inline"), progress=False, log=logs.append)
    reference = shard_bytes(tmp_path / "a")
    assert len(reference) == sum(len(s["shards"]) for s in m["splits"].values()) > 3
    assert shard_bytes(tmp_path / "b") == reference
    assert shard_bytes(tmp_path / "c") == reference
    # Manifests match except for the code version, which can move between builds in a checkout
    # others commit to (git commit / dirty flag); with the same code they are byte-identical.
    def without_code_version(manifest: dict) -> dict:
        return {k: v for k, v in manifest.items() if k != "code_version"}

    assert without_code_version(second.manifest) == without_code_version(inline.manifest) == without_code_version(m)
    if second.manifest["code_version"] == inline.manifest["code_version"]:
        assert manifest_digest(tmp_path / "b") == manifest_digest(tmp_path / "c")
    assert (tmp_path / "b" / "rejects.jsonl").read_bytes() == (tmp_path / "a" / "rejects.jsonl").read_bytes()

    # A finished build of the same config is reported and left alone; another config is refused.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    again = build(config, progress=False, log=logs.append)
    assert again.reused and "already holds a finished build" in logs[-1]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == before
    with pytest.raises(BuildError, match="different config"):
        build(config.replace(seed=1), progress=False, log=logs.append)


def test_samples_are_json_and_safetensors_only(small_build):
    """Shards read with plain webdataset: two data-only members per sample, never a pickle."""
    import webdataset as wds

    from data_pipeline.shard_format import decode_sample

    _, result, tmp_path = small_build
    keys = []
    for split in result.manifest["splits"].values():
        files = [str(tmp_path / "a" / f["file"]) for f in split["shards"]]
        for sample in wds.WebDataset(files, shardshuffle=False, empty_check=False):
            assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"json", "safetensors"}
            keys.append(decode_sample(sample).key)
    assert len(keys) == len(set(keys)) == result.manifest["counts"]["written"]


@pytest.mark.slow
def test_build_killed_mid_way_resumes_to_identical_shards(ray_session, shared_data, tmp_path):
    mptrj = shared_data / "derived_layouts" / "mptrj" / "MPtrj_sample.json.gz"
    config_file = tmp_path / "config.yaml"
    out = tmp_path / "killed"
    config_file.write_text(
        f"sources:\n  - {{kind: mptrj, path: '{mptrj}', name: mptrj, dedup: exact}}\n"
        f"chunk_size: 16\nshard_bytes: 131072\nout: '{out}'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline", "build", str(config_file), "--num-workers", "1", "--no-progress"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    chunks = out / "_work" / "chunks"
    try:
        deadline = time.monotonic() + 300
        while len(list(chunks.glob("*.json"))) < 4:
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "no chunk finished within 300 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the build and the Ray processes it started
        proc.wait()
    assert not (out / "manifest.json").exists()
    done_before = len(list(chunks.glob("*.json")))
    assert 4 <= done_before <= 47  # 749 frames / 16 per chunk; killed while parsing or writing

    logs: list[str] = []
    resumed = build(BuildConfig.from_yaml(config_file), progress=False, log=logs.append)
    assert any(line.startswith("resuming the unfinished build") for line in logs)
    skipped = [line for line in logs if line.startswith("resumed:")]
    assert skipped and int(skipped[0].split()[1]) >= 4

    reference = build(BuildConfig.from_yaml(config_file).replace(out=str(tmp_path / "ref"), executor="inline"),
                      progress=False, log=lambda _: None)
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref") and shard_bytes(out)
    assert {k: v for k, v in resumed.manifest.items() if k != "code_version"} == \
        {k: v for k, v in reference.manifest.items() if k != "code_version"}
    assert load_manifest(out)["counts"]["balanced"]
