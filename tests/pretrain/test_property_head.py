"""The optional auxiliary property head of the VAE and JEPA objectives (pretrain/objectives/property_head.py)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from data_pipeline.load.collate import BatchViews, collate
from pretrain.objectives import LossNorm, build_objective

MATFORMER = {"name": "matformer", "width": 32, "num_layers": 2, "heads": 2}


def _objective(name: str, weight: float):
    torch.manual_seed(0)
    extra = {"embedding": "mean"} if name == "jepa" else {"latent_dim": 16}
    head = {"label": "formation_energy_per_atom", "weight": weight}
    return build_objective({"name": name, "encoder": MATFORMER, "property_head": head, **extra}).double()


def _batch(objective, records):
    return collate(records, BatchViews.from_dict(objective.batch_views()), dtype=torch.float64)


@pytest.mark.parametrize("name", ["vae", "jepa"])
def test_weight_zero_is_the_published_objective(name):
    published = build_objective({"name": name, "encoder": MATFORMER, **({"embedding": "mean"} if name == "jepa" else {})})
    assert set(_objective(name, 0.0).state_dict()) == set(published.state_dict())
    assert _objective(name, 0.0).property_head is None


@pytest.mark.parametrize("name", ["vae", "jepa"])
def test_head_adds_the_weighted_huber_of_labelled_crystals_only(name, mp20_records):
    records = mp20_records[:6]
    objective = _objective(name, 2.0).eval()
    batch = _batch(objective, records)
    energy = batch.labels["formation_energy_per_atom"].clone()
    assert torch.isfinite(energy).all()
    energy[:2] = float("nan")  # two crystals without the label
    batch.labels["formation_energy_per_atom"] = energy
    norm = LossNorm(atoms=float(batch.num_nodes), crystals=12.0)  # as if another rank held 6 more

    if name == "vae":
        h = objective.encoder(batch)  # eval mode masks nothing when the mask is all False
        embedding = objective.encoder.readout(h, batch, "mean")
    else:
        embedding = objective.embed(batch)
    loss, metrics = objective.property_head.loss(embedding, batch, norm.crystals)
    pred = objective.property_head.mlp(embedding).squeeze(-1)
    expected = 2.0 * torch.nn.functional.huber_loss(pred[2:], energy[2:], reduction="sum") / 12.0
    assert math.isclose(float(loss), float(expected), rel_tol=1e-9)
    assert metrics["labelled"] == 4.0
    assert math.isclose(metrics["formation_energy_per_atom_mae"], float((pred[2:] - energy[2:]).abs().mean()), rel_tol=1e-9)


def test_vae_head_trains_the_encoder_and_lowers_the_energy_error(mp20_records):
    records = mp20_records[:16]
    objective = _objective("vae", 5.0)
    batch = _batch(objective, records)
    optimizer = torch.optim.Adam(objective.parameters(), lr=3e-3)
    first = last = None
    for step in range(60):
        loss, metrics = objective.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = [p.grad for p in objective.encoder.parameters() if p.grad is not None]
            assert grads and any(float(g.abs().sum()) > 0 for g in grads)
            first = metrics["formation_energy_per_atom_mae"]
        optimizer.step()
        last = metrics["formation_energy_per_atom_mae"]
    assert math.isfinite(last) and last < 0.5 * first


def test_missing_label_is_a_clear_error(mp20_records):
    objective = _objective("vae", 1.0)
    batch = _batch(objective, mp20_records[:2])
    batch.labels.pop("formation_energy_per_atom")
    with pytest.raises(ValueError, match="property_head"):
        objective.loss(batch)


def test_vae_clean_input_reads_the_unmasked_crystal(mp20_records):
    """input: clean → the head's loss is that of the unmasked embedding, whatever the mask drawn."""
    torch.manual_seed(0)
    head = {"label": "formation_energy_per_atom", "weight": 1.0, "input": "clean"}
    objective = build_objective({"name": "vae", "encoder": MATFORMER, "latent_dim": 16, "property_head": head}).double()
    objective.eval()  # eps = mean; draw_mask still masks
    batch = _batch(objective, mp20_records[:6])
    objective.draw_mask = lambda b: torch.ones(b.num_nodes, dtype=torch.bool)  # every species hidden
    _, metrics = objective.loss(batch)
    clean = objective.encoder.readout(objective.encoder(batch), batch, "mean")
    _, expected = objective.property_head.loss(clean, batch, float(batch.num_crystals))
    assert math.isclose(metrics["formation_energy_per_atom_loss"], expected["formation_energy_per_atom_loss"], rel_tol=1e-9)
    objective.config = dataclasses.replace(objective.config, property_head=dataclasses.replace(
        objective.config.property_head, input="masked"))
    _, masked = objective.loss(batch)  # the default reads the masked pass: a different embedding
    assert not math.isclose(masked["formation_energy_per_atom_loss"], expected["formation_energy_per_atom_loss"], rel_tol=1e-6)
    with pytest.raises(ValueError, match="input"):
        build_objective({"name": "vae", "encoder": MATFORMER, "property_head": {"weight": 1.0, "input": "noisy"}})
