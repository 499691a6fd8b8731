"""Every reject code from hand-made bad records; good real records pass."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import data_pipeline.build.validate as validate_module
from data_pipeline.build.readers.base import RecordError
from data_pipeline.record import CrystalRecord
from data_pipeline.build.validate import REJECT_CODES, as_float, reason_code, reject, validate


def rock_salt(**changes) -> CrystalRecord:
    fields = dict(
        key="test:nacl",
        source="test",
        atomic_numbers=[11, 17],
        frac_coords=[[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]],
        lattice=np.array([[0.0, 2.8, 2.8], [2.8, 0.0, 2.8], [2.8, 2.8, 0.0]]),
        energy=-6.9,
        energy_per_atom=-3.45,
        forces=np.zeros((2, 3)),
        stress=np.zeros((3, 3)),
        magmoms=np.zeros(2),
    )
    fields.update(changes)
    return CrystalRecord(**fields)


def code_of(record: CrystalRecord) -> str:
    with pytest.raises(RecordError) as info:
        validate(record)
    reason = str(info.value)
    assert ": " in reason and reason.split(":")[0] in REJECT_CODES, reason
    return reason_code(reason)


def test_good_records_pass(mp20_records):
    validate(rock_salt())
    for record in mp20_records:
        validate(record)


@pytest.mark.parametrize(
    "changes, code",
    [
        (dict(atomic_numbers=[], frac_coords=np.zeros((0, 3)), forces=None, magmoms=None), "empty"),
        (dict(atomic_numbers=[11, 101]), "unknown_element"),
        (dict(atomic_numbers=[0, 17]), "unknown_element"),
        (dict(frac_coords=[[0.0, 0.0, np.nan], [0.5, 0.5, 0.5]]), "non_finite"),
        (dict(lattice=np.diag([5.0, 5.0, np.inf])), "non_finite"),
        (dict(energy=float("nan")), "non_finite"),
        (dict(forces=np.array([[0.0, 0.0, np.inf], [0.0, 0.0, 0.0]])), "non_finite"),
        (dict(properties={"gap": float("-inf")}), "non_finite"),
        (dict(energy="-6.9"), "bad_label_type"),
        (dict(properties={"gap": "1.2"}), "bad_label_type"),
        (dict(energy=True), "bad_label_type"),
        (dict(forces=np.zeros((3, 3))), "label_shape"),
        (dict(stress=np.zeros(6)), "label_shape"),
        (dict(magmoms=np.zeros(3)), "label_shape"),
        (dict(lattice=np.array([[3.0, 0, 0], [6.0, 0, 0], [0, 0, 3.0]])), "degenerate_lattice"),
        (dict(lattice=np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 0]])), "degenerate_lattice"),
        (dict(lattice=np.diag([0.5, 0.5, 0.5])), "volume_too_small"),  # 0.0625 Å³/atom
        (dict(frac_coords=[[0.0, 0.0, 0.0], [0.01, 0.0, 0.0]]), "atoms_too_close"),
        (dict(frac_coords=[[0.0, 0.0, 0.0], [0.99, 0.999, 0.995]]), "atoms_too_close"),  # across the boundary
    ],
)
def test_each_code(changes, code):
    assert code_of(rock_salt(**changes)) == code


def test_atom_too_close_to_its_own_image():
    record = CrystalRecord(key="t:one", source="t", atomic_numbers=[6], frac_coords=[[0, 0, 0]],
                           lattice=np.diag([0.45, 8.0, 8.0]))  # 28.8 Å³/atom: only the image is wrong
    assert code_of(record) == "atoms_too_close"


def test_skewed_cell_uses_minimum_image():
    # In a strongly sheared cell every lattice vector is ~4 Å long, yet b - a = (-0.1, 0.3, 0) is only
    # 0.32 Å: each atom sits 0.32 Å from its own image. Only a real periodic search sees it.
    lattice = np.array([[4.0, 0.0, 0.0], [3.9, 0.3, 0.0], [0.0, 0.0, 4.0]])
    record = CrystalRecord(key="t:skew", source="t", atomic_numbers=[6, 6], frac_coords=[[0, 0, 0], [0.0, 0.0, 0.5]],
                           lattice=lattice)
    assert code_of(record) == "atoms_too_close"


def test_reject_codes_are_documented_and_stable():
    doc = validate_module.__doc__
    for code in REJECT_CODES:
        assert f"\n  {code} " in doc, f"{code} missing from the module docstring"
    assert {"unparsable", "truncated_file", "missing_field", "disordered", "empty"} <= set(REJECT_CODES)
    with pytest.raises(KeyError):
        reject("no_such_code", "x")
    assert str(reject("empty", "nothing")) == "empty: nothing"
    assert reason_code("atoms_too_close: 0.1 Å") == "atoms_too_close"
    assert reason_code("something else") == "unparsable"


def test_as_float():
    assert as_float(None, "x") is None
    assert as_float(3, "x") == 3.0
    for bad in ("1.0", [1.0], True, {"a": 1}):
        with pytest.raises(RecordError, match="^bad_label_type: "):
            as_float(bad, "x")


# ------------------------------------------------------------ the cheap distance pass is exact
def verdict(record: CrystalRecord, prefilter: bool) -> str | None:
    """The reject reason (or None) with or without the minimum-image pass in front."""
    try:
        validate(record, distance_prefilter=prefilter)
    except RecordError as error:
        return str(error)
    return None


def random_cells(count: int, seed: int = 0):
    """Sheared, thin and ordinary cells with pairs placed just inside and outside 0.5 Å."""
    rng = np.random.default_rng(seed)
    for n in range(count):
        lattice = np.diag(rng.uniform(0.8, 6.0, 3)) + rng.normal(0.0, 1.5, (3, 3)) * (n % 3 != 0)
        if abs(np.linalg.det(lattice)) < 1.0:
            continue
        atoms = int(rng.integers(1, 12))
        frac = rng.random((atoms, 3))
        if atoms > 1 and n % 2:  # atom 1 at 0.5 Å ± 1e-4 from atom 0, perhaps across a face
            direction = rng.normal(size=3)
            offset = direction / np.linalg.norm(direction) * (MIN_DISTANCE + rng.uniform(-1e-4, 1e-4))
            frac[1] = (frac[0] @ lattice + offset) @ np.linalg.inv(lattice)
        yield CrystalRecord(key=f"t:{n}", source="t", atomic_numbers=np.full(atoms, 6), frac_coords=frac,
                            lattice=lattice)


MIN_DISTANCE = validate_module.MIN_DISTANCE


def test_prefilter_matches_neighbour_search_on_hard_cells():
    cleared = flagged = 0
    for record in random_cells(3000):
        assert verdict(record, True) == verdict(record, False), record.key
        if validate_module._clear_by_minimum_image(record):
            cleared += 1
        elif verdict(record, False) is not None:
            flagged += 1
    assert cleared > 300 and flagged > 300  # both outcomes were exercised


@pytest.mark.slow
def test_prefilter_matches_neighbour_search_on_all_shared_records(shared_data):
    """Every record of every raw layout in ../shared/data (configs/data_shared_all.yaml): the same
    verdict and the same reason with and without the cheap pass, so rejects and shards are unchanged."""
    import yaml

    from data_pipeline.build.readers import open_reader
    from data_pipeline.build.readers.base import Reject

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "data_shared_all.yaml").read_text())
    records = cleared = rejected = distance_checked = 0
    for source in config["sources"]:
        path = source["path"].replace("../shared/data", str(shared_data))
        options = {k: (v.replace("../shared/data", str(shared_data)) if isinstance(v, str) else v)
                   for k, v in source.get("options", {}).items()}
        reader = open_reader(source["kind"], path, **options)
        for entry in reader.scan():
            if isinstance(entry, Reject):
                continue
            try:
                record = reader.parse(entry)
            except RecordError:
                continue
            records += 1
            reference = verdict(record, False)
            assert verdict(record, True) == reference, record.key
            rejected += reference is not None
            if reference is None or reason_code(reference) == "atoms_too_close":  # reached the distance check
                distance_checked += 1
                cleared += validate_module._clear_by_minimum_image(record)
    assert records > 25_000 and rejected >= 1
    assert cleared > 0.95 * distance_checked  # the cheap pass, not the search, decides almost every record
