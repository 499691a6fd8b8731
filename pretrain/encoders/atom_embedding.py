"""The atom embedding of the graph encoders: what an atom's species contributes before any message.

    atom_features: learned   h_Z = E[Z]                                   (a free row per element)
    atom_features: magpie    h_Z = W · f(Z) + b + C[Z],  C initialised to 0

`f(Z)` is the element's 22 Magpie properties (matminer's `MagpieData`: Mendeleev number, row, group,
electronegativity, covalent radius, valence-electron counts, ground-state volume, ... — the same
element knowledge the composition baseline's `ElementProperty("magpie")` starts from), each
standardised over the elements 1..max_z, a missing value set to the mean (0). The reference
PDDFormer and Matformer start from CGCNN's element features for the same reason: an element seen
in a handful of training crystals begins near the elements it resembles instead of at a random
vector, which is what matters when a few hundred labels are all there is. `C` keeps the learned
table's freedom (it starts at zero, so the initial embedding is a function of the properties alone).

Row 0 is the encoders' reserved mask index (the VAE hides species as Z = 0): its properties are all
zero and its learned row `C[0]` becomes the mask embedding.

The property table is a persistent buffer, so a release carries the exact numbers it was trained
with (a later matminer cannot change a released encoder).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

ATOM_FEATURES = ("learned", "magpie")

# The per-element properties of matminer's `ElementProperty.from_preset("magpie")`, in its order.
MAGPIE_PROPERTIES = (
    "Number", "MendeleevNumber", "AtomicWeight", "MeltingT", "Column", "Row", "CovalentRadius",
    "Electronegativity", "NsValence", "NpValence", "NdValence", "NfValence", "NValence",
    "NsUnfilled", "NpUnfilled", "NdUnfilled", "NfUnfilled", "NUnfilled", "GSvolume_pa",
    "GSbandgap", "GSmagmom", "SpaceGroupNumber",
)


@functools.lru_cache(maxsize=4)
def magpie_element_table(max_z: int) -> np.ndarray:
    """[max_z + 1, 22] float32: standardised Magpie properties of Z = 1..max_z; row 0 (mask) all zero."""
    try:
        from matminer.utils.data import MagpieData
    except ImportError as exc:  # matminer is a dependency of crystalfm; this is a broken install
        raise ImportError(
            "atom_features: magpie needs matminer (pip install matminer), or use atom_features: learned"
        ) from exc
    from pymatgen.core.periodic_table import Element

    data = MagpieData()
    raw = np.full((max_z + 1, len(MAGPIE_PROPERTIES)), np.nan)
    for z in range(1, max_z + 1):
        element = Element.from_Z(z)
        for j, name in enumerate(MAGPIE_PROPERTIES):
            raw[z, j] = data.get_elemental_property(element, name)
    known = raw[1:]
    mean = np.nanmean(known, axis=0)
    std = np.nanstd(known, axis=0)
    std[~(std > 0)] = 1.0
    table = (raw - mean) / std
    table[np.isnan(table)] = 0.0  # a missing property reads as the mean
    table[0] = 0.0
    return table.astype(np.float32)


class ElementPropertyEmbedding(nn.Module):
    """h_Z = Linear(f(Z)) + C[Z] with C zero-initialised; see the module docstring.  z: [N] → [N, width]."""

    def __init__(self, max_z: int, width: int):
        super().__init__()
        table = torch.from_numpy(magpie_element_table(max_z))
        self.register_buffer("table", table)  # persistent: releases carry the numbers
        self.project = nn.Linear(table.shape[1], width)
        self.correction = nn.Embedding(max_z + 1, width)
        nn.init.zeros_(self.correction.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        f = self.table.index_select(0, z).to(self.project.weight.dtype)  # [N, 22]
        return self.project(f) + self.correction(z)  # [N, width]


def build_atom_embedding(atom_features: str, max_z: int, width: int) -> nn.Module:
    """The encoder's species embedding. 'learned' is a plain `nn.Embedding` (the state-dict keys of
    releases made before this option existed), 'magpie' an `ElementPropertyEmbedding`."""
    if atom_features == "learned":
        return nn.Embedding(max_z + 1, width)
    if atom_features == "magpie":
        return ElementPropertyEmbedding(max_z, width)
    raise ValueError(f"atom_features must be one of {ATOM_FEATURES}, got {atom_features!r}")
