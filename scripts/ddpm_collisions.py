"""Why generated crystals fail structural validity: for each crystal with two atoms ≤ 0.5 Å apart,
is the closest pair an atom and its own periodic image (a cell edge too short), a pair across the
cell boundary (image shift ≠ 0: frac ≈ 0 and ≈ 1, which the DDPM's token 2·frac − 1 puts at −1 and
+1, as far apart as it can be), or a pair inside the cell? Chance level: the same crystals (cells
and atom counts) with uniformly random positions, 20 draws each, counted the same way.

    python scripts/ddpm_collisions.py SAMPLES_DIR [SAMPLES_DIR ...]
"""
from __future__ import annotations

import json
import sys

import numpy as np


def closest_pair(record):
    from data_pipeline.load.neighbors import NeighborRule, compute_neighbors

    nl = compute_neighbors(record.frac_coords, record.lattice, NeighborRule(kind="radius", cutoff=1.0))
    if not len(nl.distance):
        return None
    i = int(np.argmin(nl.distance))
    return int(nl.src[i]), int(nl.dst[i]), nl.shift[i], float(nl.distance[i])


def main() -> None:
    from discovery.references import load_crystals

    counts = {"crystals": 0, "invalid": 0, "self_image": 0, "across_boundary": 0, "inside_cell": 0}
    boundary_coords = 0
    for path in sys.argv[1:]:
        for record in load_crystals(path):
            counts["crystals"] += 1
            pair = closest_pair(record)
            if pair is None or pair[3] > 0.5:
                continue
            counts["invalid"] += 1
            src, dst, shift, _ = pair
            if src == dst:
                counts["self_image"] += 1
            elif np.any(shift != 0):
                counts["across_boundary"] += 1
                f = record.frac_coords[[src, dst]] % 1.0
                boundary_coords += int(np.any((f < 0.05) | (f > 0.95)))
            else:
                counts["inside_cell"] += 1
    counts["across_boundary_with_a_coordinate_within_0.05_of_a_face"] = boundary_coords
    # chance: uniform positions in the same cells
    from data_pipeline.record import CrystalRecord

    rng = np.random.default_rng(0)
    chance = {"collisions": 0, "across_boundary": 0, "self_image": 0}
    for path in sys.argv[1:]:
        for record in load_crystals(path):
            for _ in range(20):
                fake = CrystalRecord(record.key, record.source, record.atomic_numbers,
                                     rng.random((record.num_atoms, 3)), record.lattice)
                pair = closest_pair(fake)
                if pair is None or pair[3] > 0.5:
                    continue
                chance["collisions"] += 1
                if pair[0] == pair[1]:
                    chance["self_image"] += 1
                elif np.any(pair[2] != 0):
                    chance["across_boundary"] += 1
    counts["chance_uniform_positions"] = chance
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
