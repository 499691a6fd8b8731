"""The crystal record contract: wrapping, conversions to/from pymatgen and ASE, the lattice polar
factor, and the shard sample encoding (deterministic, pickle-free, lossless)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from data_pipeline.record import CrystalRecord, lattice_polar6, polar6_to_matrix
from data_pipeline.shard_format import ShardFormatError, decode_sample, encode_record, sample_name


def _nacl(**labels):
    a = 5.64
    return CrystalRecord(
        key="test:nacl",
        source="test",
        atomic_numbers=[11, 17],
        frac_coords=[[0.0, 0.0, 0.0], [1.5, -0.5, 0.5]],  # deliberately unwrapped
        lattice=np.array([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]]),
        **labels,
    )


def test_frac_coords_are_wrapped_into_unit_interval():
    record = _nacl()
    assert np.all(record.frac_coords >= 0) and np.all(record.frac_coords < 1)
    np.testing.assert_allclose(record.frac_coords[1], [0.5, 0.5, 0.5])
    tiny = CrystalRecord("t:x", "t", [1], [[-1e-18, 1 - 1e-17, 0.0]], np.eye(3))
    assert np.all(tiny.frac_coords < 1.0) and np.all(tiny.frac_coords >= 0.0)


def test_pymatgen_round_trip_keeps_structure_and_forces():
    forces = np.array([[0.1, 0.2, 0.3], [-0.1, -0.2, -0.3]])
    record = _nacl(forces=forces, energy_per_atom=-3.4)
    structure = record.to_structure()
    assert structure.composition.reduced_formula == "NaCl"
    back = CrystalRecord.from_structure(structure, key=record.key, source="test", energy_per_atom=-3.4)
    np.testing.assert_array_equal(back.atomic_numbers, record.atomic_numbers)
    np.testing.assert_allclose(back.frac_coords, record.frac_coords, atol=1e-12)
    np.testing.assert_allclose(back.lattice, record.lattice)
    np.testing.assert_allclose(back.forces, forces)


def test_ase_round_trip():
    record = _nacl(magmoms=np.array([0.5, 0.0]), band_gap=5.0)
    atoms = record.to_ase()
    assert atoms.info["band_gap"] == 5.0 and atoms.pbc.all()
    back = CrystalRecord.from_ase(atoms, key=record.key, source="test")
    np.testing.assert_allclose(back.cart_coords, record.cart_coords, atol=1e-10)
    np.testing.assert_allclose(back.lattice, record.lattice)


def test_disordered_structures_are_refused():
    from pymatgen.core import Lattice, Structure

    structure = Structure(Lattice.cubic(4.0), [{"Fe": 0.5, "Co": 0.5}], [[0, 0, 0]])
    with pytest.raises(ValueError, match="disordered"):
        CrystalRecord.from_structure(structure, key="t:dis", source="t")


def test_polar_factor_is_rotation_invariant_and_reconstructs_the_gram_matrix():
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    lattice = rng.normal(size=(3, 3)) + 4 * np.eye(3)
    rotation = Rotation.random(random_state=1).as_matrix()
    p = lattice_polar6(lattice)
    np.testing.assert_allclose(lattice_polar6(lattice @ rotation.T), p, atol=1e-10)
    s = polar6_to_matrix(p)
    np.testing.assert_allclose(s @ s, lattice @ lattice.T, atol=1e-10)  # S² = L Lᵀ


def test_shard_encoding_round_trips_and_is_deterministic():
    record = _nacl(
        forces=np.ones((2, 3)) * 0.25,
        stress=np.eye(3),
        energy=-6.8,
        formation_energy_per_atom=-2.1,
        properties={"heat_ref": 0.3},
    )
    sample = encode_record(record)
    assert sample == encode_record(record)  # same record → same bytes
    back = decode_sample(sample)
    assert back.key == record.key and back.properties == {"heat_ref": 0.3}
    assert back.energy == -6.8 and back.formation_energy_per_atom == -2.1 and back.band_gap is None
    for name in ("atomic_numbers", "frac_coords", "lattice", "forces", "stress"):
        np.testing.assert_array_equal(getattr(back, name), getattr(record, name))


def test_sample_names_are_safe_for_webdataset():
    name = sample_name("mptrj:mp-1234:mp-1234-0-5.x/y")
    assert "." not in name and "/" not in name
    assert name.startswith("mptrj:mp-1234:")


def test_shard_decoding_names_the_bad_sample():
    sample = encode_record(_nacl())
    del sample["safetensors"]
    with pytest.raises(ShardFormatError, match="test:nacl|missing member"):
        decode_sample(sample)
    sample = encode_record(_nacl())
    sample["json"] = b"{not json"
    with pytest.raises(ShardFormatError, match="cannot decode"):
        decode_sample(sample)


def test_non_finite_labels_are_not_encoded():
    with pytest.raises(ValueError, match="non-finite"):
        encode_record(_nacl(energy=float("nan")))


def test_a_shard_never_needs_pickle(tmp_path):
    """Members are JSON and safetensors only: nothing in a tar can execute code when read."""
    sample = encode_record(_nacl())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for ext in ("json", "safetensors"):
            data = sample[ext]
            info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        names = tar.getnames()
    assert all(n.endswith((".json", ".safetensors")) for n in names)
