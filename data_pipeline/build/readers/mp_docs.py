"""Materials Project documents with pymatgen structures: entries, legacy and current document layouts.

`path` is a `.json`, `.json.gz`, `.jsonl(.gz)` file or a folder of them (sorted). A file may be a
JSON array of documents (streamed one document at a time), JSON lines, or one object mapping ids
to documents (`layout="mapping"` streams it; the default `layout="auto"` decodes a top-level
object whole, fine for the small mapping files MP tools write). Documents understood:

  ComputedStructureEntry dicts   key `mp:<entry_id>`, group = data.material_id (or entry_id);
                                 energy = `energy` + `correction` (corrected total, eV),
                                 energy_per_atom = energy / N; properties uncorrected_energy,
                                 energy_correction
  legacy `materials` docs        key `mp:<task_id>` (the material id); energy, energy_per_atom,
                                 bandstructure.band_gap → band_gap
  legacy `thermo` docs           thermo.energy_per_atom, thermo.formation_energy_per_atom,
                                 thermo.e_above_hull
  `magnetism` docs               site `magmom` properties → magmoms; total_magnetization → properties
  mp-api summary-like docs       material_id, formation_energy_per_atom, energy_above_hull,
                                 band_gap, energy_per_atom, uncorrected_energy_per_atom
A document without a `structure` (e.g. a plain ComputedEntry) is a `missing_field` reject; one
without any id is a `missing_field` reject. Options: `source` ("mp"), `layout`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from data_pipeline.build.readers import register_reader
from data_pipeline.build.readers._common import arrays_from_structure_dict, make_record, open_text, optional_float, site_magmoms
from data_pipeline.build.readers._jsonstream import JsonStream, Malformed, Truncated, iter_documents, iter_object
from data_pipeline.build.readers.base import RawEntry, Reject
from data_pipeline.record import CrystalRecord
from data_pipeline.build.validate import reject

SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")

# record field → document paths tried in order (dots walk nested dicts)
LABEL_PATHS = {
    "energy_per_atom": ("energy_per_atom", "thermo.energy_per_atom"),
    "formation_energy_per_atom": (
        "formation_energy_per_atom", "thermo.formation_energy_per_atom", "data.formation_energy_per_atom",
    ),
    "e_above_hull": (
        "energy_above_hull", "e_above_hull", "thermo.e_above_hull", "thermo.energy_above_hull", "data.e_above_hull",
    ),
    "band_gap": ("band_gap", "bandstructure.band_gap", "data.band_gap"),
}
PROPERTY_PATHS = {
    "total_magnetization": ("total_magnetization", "magnetism.total_magnetization"),
    "uncorrected_energy_per_atom": ("uncorrected_energy_per_atom",),
}


def lookup(doc: dict, path: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def is_entry(doc: dict) -> bool:
    return doc.get("@class") in ("ComputedStructureEntry", "ComputedEntry") or ("entry_id" in doc and "correction" in doc)


def document_ids(doc: dict) -> tuple[str | None, str | None]:
    """(key id, group id) of a document."""
    material = doc.get("material_id") or lookup(doc, "data.material_id")
    if is_entry(doc):
        entry = doc.get("entry_id") or material
        return (str(entry) if entry else None), (str(material or entry) if (material or entry) else None)
    ident = material or doc.get("task_id") or doc.get("entry_id")
    return (str(ident) if ident else None), (str(ident) if ident else None)


def compact_payload(doc: dict) -> dict:
    """What `parse` needs from a document (documents carry much more: task lists, inputs, ...)."""
    labels = {path: lookup(doc, path) for paths in (*LABEL_PATHS.values(), *PROPERTY_PATHS.values()) for path in paths}
    payload = {"structure": doc.get("structure"), "labels": {k: v for k, v in labels.items() if v is not None}}
    if is_entry(doc):
        correction = doc.get("correction")
        if correction is None and doc.get("energy_adjustments"):
            correction = sum(
                adj.get("value", adj.get("adj_per_atom", 0.0) * adj.get("n_atoms", 0.0))
                for adj in doc["energy_adjustments"]
                if isinstance(adj, dict)
            )
        payload["entry"] = {"energy": doc.get("energy"), "correction": correction or 0.0}
    elif "energy" in doc:
        payload["energy"] = doc["energy"]
    return payload


@register_reader("mp_docs")
class MPDocsReader:
    name = "mp_docs"

    def __init__(self, path, source: str = "mp", layout: str = "auto"):
        self.path = Path(path)
        self.source = source
        if layout not in ("auto", "mapping"):
            raise ValueError(f"mp_docs layout must be 'auto' or 'mapping', got {layout!r}")
        self.layout = layout
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.name.lower().endswith(SUFFIXES))
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise FileNotFoundError(f"mp_docs reader: {self.path} does not exist")

    def scan(self) -> Iterator[RawEntry | Reject]:
        for file in self.files:
            with open_text(file) as handle:
                stream = JsonStream(handle)
                last = "start"
                try:
                    documents = self._mapping(stream) if self.layout == "mapping" else iter_documents(stream)
                    for position, doc in documents:
                        last = position
                        yield self._entry(file, position, doc)
                except Truncated as error:
                    yield Reject(key=f"{self.source}:{file.name}", source=self.source, location=f"{file.name}:after {last}",
                                 reason=f"truncated_file: {error}")
                except Malformed as error:
                    yield Reject(key=f"{self.source}:{file.name}", source=self.source, location=f"{file.name}:after {last}",
                                 reason=f"unparsable: {error}; the rest of the file is skipped")

    @staticmethod
    def _mapping(stream: JsonStream):
        for key, _ in iter_object(stream):
            yield key, stream.value()

    def _entry(self, file: Path, position: str, doc: Any) -> RawEntry | Reject:
        location = f"{file.name}:{position}"
        if not isinstance(doc, dict):
            return Reject(key=f"{self.source}:{location}", source=self.source, location=location,
                          reason=f"unparsable: document is {type(doc).__name__}, expected an object")
        ident, group = document_ids(doc)
        if ident is None:
            return Reject(key=f"{self.source}:{location}", source=self.source, location=location,
                          reason="missing_field: document has no material_id / entry_id / task_id")
        key = f"{self.source}:{ident}"
        if doc.get("structure") is None:
            return Reject(key=key, source=self.source, location=location,
                          reason="missing_field: document has no structure")
        return RawEntry(source=self.source, key=key, group=group, location=location, payload=compact_payload(doc))

    def parse(self, entry: RawEntry) -> CrystalRecord:
        payload = entry.payload
        numbers, frac, lattice, site_properties = arrays_from_structure_dict(payload["structure"])
        n = len(numbers)
        raw = payload["labels"]
        labels: dict[str, Any] = {}
        for field, paths in LABEL_PATHS.items():
            for path in paths:
                if path in raw:
                    labels[field] = optional_float(raw[path], path)
                    break
        properties = {}
        for name, paths in PROPERTY_PATHS.items():
            for path in paths:
                if path in raw:
                    properties[name] = optional_float(raw[path], path)
                    break
        if "entry" in payload:
            uncorrected = optional_float(payload["entry"]["energy"], "energy")
            correction = optional_float(payload["entry"]["correction"], "correction")
            if uncorrected is None:
                raise reject("missing_field", "entry has no energy")
            labels["energy"] = uncorrected + correction
            labels["energy_per_atom"] = labels["energy"] / n
            properties["uncorrected_energy"] = uncorrected
            properties["energy_correction"] = correction
        elif payload.get("energy") is not None:
            labels["energy"] = optional_float(payload["energy"], "energy")
        return make_record(
            entry.key, entry.source, (numbers, frac, lattice), group=entry.group,
            magmoms=site_magmoms(site_properties), properties=properties, **labels,
        )
