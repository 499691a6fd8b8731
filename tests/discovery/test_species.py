"""Which species a generator may sample: taken from a shard set's manifest or from crystals."""
from __future__ import annotations

import json

from data_pipeline.manifest import MANIFEST_SCHEMA_VERSION
from discovery.generate import species_of


def test_species_of_a_shard_set_reads_every_split_of_its_manifest(tmp_path):
    manifest = {"schema_version": MANIFEST_SCHEMA_VERSION,
                "statistics": {"train": {"elements": {"Li": {"crystals": 3, "atoms": 5}, "O": {"crystals": 3, "atoms": 9}}},
                               "val": {"elements": {"Fe": {"crystals": 1, "atoms": 2}}}, "all": {}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert species_of(tmp_path) == [3, 8, 26]


def test_species_of_crystals(mp20_records, tmp_path):
    from discovery.generate import write_samples

    write_samples(mp20_records[:5], tmp_path / "samples")
    expected = sorted({int(z) for r in mp20_records[:5] for z in r.atomic_numbers})
    assert species_of(tmp_path / "samples") == expected
