"""Parsing pieces the readers share: CIF / POSCAR / pymatgen-dict → record, labels, file walking.

Every failure is raised as `RecordError("<code>: <detail>")` with a code from
`data_pipeline.build.validate.REJECT_CODES`.
"""
from __future__ import annotations

import gzip
import io
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from data_pipeline.build import kernels
from data_pipeline.build.cif_fast import element_tables, parse_cif_pymatgen, parse_p1_cif
from data_pipeline.build.readers.base import RecordError
from data_pipeline.record import MAX_Z, CrystalRecord
from data_pipeline.build.validate import as_float, reject

# ------------------------------------------------------------------------------------------ labels


def optional_float(value: Any, name: str) -> float | None:
    """A label from JSON: None/NaN-free conversion with `bad_label_type` for strings, bools, lists."""
    return as_float(value, name)


MISSING_CELLS = ("nan", "none", "null", "na", "n/a")  # CSV cells that mean "no value"


def csv_float(text: str | None, name: str) -> float | None:
    """A label from a CSV cell: empty / NaN-ish cells are None, non-numbers are `bad_label_type`."""
    if text is None:
        return None
    text = text.strip()
    if text == "" or text.lower() in MISSING_CELLS:
        return None
    try:
        return float(text)
    except ValueError:
        raise reject("bad_label_type", f"{name} is {text[:40]!r}, expected a number") from None


def array_label(value: Any, name: str) -> np.ndarray | None:
    """A nested-list label as float array; strings inside are `bad_label_type`, ragged is `label_shape`."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, bool)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise reject("bad_label_type", f"{name} is {type(value).__name__}, expected a list of numbers")
    if not isinstance(value, np.ndarray):
        # The common case, nested lists of numbers: numpy's own dtype says there is no string at
        # any depth (one string makes it 'U'), where the recursive check below costs ~0.1 ms on
        # an MPtrj frame. Casting the number array gives the doubles the direct conversion gives.
        # Anything else (strings, ragged rows, objects) takes the path below and its verdicts.
        try:
            numbers = np.asarray(value)
        except Exception:  # noqa: BLE001 - ragged, or an overflow: let the path below decide
            numbers = None
        if numbers is not None and numbers.dtype.kind in "biuf":
            return numbers.astype(np.float64)
    try:
        array = np.asarray(value, dtype=np.float64)
    except ValueError as error:  # ragged rows, or strings that are not numbers
        if _contains_string(value):
            raise reject("bad_label_type", f"{name} holds strings") from None
        raise reject("label_shape", f"{name} is ragged ({error})") from None
    if _contains_string(value):  # np.asarray("1.0") silently converts: refuse JSON strings
        raise reject("bad_label_type", f"{name} holds strings")
    return array


def _contains_string(value: Any) -> bool:
    if isinstance(value, (str, bytes)):
        return True
    if isinstance(value, (list, tuple)):
        return any(_contains_string(v) for v in value)
    return False


# -------------------------------------------------------------------------------------- structures


def check_numbers(numbers: Iterable[int], where: str = "") -> np.ndarray:
    numbers = np.asarray(list(numbers), dtype=np.int64)
    bad = (numbers < 1) | (numbers > MAX_Z)
    if bad.any():
        raise reject("unknown_element", f"atomic number {int(numbers[bad][0])} outside 1..{MAX_Z}{where}")
    return numbers


def numbers_from_symbols(symbols: Iterable[str]) -> np.ndarray:
    z_of, _ = element_tables()
    out = []
    for symbol in symbols:
        symbol = str(symbol).strip()
        z = z_of.get(symbol) or z_of.get(symbol.capitalize())
        if z is None:
            raise reject("unknown_element", f"element symbol {symbol!r}")
        out.append(z)
    return check_numbers(out)


def arrays_from_structure(structure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(numbers, frac, lattice) from an ordered pymatgen Structure; refuses disorder and dummies."""
    from pymatgen.core.periodic_table import DummySpecies

    if len(structure) == 0:
        raise reject("empty", "structure has no sites")
    numbers = []
    for index, site in enumerate(structure):
        species = site.species
        if len(species) != 1 or abs(sum(species.values()) - 1.0) > 1e-6:
            raise reject("disordered", f"site {index} is {site.species_string!r} (partial/mixed occupancy)")
        specie = next(iter(species))
        if isinstance(specie, DummySpecies):
            raise reject("unknown_element", f"site {index} has dummy species {str(specie)!r}")
        numbers.append(specie.Z)
    return check_numbers(numbers), np.asarray(structure.frac_coords), np.asarray(structure.lattice.matrix)


def arrays_from_cif(text: str, fast: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CIF text → (numbers, frac, lattice): gemmi fast path for plain P1 CIFs, else pymatgen."""
    if not isinstance(text, str) or not text.strip():
        raise reject("missing_field", "empty CIF text")
    if fast:
        parsed = parse_p1_cif(text)
        if parsed is not None:
            return parsed
    try:
        structure = parse_cif_pymatgen(text)
    except RecordError:
        raise
    except Exception as error:
        raise _classify_parse_error("CIF", error) from None
    return arrays_from_structure(structure)


def arrays_from_poscar(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from pymatgen.io.vasp import Poscar

    if not isinstance(text, str) or not text.strip():
        raise reject("missing_field", "empty POSCAR text")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Poscar.from_str(text, read_velocities=False).structure
    except Exception as error:
        raise _classify_parse_error("POSCAR", error) from None
    return arrays_from_structure(structure)


def arrays_from_structure_dict(doc: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """A pymatgen `Structure.as_dict()` → (numbers, frac, lattice, site properties).

    Reads the dict directly (10x faster than `Structure.from_dict`) for ordered sites with plain
    elements; anything else goes through pymatgen so its rules (and messages) apply."""
    if not isinstance(doc, dict):
        raise reject("unparsable", f"structure is {type(doc).__name__}, expected a pymatgen Structure dict")
    try:
        matrix = doc["lattice"]["matrix"]
        sites = doc["sites"]
    except (KeyError, TypeError):
        raise reject("missing_field", "structure dict lacks lattice.matrix or sites") from None
    if not isinstance(sites, list):
        raise reject("unparsable", "structure sites is not a list")
    if len(sites) == 0:
        raise reject("empty", "structure has no sites")
    lattice = array_label(matrix, "lattice.matrix")
    if lattice.shape != (3, 3):
        raise reject("unparsable", f"lattice matrix shape {lattice.shape} != (3, 3)")
    symbols, frac, properties = [], [], []
    for index, site in enumerate(sites):
        species = site.get("species") if isinstance(site, dict) else None
        if not isinstance(species, list) or not species:
            raise reject("missing_field", f"site {index} has no species")
        if len(species) != 1 or float(species[0].get("occu", 1.0)) != 1.0:
            raise reject("disordered", f"site {index} has species {species} (partial/mixed occupancy)")
        symbols.append(species[0].get("element", ""))
        if "abc" in site:
            frac.append(site["abc"])
        elif "xyz" in site:
            frac.append(None)
        else:
            raise reject("missing_field", f"site {index} has neither abc nor xyz")
        properties.append(site.get("properties") or {})
    numbers = numbers_from_symbols(symbols)
    if any(f is None for f in frac):
        cart = array_label([s["xyz"] for s in sites], "xyz")
        frac_array = _cart_to_frac(cart, lattice)
    else:
        frac_array = array_label(frac, "abc")
    if frac_array.shape != (len(sites), 3):
        raise reject("unparsable", f"site coordinates shape {frac_array.shape} != ({len(sites)}, 3)")
    return numbers, frac_array, lattice, properties


def _cart_to_frac(cart: np.ndarray, lattice: np.ndarray) -> np.ndarray:
    det = np.linalg.det(lattice)
    if not np.isfinite(det) or abs(det) < 1e-12:
        raise reject("degenerate_lattice", "singular lattice: cannot convert Cartesian to fractional")
    return cart @ np.linalg.inv(lattice)


def site_magmoms(properties: list[dict]) -> np.ndarray | None:
    """Per-site `magmom` site properties as an [N] array, when every site has a scalar one."""
    values = [p.get("magmom") for p in properties]
    if not values or any(v is None for v in values):
        return None
    if any(isinstance(v, (list, tuple)) for v in values):  # collinear only: take the z component
        values = [v[-1] if isinstance(v, (list, tuple)) else v for v in values]
    return array_label(values, "magmom")


def _classify_parse_error(kind: str, error: Exception) -> RecordError:
    message = str(error) or type(error).__name__
    lowered = message.lower()
    if "occupancy" in lowered or "disorder" in lowered:
        return reject("disordered", f"{kind}: {message[:200]}")
    if ("element" in lowered or "species" in lowered or "symbol" in lowered) and "not" in lowered:
        return reject("unknown_element", f"{kind}: {message[:200]}")
    return reject("unparsable", f"{kind}: {type(error).__name__}: {message[:200]}")


def make_record(
    key: str,
    source: str,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray],
    group: str = "",
    **labels: Any,
) -> CrystalRecord:
    numbers, frac, lattice = arrays[:3]
    lattice = np.asarray(lattice, dtype=np.float64)
    frac = np.asarray(frac, dtype=np.float64)
    if not (kernels.all_finite(lattice) and kernels.all_finite(frac)):  # np.isfinite(...).all() in one call each
        raise reject("non_finite", "lattice or coordinates hold NaN/Inf")
    labels = {name: value for name, value in labels.items() if value is not None}
    properties = labels.pop("properties", None) or {}
    return CrystalRecord(
        key=key,
        source=source,
        atomic_numbers=numbers,
        frac_coords=frac,
        lattice=lattice,
        group=group or key,
        properties={k: v for k, v in properties.items() if v is not None},
        **labels,
    )


# ---------------------------------------------------------------------------------------- files


def open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    """Text handle for plain or .gz files (newline='' so csv sees CIF line breaks inside fields)."""
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def source_name_from_path(path: Path, fallback: str) -> str:
    """'mp_20/train.csv.gz' → 'mp20' (a file named after its split takes its folder's name);
    a folder gives its own name; lower-case letters and digits only."""
    path = Path(path)
    stem = path.name
    if path.is_file():
        for suffix in (".gz", ".csv", ".json", ".jsonl", ".zip", ".tar", ".tgz"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
        if stem.lower() in ("train", "val", "valid", "validation", "test", "data", "all", ""):
            stem = path.resolve().parent.name
    name = re.sub(r"[^a-z0-9]+", "", stem.lower())
    return name or fallback


def file_identity(path: Path) -> str:
    """What a resumed build compares to know a raw file is unchanged without reading it:
    resolved path, size and modification time (ns)."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def batched(items, size: int):
    """Lists of `size` consecutive items (the last may be shorter); itertools.batched from 3.12."""
    import itertools

    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
