"""Encoder registry, declared batch views, input contracts and dtypes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.load.collate import BatchViews, collate
from data_pipeline.load.neighbors import NeighborRule, compute_neighbors
from pretrain.encoders.base import Encoder, available_encoders, build_encoder

SMALL = {
    "pddformer": {"width": 16, "num_layers": 2, "rbf_bins": 32},
    "matformer": {"width": 16, "num_layers": 2, "heads": 2, "rbf_bins": 32},
    "jepa_transformer": {"width": 16, "num_layers": 2, "heads": 2},
}
DEFAULT_WIDTH = {"pddformer": 256, "matformer": 128, "jepa_transformer": 512}




def _views(encoder: Encoder) -> BatchViews:
    return BatchViews(
        graph=NeighborRule(**encoder.neighbor_rule) if encoder.needs_graph else None,
        pdd_k=encoder.pdd_k if encoder.needs_pdd else None,
        tokens=encoder.needs_tokens,
    )


def test_builtin_encoders_are_registered():
    assert {"pddformer", "matformer", "jepa_transformer"} <= set(available_encoders())
    with pytest.raises(ValueError, match="unknown encoder 'nope'"):
        build_encoder({"name": "nope"})
    with pytest.raises(TypeError):
        build_encoder({"name": "pddformer", "wdith": 8})


@pytest.mark.parametrize("name", sorted(SMALL))
def test_defaults_match_the_papers_sizes(name):
    encoder = build_encoder({"name": name})
    assert encoder.out_dim == DEFAULT_WIDTH[name]
    if encoder.needs_graph:
        NeighborRule(**encoder.neighbor_rule)  # a valid loader rule
    assert name != "pddformer" or (encoder.neighbor_rule["k"], encoder.neighbor_rule["cutoff"], encoder.pdd_k) == (25, 4.0, 92)
    assert name != "matformer" or (encoder.neighbor_rule["k"], encoder.neighbor_rule["cutoff"]) == (12, 8.0)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_builds_by_name_and_encodes_real_crystals(name, dtype, mp20_records):
    torch.manual_seed(0)
    encoder = build_encoder({"name": name, **SMALL[name]}).to(dtype)
    batch = collate(mp20_records[:5], _views(encoder), dtype=dtype)
    h = encoder(batch)
    assert h.shape == (batch.num_nodes, encoder.out_dim) and h.dtype == dtype
    assert torch.isfinite(h).all()
    pooled = encoder.embed(batch)
    assert pooled.shape == (batch.num_crystals, encoder.out_dim) and pooled.dtype == dtype
    assert torch.equal(encoder.encode(batch), h)


def test_neighbor_rule_is_configurable():
    encoder = build_encoder({"name": "matformer", **SMALL["matformer"], "neighbor_rule": {"lattice_self_edges": True, "k": 16}})
    assert encoder.neighbor_rule == {"kind": "knn", "k": 16, "cutoff": 8.0, "lattice_self_edges": True}
    assert build_encoder({"name": "matformer"}).neighbor_rule["k"] == 12, "the class default is not mutated"


def test_pdd_rows_belong_to_their_atoms(mp20_records):
    """The PDDFormer input contract: row i of batch.pdd holds atom i's sorted distances to its k nearest
    periodic neighbours (checked against the vesin neighbour list) and Z_i / ΣZ."""
    k = 24
    records = mp20_records[:6]
    batch = collate(records, BatchViews(pdd_k=k), dtype=torch.float64)
    rows = []
    for r in records:
        nl = compute_neighbors(r.frac_coords, r.lattice, NeighborRule(kind="knn", k=k, cutoff=6.0))
        rows.append(np.stack([np.sort(nl.distance[nl.dst == i])[:k] for i in range(r.num_atoms)]))
    np.testing.assert_allclose(batch.pdd[:, 1:].numpy(), np.concatenate(rows), atol=1e-8)
    z = [r.atomic_numbers / r.atomic_numbers.sum() for r in records]
    np.testing.assert_allclose(batch.pdd[:, 0].numpy(), np.concatenate(z), atol=1e-12)


def test_pddformer_input_errors_name_the_fix(mp20_records):
    encoder = build_encoder({"name": "pddformer", **SMALL["pddformer"]})
    rule = NeighborRule(**encoder.neighbor_rule)
    with pytest.raises(ValueError, match="BatchViews\\(pdd_k=92\\)"):
        encoder(collate(mp20_records[:2], BatchViews(graph=rule)))
    with pytest.raises(ValueError, match="pdd_k=92"):
        encoder(collate(mp20_records[:2], BatchViews(graph=rule, pdd_k=10)))
    with pytest.raises(ValueError, match="graph view"):
        encoder(collate(mp20_records[:2], BatchViews(pdd_k=92)))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_weights_round_trip_through_safetensors(name, mp20_records, tmp_path):
    """Released checkpoints are safetensors: every parameter and buffer survives a save/load."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    encoder = build_encoder({"name": name, **SMALL[name]}).eval()
    save_file(encoder.state_dict(), tmp_path / "w.safetensors")
    torch.manual_seed(1)
    again = build_encoder({"name": name, **SMALL[name]}).eval()
    again.load_state_dict(load_file(tmp_path / "w.safetensors"))
    batch = collate(mp20_records[:3], _views(encoder))
    with torch.no_grad():
        torch.testing.assert_close(again(batch), encoder(batch))


@pytest.mark.parametrize("name,overrides", [("pddformer", {}), ("matformer", {}), ("matformer", {"aggregation": "attention"})])
def test_aggregation_backends_agree_on_the_encoders(name, overrides, mp20_records):
    """The encoders reach their neighbour sums only through pretrain.kernels: switching the backend
    (native definition vs the fused CPU path) leaves outputs and gradients unchanged."""
    from pretrain.kernels import dispatch, set_backend

    torch.manual_seed(0)
    encoder = build_encoder({"name": name, **SMALL[name], **overrides}).double()
    batch = collate(mp20_records[:6], _views(encoder), dtype=torch.float64)
    results = {}
    previous = dispatch._current  # 'auto' or a name; restored below
    try:
        for backend in ("native", "cpu_fused"):
            set_backend(backend)
            encoder.zero_grad()
            h = encoder(batch)
            h.square().sum().backward()
            results[backend] = (h.detach(), [p.grad.clone() for p in encoder.parameters()])
    finally:
        set_backend(previous)
    torch.testing.assert_close(results["cpu_fused"][0], results["native"][0], atol=1e-10, rtol=1e-10)
    for g_fused, g_native in zip(results["cpu_fused"][1], results["native"][1]):
        torch.testing.assert_close(g_fused, g_native, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_activation_checkpointing_gives_the_same_gradients(name, mp20_records):
    torch.manual_seed(0)
    plain = build_encoder({"name": name, **SMALL[name]}).double()
    recomputing = build_encoder({"name": name, **SMALL[name], "activation_checkpointing": True}).double()
    recomputing.load_state_dict(plain.state_dict())
    batch = collate(mp20_records[:4], _views(plain), dtype=torch.float64)
    for encoder in (plain, recomputing):
        encoder.embed(batch).square().sum().backward()
    for (key, a), b in zip(plain.named_parameters(), recomputing.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-12, rtol=1e-10, msg=key)
