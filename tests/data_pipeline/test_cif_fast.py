"""The gemmi CIF path must give pymatgen's structures exactly; everything else must fall back."""
from __future__ import annotations

import csv
import gzip
import multiprocessing
import random
import re

import numpy as np
import pytest

from data_pipeline.build.cif_fast import parse_cif_pymatgen, parse_p1_cif
from data_pipeline.build.readers._common import arrays_from_cif, arrays_from_structure
from data_pipeline.build.readers.base import RecordError
from data_pipeline.record import CrystalRecord
from data_pipeline.build.validate import validate

CSV_FILES = ["mp_20/train.csv.gz", "mp_20/val.csv.gz", "perov_5/val.csv", "carbon_24/val.csv", "mpts_52/val.csv.gz"]


def all_shared_cifs(shared_data) -> list[tuple[str, str]]:
    cifs = []
    for name in CSV_FILES:
        path = shared_data / name
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", newline="") as handle:
            for row in csv.DictReader(handle):
                cifs.append((f"{name}:{row['material_id']}", row["cif"]))
    for path in sorted((shared_data / "gnome" / "by_id").glob("*.CIF")):
        cifs.append((f"gnome/{path.name}", path.read_text()))
    return cifs


def compare(item: tuple[str, str]) -> tuple[str, str | None]:
    """(label, None when both paths agree | 'fallback' | a description of the difference)."""
    label, text = item
    fast = parse_p1_cif(text)
    if fast is None:
        return label, "fallback"
    structure = parse_cif_pymatgen(text)
    z, frac, lattice = arrays_from_structure(structure)
    if not np.array_equal(fast[0], z):
        return label, f"Z order {fast[0].tolist()} != {z.tolist()}"
    d = fast[1] - frac
    if np.abs(d - np.round(d)).max() > 1e-6:
        return label, f"frac coords differ by {np.abs(d - np.round(d)).max():.2e}"
    if np.abs(fast[2] - lattice).max() > 1e-6:
        return label, f"lattice differs by {np.abs(fast[2] - lattice).max():.2e}"
    try:
        validate(CrystalRecord(key=label, source="t", atomic_numbers=fast[0], frac_coords=fast[1], lattice=fast[2]))
    except RecordError as error:
        return label, f"invalid: {error}"
    return label, None


@pytest.mark.slow
def test_fast_path_equals_pymatgen_on_every_shared_cif(shared_data):
    cifs = all_shared_cifs(shared_data)
    assert len(cifs) == 1847 + 7344 + 3787 + 2032 + 5000 + 1000
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(compare, cifs, chunksize=200)
    fallbacks = [label for label, outcome in results if outcome == "fallback"]
    different = [(label, outcome) for label, outcome in results if outcome not in (None, "fallback")]
    assert not different, different[:10]
    assert len(fallbacks) <= len(cifs) // 200, fallbacks[:10]  # the fast path serves >99.5% of them


# ------------------------------------------------------------------------------- unit cases
@pytest.fixture(scope="module")
def mp20_cifs(shared_data):
    with gzip.open(shared_data / "mp_20" / "val.csv.gz", "rt", newline="") as handle:
        return [row["cif"] for _, row in zip(range(40), csv.DictReader(handle))]


def same_as_pymatgen(text: str) -> None:
    z, frac, lattice = arrays_from_cif(text, fast=True)
    z_ref, frac_ref, lattice_ref = arrays_from_structure(parse_cif_pymatgen(text))
    np.testing.assert_array_equal(z, z_ref)
    d = frac - frac_ref
    np.testing.assert_allclose(d - np.round(d), 0, atol=1e-6)
    np.testing.assert_allclose(lattice, lattice_ref, atol=1e-6)


def shuffled_sites(text: str, seed: int) -> str:
    lines = text.rstrip("\n").split("\n")
    start = max(i for i, line in enumerate(lines) if line.strip().startswith("_atom_site_")) + 1
    sites = lines[start:]
    random.Random(seed).shuffle(sites)
    return "\n".join(lines[:start] + sites) + "\n"


def test_site_order_follows_pymatgen_whatever_the_file_order(mp20_cifs):
    for seed, text in enumerate(mp20_cifs):
        shuffled = shuffled_sites(text, seed)
        assert parse_p1_cif(shuffled) is not None
        same_as_pymatgen(shuffled)


def test_special_fractions_are_snapped_like_pymatgen(mp20_cifs):
    text = mp20_cifs[0].replace("0.00000000  0.50000000  0.73160200", "0.33331000  0.66669000  0.73160200")
    numbers, frac, _ = parse_p1_cif(text)
    assert 1 / 3 in frac and 2 / 3 in frac
    same_as_pymatgen(text)


def symmetric_cif() -> str:
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    salt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return str(CifWriter(salt, symprec=0.01))


@pytest.mark.parametrize(
    "case",
    ["symmetry", "partial", "oxidation", "noble_gas", "two_blocks", "merged_sites", "no_type_symbol", "garbage"],
)
def test_fallback_cases(mp20_cifs, case):
    text = mp20_cifs[0]  # CeSe2, P1, 6 sites
    if case == "symmetry":
        text = symmetric_cif()
    elif case == "partial":
        text = text.replace("0.00000000  0.00000000  0.00000000  1", "0.00000000  0.00000000  0.00000000  0.5")
    elif case == "oxidation":
        text = text.replace("  Ce  Ce0", "  Ce3+  Ce0")
    elif case == "noble_gas":
        text = text.replace("  Ce  Ce0", "  Xe  Xe0").replace("  Ce  Ce1", "  Ar  Ar1")
    elif case == "two_blocks":
        text = text + text.replace("data_CeSe2", "data_again")
    elif case == "merged_sites":
        text = text.replace("0.50000000  0.50000000  0.00000000", "0.00000000  0.00000000  0.00005000")
    elif case == "no_type_symbol":
        text = text.replace(" _atom_site_type_symbol\n", "").replace("  Ce  Ce", "  Ce").replace("  Se  Se", "  Se")
    elif case == "garbage":
        text = "data_x\n_cell_length_a 3\n"
    assert parse_p1_cif(text) is None
    if case in ("symmetry", "oxidation", "noble_gas", "two_blocks", "no_type_symbol"):
        same_as_pymatgen(text)  # the fallback gives pymatgen's answer
    elif case == "partial":
        with pytest.raises(RecordError, match="^disordered: "):
            arrays_from_cif(text)
    elif case == "garbage":
        with pytest.raises(RecordError, match="^unparsable: "):
            arrays_from_cif(text)
    elif case == "merged_sites":
        with pytest.raises(RecordError, match="^disordered: "):  # pymatgen merges them into one mixed site
            arrays_from_cif(text)


def test_fast_path_can_be_disabled(mp20_cifs, monkeypatch):
    import data_pipeline.build.readers._common as common

    monkeypatch.setattr(common, "parse_p1_cif", lambda text: pytest.fail("fast path used"))
    arrays_from_cif(mp20_cifs[1], fast=False)


# ------------------------------------------------------- the fast path's shortcuts change no bit
def test_other_spellings_of_the_same_sites_give_the_same_arrays(mp20_cifs):
    """The loop's values are read as one list (`_columns`): quoted symbols, tags in another case
    and order, uncertainties, and key-value pairs instead of a loop read as gemmi reads them."""
    text = mp20_cifs[0]  # CeSe2: Ce0 at 0 1/2 0.731602
    reference = parse_p1_cif(text)
    header = " _atom_site_type_symbol\n _atom_site_label\n"
    variants = {
        "quoted": text.replace("  Ce  Ce0", "  'Ce'  Ce0").replace("  Se  Se2", '  "Se"  Se2'),
        "tag case": text.replace(header, " _atom_site_Type_Symbol\n _atom_site_LABEL\n"),
        "tag order": re.sub(r"(?m)^  ([A-Z][a-z]?)  (\w+)  1", r"  \2  \1  1",
                            text.replace(header, " _atom_site_label\n _atom_site_type_symbol\n")),
        "uncertainty": text.replace("0.73160200", "0.73160200(3)"),
    }
    for name, variant in variants.items():
        parsed = parse_p1_cif(variant)
        assert parsed is not None, name
        for got, want in zip(parsed, reference):
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
    one_site = ("data_x\n_symmetry_equiv_pos_as_xyz 'x, y, z'\n" + "".join(
        f"_cell_length_{t} 4.2\n_cell_angle_{a} 90\n" for t, a in zip("abc", ("alpha", "beta", "gamma"))))
    as_loop = one_site + "loop_\n_atom_site_type_symbol\n_atom_site_label\n_atom_site_fract_x\n" \
        "_atom_site_fract_y\n_atom_site_fract_z\nFe Fe1 0.1 0.6666 -0.25\n"
    as_pairs = one_site + "_atom_site_type_symbol Fe\n_atom_site_label Fe1\n_atom_site_fract_x 0.1\n" \
        "_atom_site_fract_y 0.6666\n_atom_site_fract_z -0.25\n"
    for got, want in zip(parse_p1_cif(as_pairs), parse_p1_cif(as_loop)):
        assert got.tobytes() == want.tobytes()
    assert parse_p1_cif(text.replace("0.73160200", "?")) is None  # a missing coordinate: pymatgen decides


def _lattice_reference(a, b, c, alpha, beta, gamma):
    """lattice_from_parameters as it was: numpy float64 scalars all the way (pymatgen's code)."""
    angles_r = np.radians([alpha, beta, gamma])
    cos_alpha, cos_beta, cos_gamma = np.cos(angles_r)
    sin_alpha, sin_beta, _ = np.sin(angles_r)
    val = np.clip((cos_alpha * cos_beta - cos_gamma) / (sin_alpha * sin_beta), -1, 1)
    gamma_star = np.arccos(val)
    return np.array([[a * sin_beta, 0.0, a * cos_beta],
                     [-b * sin_alpha * np.cos(gamma_star), b * sin_alpha * np.sin(gamma_star), b * cos_alpha],
                     [0.0, 0.0, float(c)]])


def _sound_reference(lattice) -> bool:
    det = float(np.linalg.det(lattice))
    if not np.isfinite(det) or abs(det) < 1e-12:
        return False
    return not (1.0 / np.linalg.norm(np.linalg.inv(lattice).T, axis=1) < 0.01).any()


def test_lattice_and_cell_checks_match_numpy_bit_for_bit():
    from data_pipeline.build.cif_fast import _cell_is_sound, lattice_from_parameters

    rng = np.random.default_rng(0)
    cases = [(4.2, 4.2, 8.3, 90, 90, 90), (3, 3, 3, 60, 60, 60), (5, 6, 7, 89.9, 120, 45.5), (1, 1, 1, 120, 120, 120)]
    cases += [tuple(rng.uniform(0.5, 30, 3)) + tuple(rng.uniform(20, 160, 3)) for _ in range(2000)]
    # near and across the limits: 0.01 Å thickness, |det| 1e-12, flat angle sums, huge lengths
    cases += [(4, 4, c, 90, 90, 90) for c in (0.0099, 0.00999999999, 0.01, 0.0100000001, 0.02, 0.019999, 1e-13, 1e-12, 2e-12)]
    cases += [(4, 4, 4, 90, 90, 179.99), (4, 4, 4, 120, 120, 120), (4, 4, 4, 60, 60, 119.99999), (1e7, 1, 1, 90, 90, 90),
              (4, 4, 4, 0.001, 90, 90), (1e300, 1e300, 1e300, 90, 90, 90)]
    for params in cases:
        lattice = lattice_from_parameters(*params)
        assert lattice.tobytes() == _lattice_reference(*params).tobytes(), params
        assert _cell_is_sound(lattice) == _sound_reference(lattice), params
