"""Reference sets for evaluation and screening: the crystals a generator was trained on."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from data_pipeline.record import CrystalRecord

ELEMENTAL_REFS_NAME = "mp_entries/mbd_2023-02-07-mp-elemental-reference-entries.json.gz"
# The shared MP-20 data has no test file: its validation file is carved in two halves by a hash of the
# material id, the same rule as finetune's `val_test` split (tests/discovery checks they agree).
HALVES = ("val", "test")
TEST_SHARE = 0.5


def half_of(material_id: str) -> str:
    digest = hashlib.sha256(f"split|{material_id}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_SHARE else "val"


def split_spec(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """'val.csv.gz:test' → (val.csv.gz, 'test'); a plain path → (path, None)."""
    text = str(spec)
    head, _, tail = text.rpartition(":")
    if head and tail in HALVES and not Path(text).exists():
        return Path(head), tail
    return Path(text), None


def load_crystals(spec: str | os.PathLike, splits: tuple[str, ...] = ("train",)) -> list[CrystalRecord]:
    """Crystals from a shard set, a CSV of CIFs (`PATH:val` / `PATH:test` for one half of a
    validation file), a samples directory or a folder of CIFs."""
    path, half = split_spec(spec)
    if path.is_dir() and not (path / "manifest.json").is_file():
        from discovery.generate import read_samples

        return read_samples(path)
    records = load_reference_records(path, splits)
    if half is not None:
        records = [r for r in records if half_of(r.key.split(":", 1)[-1]) == half]
    return records


def load_reference_records(path: str | os.PathLike, splits: tuple[str, ...] = ("train",)) -> list[CrystalRecord]:
    """A shard set (directory with manifest.json: the given splits) or a CDVAE-style CSV of CIFs."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        from data_pipeline.load.shard_records import iter_records

        return list(iter_records(path, splits))
    if path.is_file() and path.name.endswith((".csv", ".csv.gz")):
        from data_pipeline.build.readers import RecordError, Reject, open_reader
        from data_pipeline.build.validate import validate

        reader = open_reader("cdvae_csv", path)
        records = []
        for entry in reader.scan():
            if isinstance(entry, Reject):
                continue
            try:
                record = reader.parse(entry)
                validate(record)
            except RecordError as exc:
                print(f"reference: skipped {entry.location}: {exc}", file=sys.stderr)
                continue
            records.append(record)
        return records
    raise FileNotFoundError(
        f"{path}: not a shard set (no manifest.json) nor a CSV of CIFs; pass the training shards "
        "(`crystalfm data build ...`) or e.g. ../shared/data/mp_20/train.csv.gz"
    )


def default_elemental_refs() -> Path:
    """MP's elemental reference energies (Matbench Discovery's file) from the shared data folder."""
    root = Path(os.environ.get("CRYSTALFM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    return root / ELEMENTAL_REFS_NAME


def load_elemental(path: str | os.PathLike | None) -> dict[str, float]:
    from discovery.stability import load_elemental_references

    path = Path(path) if path else default_elemental_refs()
    if not path.is_file():
        raise FileNotFoundError(
            f"elemental reference energies not found at {path}: pass --elemental-refs with MP's "
            "elemental reference entries (Matbench Discovery's 2023-02-07-mp-elemental-reference-entries.json.gz)"
        )
    return load_elemental_references(path)
