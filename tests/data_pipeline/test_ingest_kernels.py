"""The compiled per-record steps of the build task (data_pipeline/build/kernels.py) against the
numpy code they replace: the same bits, the same verdicts, the same reject reasons."""
from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest

import data_pipeline.build.validate as validate_module
from data_pipeline.build import cif_fast, kernels
from data_pipeline.build.dedup import _exact_fingerprint_numpy, exact_fingerprint
from data_pipeline.build.readers._common import csv_float
from data_pipeline.build.readers.base import RecordError
from data_pipeline.build.readers.cdvae_csv import _number_or_none, map_labels
from data_pipeline.build.validate import validate
from data_pipeline.record import CrystalRecord

from test_validate import random_cells  # noqa: E402


# ------------------------------------------------------------------------ the fast CIF path's sites
def coordinate_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """[3N] coordinates as CIFs hold them, with the cases the steps treat specially."""
    pool = np.concatenate([
        rng.uniform(-1.5, 2.5, 64),
        1 / 3 + rng.uniform(-1e-4, 1e-4, 16), 2 / 3 + rng.uniform(-1.5e-4, 1.5e-4, 16),  # snapping bands and edges
        [1 / 3, 2 / 3, 0.333333, 0.666667, 0.3333, 0.6667, 1.3333333, -1 / 3, -2 / 3],
        [0.0, -0.0, 1.0, -1.0, 1e-17, -1e-17, -1e-300, 0.5, 0.9999999999999999, 2.0],  # wrap edges (-1e-17 → 1.0)
    ])
    return rng.choice(pool, 3 * n)


def test_p1_sites_equal_numpy_bit_for_bit():
    rng = np.random.default_rng(0)
    merged = nonfinite = 0
    for trial in range(4000):
        n = int(rng.integers(1, 12))
        values = coordinate_values(rng, n)
        if trial % 5 == 0 and n > 1:  # site 1 within (or just beyond) the 2e-4 merge distance of site 0, maybe across a face
            for k in range(3):
                values[k * n + 1] = values[k * n] + rng.uniform(-3e-4, 3e-4) + rng.integers(-1, 2)
        if trial % 97 == 0:
            values[int(rng.integers(0, 3 * n))] = rng.choice([np.nan, np.inf, -np.inf])
        want = cif_fast._sites_numpy(values)
        status, frac = kernels.p1_sites(values, cif_fast._FRAC_TOLERANCE, cif_fast._SITE_TOLERANCE,
                                        cif_fast._ONE_THIRD, cif_fast._TWO_THIRDS)
        if want is None:
            assert status != kernels.SITES_OK
            merged += status == kernels.SITES_MERGED
            nonfinite += status == kernels.SITES_NON_FINITE
        else:
            assert status == kernels.SITES_OK and frac.tobytes() == want.tobytes()
    assert merged > 100 and nonfinite > 20


def test_sorting_the_sites_first_changes_nothing():
    """_parse sorts the coordinates before the steps, the numpy code sorted after them: each step is
    per value, and the merge check is the same for any site order."""
    rng = np.random.default_rng(1)
    for _ in range(500):
        n = int(rng.integers(1, 10))
        values = coordinate_values(rng, n)
        order = rng.permutation(n)
        permuted = values.reshape(3, n)[:, order].reshape(-1)
        after = cif_fast._sites_numpy(values)
        before = cif_fast._sites_numpy(permuted)
        assert (after is None) == (before is None)
        if after is not None:
            assert after[order].tobytes() == before.tobytes()


def test_parse_p1_cif_equals_the_numpy_steps_on_real_cifs(shared_data, monkeypatch):
    """Every MP-20 validation CIF: the kernels' arrays against those of the numpy and Python steps."""
    with gzip.open(shared_data / "mp_20" / "val.csv.gz", "rt", newline="") as handle:
        rows = list(csv.reader(handle))
    texts = [row[rows[0].index("cif")] for row in rows[1:]]
    got = [cif_fast.parse_p1_cif(text) for text in texts]

    def numpy_sites(values, *_):
        frac = cif_fast._sites_numpy(values)
        return (kernels.SITES_OK, frac) if frac is not None else (kernels.SITES_MERGED, None)

    monkeypatch.setattr(kernels, "p1_sites", numpy_sites)
    monkeypatch.setattr(kernels, "cell_clearly_sound", lambda lattice, _: cif_fast._cell_clearly_sound(lattice))
    fast = 0
    for text, mine in zip(texts, got):
        want = cif_fast.parse_p1_cif(text)
        assert (mine is None) == (want is None)
        if mine is not None:
            fast += 1
            assert all(a.dtype == b.dtype and a.tobytes() == b.tobytes() for a, b in zip(mine, want))
    assert fast > 0.9 * len(texts)


def test_cell_clearly_sound_equals_python():
    """The compiled closed forms give the Python floats' verdict, ZeroDivisionError included (a face
    of zero area with a volume that rounding left above 2e-12: c = 2a)."""
    rng = np.random.default_rng(5)

    def outcome(check, lattice):
        try:
            return check(lattice)
        except ZeroDivisionError:
            return "ZeroDivisionError"

    seen = set()
    for trial in range(6000):
        a, b = (rng.normal(size=3) * 10 ** rng.uniform(-3, 4) for _ in range(2))
        c = 2 * a if trial % 3 == 0 else rng.normal(size=3) * 10 ** rng.uniform(-3, 2)
        lattice = np.array([a, b, c])
        if trial % 50 == 0:
            lattice[int(rng.integers(0, 3)), int(rng.integers(0, 3))] = rng.choice([np.nan, np.inf, 1e300])
        want = outcome(cif_fast._cell_clearly_sound, lattice)
        assert outcome(lambda x: kernels.cell_clearly_sound(x, cif_fast._MIN_THICKNESS), lattice) == want, lattice
        seen.add(want)
    assert seen == {True, False, "ZeroDivisionError"}


def test_cached_angle_terms_give_the_same_lattice():
    rng = np.random.default_rng(6)
    cases = [(4.2, 4.2, 8.3, 90.0, 90.0, 90.0), (3.0, 3.0, 3.0, 60.0, 60.0, 60.0), (3.1, 3.1, 5.0, 90.0, 90.0, 120.0)]
    cases += [tuple(rng.uniform(0.5, 30, 3)) + tuple(rng.uniform(20, 160, 3)) for _ in range(200)]
    first = [cif_fast.lattice_from_parameters(*p).tobytes() for p in cases]
    cif_fast._angle_terms.cache_clear()
    again = [cif_fast.lattice_from_parameters(*p).tobytes() for p in reversed(cases)][::-1]
    assert first == again
    assert cif_fast.lattice_from_parameters(1.0, 2.0, 3.0, 90, 90, -0.0).tobytes() == \
        cif_fast.lattice_from_parameters(1.0, 2.0, 3.0, 90, 90, 0.0).tobytes()  # ±0.0 share a cache key
    with pytest.raises(ValueError):
        cif_fast.lattice_from_parameters(1.0, 2.0, 3.0, 0.0, 90.0, 90.0)


# ------------------------------------------------------------------------------------- validate
def clear_by_minimum_image_numpy(record: CrystalRecord) -> bool:
    """validate._clear_by_minimum_image as it was in numpy (the reference of the kernel)."""
    import math

    if record.num_atoms > validate_module._PREFILTER_MAX_ATOMS:
        return False
    cutoff = validate_module.MIN_DISTANCE + validate_module._PREFILTER_MARGIN
    a, b, c = record.lattice.tolist()

    def cross(u, v):
        return (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])

    crosses = (cross(b, c), cross(c, a), cross(a, b))
    volume = abs(a[0] * crosses[0][0] + a[1] * crosses[0][1] + a[2] * crosses[0][2])
    reach = [cutoff * math.sqrt(x * x + y * y + z * z) / (volume or 1.0) for x, y, z in crosses]
    if not volume or max(reach) >= 0.5:
        return False
    n = record.num_atoms
    if n == 1:
        return True
    frac = record.frac_coords
    delta = frac[None, :, :] - frac[:, None, :]
    delta -= np.rint(delta)
    near = (np.abs(delta) < reach).all(axis=2) & np.triu(np.ones((n, n), dtype=bool), k=1)
    if not near.any():
        return True
    cart = delta[near] @ record.lattice
    return bool((np.einsum("ij,ij->i", cart, cart) >= cutoff * cutoff).all())


def verdict_numpy(record: CrystalRecord):
    """validate as it was: every check in numpy, in order."""
    try:
        validate_module._check_atoms(record)
        validate_module._check_finite(record)
        validate_module._check_labels(record)
        validate_module._check_lattice(record)
        if not clear_by_minimum_image_numpy(record):
            validate_module._check_distances(record)
    except RecordError as error:
        return str(error)
    return None


def verdict(record: CrystalRecord):
    try:
        validate(record)
    except RecordError as error:
        return str(error)
    return None


def odd_records(rng: np.random.Generator):
    """Records at and across every structure check's limit, and with bad labels."""
    cube = np.eye(3) * 4.0
    yield CrystalRecord(key="o:empty", source="o", atomic_numbers=np.zeros(0, dtype=int), frac_coords=np.zeros((0, 3)), lattice=cube)
    for z in (0, 1, 100, 101, -3):
        yield CrystalRecord(key=f"o:z{z}", source="o", atomic_numbers=[z, 8], frac_coords=[[0, 0, 0], [0.5, 0.5, 0.5]], lattice=cube)
    for bad in (np.nan, np.inf, -np.inf):
        yield CrystalRecord(key="o:frac", source="o", atomic_numbers=[8, 8], frac_coords=[[0, bad, 0], [0.5, 0.5, 0.5]], lattice=cube)
        lattice = cube.copy()
        lattice[1, 2] = bad
        yield CrystalRecord(key="o:lat", source="o", atomic_numbers=[8], frac_coords=[[0, 0, 0]], lattice=lattice)
    for length in (0.0, 1e-4, 9.99e-4, 1e-3, 1.001e-3, 2e-3, 2.1e-3):  # a vector about MIN_VECTOR_LENGTH long
        yield CrystalRecord(key=f"o:len{length}", source="o", atomic_numbers=[8], frac_coords=[[0, 0, 0]],
                            lattice=np.diag([4.0, 4.0, length]))
    for angle in (1e-6, 0.05, 0.0573, 0.0574, 0.06, 0.1, 0.115, 0.2, 1.0):  # |det| / |a||b||c| about 1e-3
        t = np.radians(angle)
        yield CrystalRecord(key=f"o:flat{angle}", source="o", atomic_numbers=[8], frac_coords=[[0, 0, 0]],
                            lattice=[[40.0, 0, 0], [0, 40.0, 0], [40.0 * np.cos(t), 0, 40.0 * np.sin(t)]])
    for per_atom in (0.05, 0.1, 0.1000001, 0.15, 0.2, 0.2000001, 0.3):  # volume per atom about 0.1
        side = (2 * per_atom) ** (1 / 3)
        yield CrystalRecord(key=f"o:vol{per_atom}", source="o", atomic_numbers=[1, 1], frac_coords=[[0, 0, 0], [0.5, 0.5, 0.5]],
                            lattice=np.eye(3) * side)
    yield CrystalRecord(key="o:huge", source="o", atomic_numbers=[8, 8], frac_coords=[[0, 0, 0], [0.5, 0.5, 0.5]],
                        lattice=np.eye(3) * 1e200)
    for name, value in (("energy", np.nan), ("band_gap", "1.0"), ("forces", np.full((2, 3), np.inf)), ("stress", np.zeros((2, 2)))):
        yield CrystalRecord(key=f"o:{name}", source="o", atomic_numbers=[8, 8], frac_coords=[[0, 0, 0], [0.5, 0.5, 0.5]],
                            lattice=cube, **{name: value})
    for _ in range(300):  # random cells, some sheared flat, some with an atom on top of another
        n = int(rng.integers(1, 8))
        lattice = rng.normal(size=(3, 3)) * rng.choice([0.01, 0.3, 3.0, 30.0])
        frac = rng.random((n, 3))
        if n > 1 and rng.random() < 0.3:
            frac[1] = frac[0] + rng.normal(size=3) * 1e-3
        yield CrystalRecord(key="o:random", source="o", atomic_numbers=rng.integers(1, 101, n), frac_coords=frac, lattice=lattice)


def test_validate_gives_the_numpy_checks_reasons():
    rng = np.random.default_rng(2)
    plain = 0
    for record in list(odd_records(rng)) + list(random_cells(2000)):
        assert verdict(record) == verdict_numpy(record), record.key
        if validate_module._structure_is_plain(record):
            plain += 1
            for check in (validate_module._check_atoms, validate_module._check_finite, validate_module._check_lattice):
                check(record)  # never raises where the kernel says the checks pass
        assert validate_module._clear_by_minimum_image(record) == clear_by_minimum_image_numpy(record), record.key
    assert plain > 1000


def test_validate_equals_the_numpy_checks_on_real_records(mp20_records):
    cleared = 0
    for record in mp20_records:
        assert verdict(record) == verdict_numpy(record), record.key
        assert validate_module._structure_is_plain(record), record.key
        mine = validate_module._clear_by_minimum_image(record)
        assert mine == clear_by_minimum_image_numpy(record), record.key
        cleared += mine
    assert cleared > 0.95 * len(mp20_records)


# ---------------------------------------------------------------------------------- fingerprint
def test_exact_fingerprint_equals_numpy_bit_for_bit():
    rng = np.random.default_rng(3)
    records = []
    for trial in range(600):
        n = int(rng.choice([1, 2, 5, 12, 40, 257]))
        numbers = rng.integers(1, 4, n)  # few elements: many ties in Z, decided by x, y, z
        frac = rng.choice([0.0, -0.0, 0.25, 0.5, 0.999999, 0.9999951, -1e-7, 1.0, 1.5], (n, 3))
        if trial % 2:
            frac = rng.integers(-200000, 200000, (n, 3)) / 100000 + 5e-6 * rng.choice([0, 1], (n, 3))  # halves of the 5th decimal
        lattice = rng.normal(size=(3, 3)) * 5
        lattice[rng.random((3, 3)) < 0.3] = -0.0
        lattice[0, 0] = rng.choice([1.00005, -0.00004, 2.5])  # rounding ties, -0.0 after rounding
        records.append(CrystalRecord(key="f:r", source="f", atomic_numbers=numbers, frac_coords=frac, lattice=lattice))
    for record in records:
        assert exact_fingerprint(record) == _exact_fingerprint_numpy(record, 4, 5)
        assert exact_fingerprint(record, 2, 3) == _exact_fingerprint_numpy(record, 2, 3)
        assert exact_fingerprint(record, 0, 0) == _exact_fingerprint_numpy(record, 0, 0)
    odd = records[0].replace(frac_coords=np.full_like(records[0].frac_coords, np.nan))
    assert exact_fingerprint(odd) == _exact_fingerprint_numpy(odd, 4, 5)  # NaN: the numpy path itself


# ------------------------------------------------------------------------------- record, labels
def test_record_wrap_needs_no_third_step():
    """CrystalRecord wraps with two np.mod calls; the `>= 1.0 → 0.0` step that followed never fired."""
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.normal(size=5000) * 10 ** rng.uniform(-20, 3, 5000),
                             [0.0, -0.0, 1.0, -1.0, 1e-17, -1e-17, -1e-300, -5e-324, 0.9999999999999999, 1e16, -1e16]])
    record = CrystalRecord(key="w:w", source="w", atomic_numbers=np.ones(len(values), dtype=int),
                           frac_coords=np.repeat(values, 3).reshape(-1, 3), lattice=np.eye(3))
    three_steps = np.mod(np.mod(np.repeat(values, 3).reshape(-1, 3), 1.0), 1.0)
    three_steps[three_steps >= 1.0] = 0.0
    assert record.frac_coords.tobytes() == three_steps.tobytes()
    assert (record.frac_coords >= 0).all() and (record.frac_coords < 1).all()


@pytest.mark.parametrize("text", ["", " ", "nan", " NaN ", "None", "null", "NA", "n/a", "1.5", " -2e-3 ", "inf", "-Infinity",
                                  "1_000", "0x10", "True", "['Ce', 'Se']", "CeSe2", "١٢", "1,5", "+.5", "iNf", "Infinity", "NaNa", "Nb2O5",
                                  "e5", "_1", "\u00a01.5", "１.５", None])
def test_free_columns_read_as_csv_float_reads_them(text):
    try:
        want = csv_float(text, "x")
    except RecordError:
        want = None
    assert repr(_number_or_none(text)) == repr(want)
    if text is not None:
        labels = map_labels({"spacegroup.number": text, "band_gap": "0.5"})
        assert labels["properties"] == ({} if want is None else {"spacegroup.number": want})


def test_reduced_formula_unchanged():
    from collections import Counter
    from functools import reduce
    import math

    from data_pipeline.record import element_symbol, reduced_formula

    def reference(numbers):
        counts = Counter(np.asarray(numbers).tolist())
        if not counts:
            return ""
        divisor = reduce(math.gcd, counts.values())
        parts = sorted((element_symbol(z), c // divisor) for z, c in counts.items())
        return "".join(sym if n == 1 else f"{sym}{n}" for sym, n in parts)

    rng = np.random.default_rng(7)
    cases = [np.zeros(0, dtype=np.int64), np.array([8]), np.array([26, 26, 8, 8, 8]), np.array([3, 8] * 4), np.array([150, 150])]
    cases += [rng.integers(1, 120, int(rng.integers(1, 40))) for _ in range(500)]
    for numbers in cases:
        assert reduced_formula(numbers) == reference(numbers)


# ------------------------------------------------------------------------------- the task itself
def parse_chunk_per_record(source, items, path, digest, pdd_k=None, shape_matcher=None):
    """build.parse_chunk as it was: each record through parse, validate, encode and its facts, then the next."""
    from data_pipeline.build import stages
    from data_pipeline.build.readers import Reject
    from data_pipeline.build.shard_writer import BlobWriter
    from data_pipeline.record import with_pdd
    from data_pipeline.shard_format import encode_record

    reader = stages._worker_reader(source)
    out_items = []
    with BlobWriter(f"{path}.bin") as blob:
        for item in items:
            if isinstance(item, Reject):
                out_items.append(["reject", item.key, item.source, item.location, item.reason])
                continue
            try:
                record = reader.parse(item)
                if item.group and record.group == record.key:
                    record.group = item.group
                validate(record)
                if pdd_k is not None:
                    record = with_pdd(record, pdd_k)
                sample = encode_record(record)
            except RecordError as exc:
                out_items.append(["reject", item.key, item.source, item.location, str(exc)])
                continue
            except ValueError as exc:
                reason = f"non_finite: {exc}" if "non-finite" in str(exc) else f"unparsable: {type(exc).__name__}: {exc}"
                out_items.append(["reject", item.key, item.source, item.location, reason])
                continue
            except Exception as exc:  # noqa: BLE001
                out_items.append(["reject", item.key, item.source, item.location, f"unparsable: {type(exc).__name__}: {exc}"])
                continue
            facts = stages._record_facts(record, shape_matcher)
            json_ref, arrays_ref = blob.write(sample["json"]), blob.write(sample["safetensors"])
            out_items.append(["record", sample["__key__"], *facts, *json_ref, *arrays_ref])
        blob.close()
    return {"version": stages.CHUNK_INDEX_VERSION, "digest": digest, "source": source["name"], "items": out_items}


@pytest.mark.parametrize("options", [{}, {"shape_matcher": {}}, {"pdd_k": 4}], ids=["plain", "shapes", "pdd"])
def test_parse_chunk_stage_by_stage_equals_record_by_record(tmp_path, options):
    """The same chunk index and chunk bytes, with a reject at every stage: a scan reject, a parse
    RecordError, a parse ValueError (a lattice of the wrong shape), validation (overlapping atoms,
    a NaN energy) and good records around them."""
    import sys
    from dataclasses import asdict
    from pathlib import Path

    from data_pipeline.build import stages
    from data_pipeline.build.config import MatcherConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from build_fixture_readers import KIND, crafted_rows, write_jsonl  # noqa: E402

    rows = crafted_rows()
    cube = [[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]]
    rows += [
        {"id": "flat", "numbers": [8], "frac": [[0, 0, 0]], "lattice": [[3.0, 0, 0], [0, 3.0, 0]]},  # ValueError in parse
        {"id": "close", "numbers": [8, 8], "frac": [[0, 0, 0], [0.01, 0, 0]], "lattice": cube},
        {"id": "nan", "numbers": [8], "frac": [[0, 0, 0]], "lattice": cube, "energy_per_atom": float("nan")},
        {"id": "ok", "numbers": [8, 1], "frac": [[0, 0, 0], [0.5, 0.5, 0.5]], "lattice": cube, "energy_per_atom": -1.0},
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with open(path, "a") as handle:
        handle.write("{not json\n")  # a scan Reject
    source = {"kind": KIND, "path": str(path), "options": {}, "name": "jsonl"}
    items = list(stages._worker_reader(source).scan())
    if "shape_matcher" in options:
        options = {"shape_matcher": asdict(MatcherConfig())}
    want = parse_chunk_per_record(source, items, str(tmp_path / "old"), "d", **options)
    got = stages.parse_chunk(source, items, str(tmp_path / "new"), "d", **options)
    assert got == want
    assert (tmp_path / "new.bin").read_bytes() == (tmp_path / "old.bin").read_bytes()
    codes = [item[4].split(":")[0] for item in got["items"] if item[0] == "reject"]
    assert codes == ["missing_field", "unparsable", "atoms_too_close", "non_finite", "unparsable"], codes
