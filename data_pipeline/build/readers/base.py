"""The reader contract: a cheap streaming `scan` and an expensive, parallelisable `parse`.

A reader walks one raw source (a CSV, a JSON file, a zip of CIFs, a folder...) without holding it
in memory and yields `RawEntry` items: the record's stable key, its split group, where it came
from, and a small payload (a CIF string, a document dict, a frame dict). The build ships entries
to Ray workers, which call `parse` (text → CrystalRecord) and then validation. Anything wrong is a
`RecordError` carrying the reason; the build writes it to the rejects file and goes on.

Problems found while scanning (a truncated JSON file, an unreadable zip member) are yielded as
`Reject` items so they are counted too, instead of stopping the scan.

Planned reading (optional, for sources too big for the driver to read): `plan(entries)` splits
the source into parts of about `entries` entries without reading their content (a zip's central
directory, a folder listing, the CSV rows of a GNoME summary, a byte index of an MPtrj JSON's
material boundaries) and returns JSON-serialisable dicts, or None when this source cannot be
planned (a tar or gzip stream): then the build scans it. `scan_part(part)` runs in the parse task
and yields what `scan` yields for that part; concatenated in plan order the parts give exactly
`scan()` (tests/data_pipeline/test_readers_planned.py). A part names what it covers (member sizes
and CRCs, byte ranges, the file's identity), so a resumed build recognises finished parts without
reading a source. A reader with `identity()` has its plan cached under it in the work folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

from data_pipeline.record import CrystalRecord, RecordError  # noqa: F401 (readers raise it)


@dataclass(frozen=True)
class RawEntry:
    source: str  # source name, e.g. "mp20", "gnome", "mptrj", "jarvis", "cif"
    key: str  # stable unique key "source:id[:frame]"
    group: str  # split group id (e.g. the material id for every MPtrj frame)
    location: str  # human-readable origin: "val.csv.gz:row 17", "by_id.zip!by_id/x.CIF"
    payload: Any  # what `parse` needs: plain str / dict / bytes (must be serialisable by Ray)


@dataclass(frozen=True)
class Reject:
    key: str  # the record key when known, else a description of the position
    source: str
    location: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "source": self.source, "location": self.location, "reason": self.reason}


class Reader(Protocol):
    """One raw layout. Constructed from a path and options; iterated once per build."""

    name: str

    def scan(self) -> Iterator[RawEntry | Reject]:
        """Stream entries in a deterministic order; memory must not grow with file size."""
        ...

    def parse(self, entry: RawEntry) -> CrystalRecord:
        """Turn one entry into a record, or raise RecordError with the reason."""
        ...

    # Optional (see the module docstring):
    #   def plan(self, entries: int) -> Iterable[dict] | None
    #   def scan_part(self, part: dict) -> Iterator[RawEntry | Reject]
    #   def identity(self) -> str        (cache the plan under it)
