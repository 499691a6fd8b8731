"""The reader contract: a cheap streaming `scan` and an expensive, parallelisable `parse`.

A reader walks one raw source (a CSV, a JSON file, a zip of CIFs, a folder...) without holding it
in memory and yields `RawEntry` items: the record's stable key, its split group, where it came
from, and a small payload (a CIF string, a document dict, a frame dict). The build ships entries
to Ray workers, which call `parse` (text → CrystalRecord) and then validation. Anything wrong is a
`RecordError` carrying the reason; the build writes it to the rejects file and goes on.

Problems found while scanning (a truncated JSON file, an unreadable zip member) are yielded as
`Reject` items so they are counted too, instead of stopping the scan.
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
