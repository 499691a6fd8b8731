"""Planned reading (#15 item 1): the driver plans parts cheaply, tasks read them.

The contract every planning reader keeps: the parts' entries, concatenated in plan order, are
exactly the entries of the sequential scan (keys, locations, payloads, rejects), at any part size.
Checked on the real shared files and on broken ones.
"""
from __future__ import annotations

import itertools
from pathlib import Path
import json
import shutil
import zipfile

import pytest

from data_pipeline.build.readers import RawEntry, Reject, open_reader
from data_pipeline.build.readers._jsonindex import member_boundaries


def planned(reader, entries: int) -> list:
    parts = reader.plan(entries)
    assert parts is not None, "this reader should plan this source"
    parts = list(parts)
    json.dumps(parts)  # parts travel to tasks and into resume digests: plain JSON only
    return list(itertools.chain.from_iterable(reader.scan_part(p) for p in parts))


@pytest.mark.parametrize(
    "kind, path, options",
    [
        ("gnome", "derived_layouts/gnome", {}),
        ("gnome", "derived_layouts/gnome/stable_materials_summary.csv", {"structures": "gnome/by_id"}),
        ("gnome", "gnome/by_id", {}),
        ("structure_files", "gnome/by_id", {}),
        ("structure_files", "derived_layouts/gnome/by_id.zip", {}),
        ("mptrj", "derived_layouts/mptrj/MPtrj_sample.json", {}),
    ],
)
@pytest.mark.parametrize("entries", [1, 7, 256])
def test_parts_concatenate_to_the_scan(shared_data, kind, path, options, entries):
    options = {k: shared_data / v for k, v in options.items()}
    scan = list(open_reader(kind, shared_data / path, **options).scan())
    parts = list(planned(open_reader(kind, shared_data / path, **options), entries))
    assert len(scan) > 10 and parts == scan


def test_mptrj_bad_files_and_truncation_in_many_parts(shared_data, tmp_path):
    bad = sorted((shared_data / "derived_layouts" / "mptrj" / "bad").glob("*.json"))
    assert len(bad) >= 9
    for path in bad:
        reader = open_reader("mptrj", path, part_bytes=2000)
        assert planned(reader, 1) == list(reader.scan()), path.name
    # a cut in the middle of a material: every complete frame, then the same truncated_file reject
    data = (shared_data / "derived_layouts" / "mptrj" / "MPtrj_sample.json").read_bytes()
    cut = tmp_path / "cut.json"
    cut.write_bytes(data[: len(data) // 2])
    reader = open_reader("mptrj", cut, part_bytes=20_000)
    assert len(list(reader.plan(1))) > 5
    scan, parts = list(reader.scan()), planned(reader, 1)
    assert parts == scan and isinstance(scan[-1], Reject) and scan[-1].reason.startswith("truncated_file")
    # a .gz cannot be read from the middle: no plan, the build scans it
    assert open_reader("mptrj", shared_data / "derived_layouts" / "mptrj" / "MPtrj_sample.json.gz").plan(10) is None


def test_mptrj_syntax_error_costs_one_part_not_the_rest_of_the_file(shared_data, tmp_path):
    text = (shared_data / "derived_layouts" / "mptrj" / "MPtrj_sample.json").read_text()
    at = text.index('"mp-', text.index('"mp-', 1) + 1)  # inside the first material's frames
    broken = tmp_path / "broken.json"
    broken.write_text(text[:at] + '"x": @@@, ' + text[at:])
    reader = open_reader("mptrj", broken, part_bytes=20_000)
    scan, parts = list(reader.scan()), planned(reader, 1)
    good = lambda items: [i for i in items if isinstance(i, RawEntry)]  # noqa: E731
    assert isinstance(scan[-1], Reject) and "rest of the file is skipped" in scan[-1].reason
    assert sum(isinstance(i, Reject) for i in parts) == 1
    assert len(good(parts)) > 10 * len(good(scan))  # the sequential scan lost everything after the error
    assert set(e.key for e in good(scan)) <= set(e.key for e in good(parts))


def test_json_index_strings_escapes_and_unicode(tmp_path):
    """Brackets and quotes inside strings, escaped quotes and backslash runs, non-ASCII text and
    scalar members, with read blocks cut at every few bytes."""
    doc = {"a": {"f": {"s": 'x"{y}\\', "t": "é{ü}[", "u": "\\\\\""}}, "b": 5, "c": [1, {"d": "]"}], "e": {}}
    path = tmp_path / "tricky.json"
    text = json.dumps(doc, ensure_ascii=False, indent=1)
    path.write_text(text)
    expected = member_boundaries(path)
    for block in (1, 2, 3, 5, 8, 64):
        assert member_boundaries(path, block=block) == expected
    byte_at, char_at = expected
    raw = text.encode()
    assert [raw[i - 1 : i] for i in byte_at] == [b"{", b"}", b"]", b"}"]  # after "{", a's }, c's ], e's }
    assert [text[c - 1] for c in char_at] == ["{", "}", "]", "}"]
    (tmp_path / "list.json").write_text("[1, 2]")
    assert member_boundaries(tmp_path / "list.json") is None


def test_structure_files_unreadable_member_is_a_reject(shared_data, tmp_path):
    folder = tmp_path / "cifs"
    shutil.copytree(shared_data / "gnome" / "by_id", folder)
    reader = open_reader("structure_files", folder)
    parts = list(reader.plan(4))
    victim = parts[1]["members"][0][0]
    (folder / victim).unlink()  # vanished between planning and reading
    items = list(itertools.chain.from_iterable(reader.scan_part(p) for p in parts))
    rejects = [i for i in items if isinstance(i, Reject)]
    assert len(rejects) == 1 and victim in rejects[0].location and rejects[0].reason.startswith("unparsable: unreadable")
    assert len(items) == sum(len(p["members"]) for p in parts)


def test_gnome_zip_is_listed_once_and_rows_without_cifs_are_planned_rejects(shared_data, tmp_path):
    src = shared_data / "derived_layouts" / "gnome"
    work = tmp_path / "g"
    work.mkdir()
    lines = (src / "stable_materials_summary.csv").read_text().splitlines(keepends=True)
    (work / "stable_materials_summary.csv").write_text("".join(lines[:30]))
    with zipfile.ZipFile(src / "by_id.zip") as full, zipfile.ZipFile(work / "by_id.zip", "w") as part:
        for name in full.namelist()[:2000:2]:  # every other CIF
            part.writestr(name, full.read(name))
    reader = open_reader("gnome", work)
    scan, parts = list(reader.scan()), planned(reader, 3)
    assert parts == scan
    assert any(isinstance(i, Reject) and i.reason.startswith("missing_field: no CIF") for i in parts)


# ------------------------------------------------------------------------------- in the build
def _planned_sources(shared_data, tmp_path):
    import gzip

    mptrj = tmp_path / "MPtrj_plain.json"  # a plain .json plans; the shared sample is also stored as .gz
    mptrj.write_bytes(gzip.decompress((shared_data / "derived_layouts" / "mptrj" / "MPtrj_sample.json.gz").read_bytes()))
    return [
        {"kind": "mptrj", "path": str(mptrj), "name": "mptrj", "dedup": "exact"},
        {"kind": "mptrj", "path": str(shared_data / "derived_layouts" / "mptrj" / "bad" / "truncated.json"),
         "name": "cut", "options": {"source": "cut", "part_bytes": 3000}},
        {"kind": "gnome", "path": str(shared_data / "derived_layouts" / "gnome"), "name": "gnome"},
        {"kind": "structure_files", "path": str(shared_data / "gnome" / "by_id"), "name": "cifs", "dedup": "exact"},
    ]


@pytest.mark.slow
def test_planned_and_scanned_builds_are_byte_identical_and_resume_reads_nothing(shared_data, tmp_path, monkeypatch):
    """The same output bytes with planning on and off; a resumed build reuses the cached MPtrj
    index and every parsed part without indexing or reading a source on the driver again."""
    import data_pipeline.build.readers._jsonindex as jsonindex
    import data_pipeline.build.readers.mptrj as mptrj_module
    import data_pipeline.build.stages as stages
    from data_pipeline.build.config import BuildConfig
    from data_pipeline.build.stages import build

    monkeypatch.setattr(mptrj_module, "INDEX_BLOCK", 100_000)  # the plain MPtrj file is indexed in ~15 tasks
    data = {"sources": _planned_sources(shared_data, tmp_path), "chunk_size": 64, "shard_bytes": 1 << 20,
            "executor": "inline"}
    quiet = lambda config: build(config, progress=False, log=lambda _: None)  # noqa: E731
    planned = quiet(BuildConfig.from_dict({**data, "out": str(tmp_path / "planned")}))
    scanned = quiet(BuildConfig.from_dict({**data, "out": str(tmp_path / "scanned"), "plan_sources": False}))
    files = lambda out: {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}  # noqa: E731
    a, b = files(tmp_path / "planned"), files(tmp_path / "scanned")
    assert a.keys() == b.keys() and len([n for n in a if n.endswith(".tar")]) >= 2
    strip = lambda m: {k: v for k, v in m.items() if k != "code_version"}  # noqa: E731
    assert strip(planned.manifest) == strip(scanned.manifest)
    assert {n: v for n, v in a.items() if n != "manifest.json"} == {n: v for n, v in b.items() if n != "manifest.json"}
    assert planned.manifest["sources"]["gnome"]["written"] > 900 and planned.manifest["counts"]["rejects_by_code"]["truncated_file"] == 1

    # Crash in the write stage, then resume: no source is indexed or read on the driver again.
    real_write_shard = stages.write_shard
    monkeypatch.setattr(stages, "write_shard", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt("crash")))
    config = BuildConfig.from_dict({**data, "out": str(tmp_path / "resumed")})
    with pytest.raises(KeyboardInterrupt):
        quiet(config)
    plans = sorted((tmp_path / "resumed" / "_work" / "plans").glob("*.json"))
    assert len(plans) == 2  # one cached index per MPtrj file (gnome and folders are re-listed: cheap)
    parts_done = len(list((tmp_path / "resumed" / "_work" / "chunks").glob("*.json")))
    monkeypatch.setattr(stages, "write_shard", real_write_shard)

    def no_index(*_):
        raise AssertionError("the MPtrj file was indexed again on resume")

    for name in ("member_boundaries", "index_block", "chain_blocks"):
        monkeypatch.setattr(jsonindex, name, no_index)
        monkeypatch.setattr(mptrj_module, name, no_index)
    monkeypatch.setattr(mptrj_module.MPtrjReader, "scan", lambda self: (_ for _ in ()).throw(AssertionError("scan on resume")))
    logs: list[str] = []
    resumed = build(config, progress=False, log=logs.append)
    parsed = [line for line in logs if line.startswith("resumed:")]
    assert parsed and int(parsed[0].split()[1]) == parts_done > 20
    assert strip(resumed.manifest) == strip(planned.manifest)
    assert {n: v for n, v in files(tmp_path / "resumed").items() if n.endswith(".tar")} == \
        {n: v for n, v in a.items() if n.endswith(".tar")}


def test_gnome_csv_byte_ranges_with_quoted_newlines_blank_rows_and_no_final_newline(shared_data, tmp_path):
    """GNoME with a zip plans byte ranges of CSV records (no row read on the driver); a quoted
    field holding line breaks, a blank line and a missing final newline number rows as the scan does."""
    import csv
    import io

    from data_pipeline.build.readers._jsonindex import csv_record_ends

    src = shared_data / "derived_layouts" / "gnome"
    rows = list(csv.reader(io.StringIO((src / "stable_materials_summary.csv").read_text(), newline="")))
    rows[3][-1] = 'line one\nline "two"\r\nthree'  # a label cell with breaks and quotes
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows[:10])
    body = text.getvalue() + "\r\n" + "".join(",".join(r) + "\n" for r in rows[10:40])
    work = tmp_path / "g"
    work.mkdir()
    (work / "stable_materials_summary.csv").write_text(body.rstrip("\n"), newline="")
    (work / "by_id.zip").symlink_to(src / "by_id.zip")
    ends = csv_record_ends(work / "stable_materials_summary.csv", block=5)
    assert ends == csv_record_ends(work / "stable_materials_summary.csv")
    reader = open_reader("gnome", work)
    parts = list(reader.plan(3))
    assert all("rows" in p for p in parts) and len(parts) == 14  # 40 records after the header, one blank
    for entries in (1, 3, 256):
        assert planned(open_reader("gnome", work), entries) == list(open_reader("gnome", work).scan())
    assert any(isinstance(i, Reject) and "empty MaterialId" in i.reason for i in planned(reader, 3))
    for variant in sorted((src / "header_variants").glob("*.csv")):
        options = {"structures": src / "by_id.zip"}
        assert planned(open_reader("gnome", variant, **options), 5) == list(open_reader("gnome", variant, **options).scan())


def test_json_index_in_parallel_blocks_equals_the_sequential_pass(shared_data, tmp_path):
    """Blocks indexed on their own under both string-parity hypotheses, then chained, give the
    boundaries of one block holding the whole file, at every block size: on the MPtrj sample and
    its broken variants, and on strings full of brackets, escaped quotes and backslash runs (the
    whole-file positions themselves are checked by hand in the test above and against the
    sequential scan by the plan == scan tests)."""
    from data_pipeline.build.readers._jsonindex import block_ranges, chain_blocks, index_block

    doc = {"a": {"f": {"s": 'x"{y}\\', "t": "é{ü}[", "u": "\\\\\""}}, "b": 5, "c": [1, {"d": "]"}],
           "e": {}, "g": {"h": "\\\\\\\\\\\"}}"}}
    tricky = tmp_path / "tricky.json"
    tricky.write_text(json.dumps(doc, ensure_ascii=False, indent=1))
    mptrj = shared_data / "derived_layouts" / "mptrj"
    for path, blocks in [(tricky, (1, 2, 3, 5, 7, 16, 4096)), (mptrj / "MPtrj_sample.json", (997, 1 << 16, 1 << 24))] + \
            [(p, (13, 4096)) for p in sorted((mptrj / "bad").glob("*.json"))]:
        expected = member_boundaries(path, block=1 << 30)
        for block in blocks:
            assert chain_blocks(path, [index_block(*r) for r in block_ranges(path, block)]) == expected, (path.name, block)


def test_mptrj_plan_with_parallel_index_tasks(shared_data, monkeypatch):
    import data_pipeline.build.readers.mptrj as mptrj_module

    monkeypatch.setattr(mptrj_module, "INDEX_BLOCK", 50_000)  # the 1.5 MB sample in ~30 index tasks
    calls = []

    def map_tasks(fn, args):
        calls.append(len(args))
        return [fn(*a) for a in args]

    reader = open_reader("mptrj", shared_data / "derived_layouts" / "mptrj" / "MPtrj_sample.json")
    assert reader.plan(16, map_tasks=map_tasks) == reader.plan(16) and calls and calls[0] > 20


def test_a_part_or_a_plan_that_breaks_costs_only_what_it_could_not_read(tmp_path):
    """A reader that fails inside one part loses the rest of that part, with a reject naming the
    file and how many entries it read; a plan that fails midway keeps every part planned before it.
    Every good record read before either failure is written."""
    import sys

    from pymatgen.core import Lattice, Structure

    from data_pipeline.build.config import BuildConfig
    from data_pipeline.build.stages import build

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from build_fixture_readers import FAILING_KIND, structure_row, write_jsonl

    rows = [structure_row(f"x{i}", Structure(Lattice.cubic(3.0 + 0.1 * i), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]))
            for i in range(8)]
    rows[2]["die_reading"] = True  # part 1 (rows 2, 3): row 2 is read, then the reader fails
    rows[6]["die_planning"] = True  # part 3 (rows 6, 7) cannot be planned
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = BuildConfig.from_dict({"sources": [{"kind": FAILING_KIND, "path": str(path), "name": "f"}],
                                    "splits": {"train": 1.0}, "executor": "inline", "out": str(tmp_path / "out")})
    logs: list[str] = []
    manifest = build(config, progress=False, log=logs.append).manifest
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    reasons = sorted(r["reason"] for r in rejects)
    assert len(rejects) == 2, reasons
    assert reasons[0].startswith("unparsable: planning ") and "stopped after 3 parts (OSError: the listing broke)" in reasons[0]
    assert reasons[1].startswith("unparsable: reading a part of ") and "stopped after 1 entries (OSError: disk went away)" in reasons[1]
    assert str(path) in reasons[0] and str(path) in reasons[1]
    assert manifest["sources"]["f"]["written"] == 5  # rows 0, 1, 2, 4, 5
    assert any("planning" in line and "warning" in line for line in logs)
