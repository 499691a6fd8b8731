"""The element-property atom embedding (`atom_features: magpie`, pretrain/encoders/atom_embedding.py):
the table matminer gives, an encoder that starts from it, and state dicts that carry it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.load.collate import BatchViews, collate
from data_pipeline.load.neighbors import NeighborRule
from pretrain.encoders.atom_embedding import MAGPIE_PROPERTIES, ElementPropertyEmbedding, magpie_element_table
from pretrain.encoders.base import build_encoder

SMALL = {
    "matformer": {"name": "matformer", "width": 16, "num_layers": 1, "heads": 2, "rbf_bins": 16},
    "pddformer": {"name": "pddformer", "width": 16, "num_layers": 2, "rbf_bins": 16},
}


def test_table_is_standardised_with_mask_row_zero():
    table = magpie_element_table(100)
    assert table.shape == (101, len(MAGPIE_PROPERTIES))
    assert np.isfinite(table).all()
    assert not table[0].any()  # Z = 0 is the mask index: no element knowledge
    np.testing.assert_allclose(table[1:].mean(axis=0), 0.0, atol=0.05)  # missing values set to the mean
    # Mendeleev number and electronegativity order elements chemically: sodium sits nearer potassium
    # than chlorine in property space, which a random embedding would not know.
    na, k, cl = table[11], table[19], table[17]
    assert np.linalg.norm(na - k) < np.linalg.norm(na - cl)
    assert table[8, MAGPIE_PROPERTIES.index("Electronegativity")] > table[11, MAGPIE_PROPERTIES.index("Electronegativity")]


def test_initial_embedding_is_a_function_of_the_properties():
    torch.manual_seed(0)
    emb = ElementPropertyEmbedding(max_z=100, width=8)
    z = torch.tensor([0, 11, 19, 17])
    out = emb(z)
    expected = emb.project(emb.table[z])
    torch.testing.assert_close(out, expected)  # the learned correction starts at zero
    torch.testing.assert_close(out[0], emb.project.bias)  # the mask row: bias + its learned row only
    out.sum().backward()
    assert emb.correction.weight.grad[11].abs().sum() > 0  # but it learns


@pytest.mark.parametrize("key", list(SMALL))
def test_encoder_with_magpie_features_runs_and_round_trips(key, mp20_records):
    torch.manual_seed(0)
    encoder = build_encoder({**SMALL[key], "atom_features": "magpie"}).double().eval()
    views = BatchViews(graph=NeighborRule(**encoder.neighbor_rule), pdd_k=encoder.pdd_k if encoder.needs_pdd else None)
    batch = collate(mp20_records[:8], views, dtype=torch.float64)
    with torch.no_grad():
        h = encoder(batch)
    assert h.shape == (int(batch.num_atoms.sum()), 16) and torch.isfinite(h).all()

    state = encoder.state_dict()
    assert "atom_embedding.table" in state  # a release carries the exact property table
    # A release with a perturbed table keeps its own numbers after loading.
    state["atom_embedding.table"] = state["atom_embedding.table"] * 2.0
    torch.manual_seed(1)
    reloaded = build_encoder({**SMALL[key], "atom_features": "magpie"}).double().eval()
    reloaded.load_state_dict(state)
    torch.testing.assert_close(reloaded.atom_embedding.table, state["atom_embedding.table"])


def test_learned_features_keep_the_old_state_dict_keys():
    encoder = build_encoder(SMALL["matformer"])  # atom_features defaults to 'learned'
    keys = [k for k in encoder.state_dict() if k.startswith("atom_embedding.")]
    assert keys == ["atom_embedding.weight"]  # releases made before the option still load


def test_unknown_atom_features_is_a_clear_error():
    with pytest.raises(ValueError, match="atom_features must be one of"):
        build_encoder({**SMALL["matformer"], "atom_features": "cgcnn"})


def test_release_with_magpie_features_loads_with_its_table(tmp_path, mp20_records):
    """A released VAE whose Matformer starts from element properties: `crystalfm.load` rebuilds the
    same encoder (config `atom_features: magpie`, the table from the state dict) and embeds crystals."""
    import crystalfm
    from pretrain.objectives import build_objective
    from pretrain.release import save_release

    torch.manual_seed(0)
    config = {"name": "vae", "encoder": {**SMALL["matformer"], "atom_features": "magpie"}, "latent_dim": 8}
    objective = build_objective(config)
    release = save_release(objective, config, tmp_path / "release", views=objective.batch_views())

    model = crystalfm.load(release)
    original, loaded = objective.encoder.state_dict(), model.encoder.state_dict()
    assert set(original) == set(loaded)
    for key in original:
        torch.testing.assert_close(loaded[key], original[key], msg=key)
    embeddings = model.embed([mp20_records[0].to_structure(), mp20_records[1].to_structure()])
    assert embeddings.shape == (2, 16) and np.isfinite(embeddings).all()
