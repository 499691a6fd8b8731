"""Edge fusion in the graph encoders (`edge_fusion=True`, the default): the edge features are gathered
or computed inside the fused aggregation instead of as E×d tensors. On real MP-20 crystals in float64
the fused encoders give the unfused path's latents and parameter gradients, in both modes (the
loader's distinct-length table, and per-edge lengths with the edge MLP run per chunk), with gradients
through the geometry, on the chunked CPU backend and the interpreted Triton kernels; and weights saved
before edge fusion existed (commit 1a60c79) load and give the latents they gave then."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from data_pipeline.load.collate import BatchViews, collate
from data_pipeline.load.neighbors import NeighborRule
from pretrain import kernels
from pretrain.encoders.base import build_encoder
from pretrain.kernels import triton_backend

SMALL = {
    "pddformer": {"name": "pddformer", "width": 16, "num_layers": 2, "rbf_bins": 32},
    "matformer": {"name": "matformer", "width": 16, "num_layers": 2, "heads": 2, "rbf_bins": 16},
}
ASSETS = Path(__file__).parent / "assets"
needs_interpreter = pytest.mark.skipif(
    not triton_backend.available("cpu"), reason="triton kernels need TRITON_INTERPRET=1 on CPU"
)


def _encoder(key, **overrides):
    torch.manual_seed(0)
    return build_encoder({**SMALL[key], **overrides}).double().train()


def _batch(encoder, records, distinct_lengths=True):
    views = BatchViews(
        graph=NeighborRule(**encoder.neighbor_rule),
        pdd_k=encoder.pdd_k if encoder.needs_pdd else None,
        distinct_lengths=distinct_lengths,
    )
    return collate(records, views, dtype=torch.float64)


def _latents_and_grads(encoder, batch, fusion, backend, geometry_grad=False):
    encoder.edge_fusion = fusion
    encoder.zero_grad()
    extra = []
    if geometry_grad:
        batch.lattice = batch.lattice.detach().clone().requires_grad_(True)
        batch.frac_coords = batch.frac_coords.detach().clone().requires_grad_(True)
        extra = [batch.lattice, batch.frac_coords]
    kernels.set_backend(backend)
    try:
        h = encoder(batch)
        loss = encoder.readout(h, batch).square().sum()
        grads = torch.autograd.grad(loss, [*encoder.parameters(), *extra], allow_unused=True)
    finally:
        kernels.set_backend("auto")
    return h.detach(), [torch.zeros(()) if g is None else g for g in grads]


def _assert_same(a, b, atol=1e-9):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=0)
    for i, (x, y) in enumerate(zip(a[1], b[1])):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-7, msg=lambda m: f"gradient {i}: {m}")


@pytest.mark.parametrize("key", list(SMALL))
@pytest.mark.parametrize("mode", ["distinct_lengths", "per_edge", "geometry_grad"])
def test_fused_edges_match_the_unfused_path_on_mp20(key, mode, mp20_records):
    """cpu_fused with edge fusion vs the native unfused definition, 24 real crystals, float64."""
    encoder = _encoder(key)
    batch = _batch(encoder, mp20_records[:24], distinct_lengths=mode == "distinct_lengths")
    geometry = mode == "geometry_grad"
    expected = _latents_and_grads(encoder, batch, False, "native", geometry)
    got = _latents_and_grads(encoder, batch, True, "cpu_fused", geometry)
    _assert_same(got, expected)
    if geometry:  # the per-chunk edge MLP passes gradients on to lengths, lattice and coordinates
        assert got[1][-1].abs().sum() > 0 and got[1][-2].abs().sum() > 0


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("key", list(SMALL))
@pytest.mark.parametrize("distinct_lengths", [True, False])
def test_fused_edges_through_triton_match_the_unfused_path(key, distinct_lengths, mp20_records):
    """The interpreted Triton kernels (table gather + row-keyed backward) on two real crystals."""
    encoder = _encoder(key, width=8, rbf_bins=8)
    batch = _batch(encoder, mp20_records[:2], distinct_lengths=distinct_lengths)
    expected = _latents_and_grads(encoder, batch, False, "native")
    got = _latents_and_grads(encoder, batch, True, "triton")
    _assert_same(got, expected)


@pytest.mark.parametrize("key", list(SMALL))
def test_fused_edges_fp32_on_64_crystals_and_repeatable(key, mp20_records):
    """float32 on the first 64 crystals: fused edges within fp32 tolerance of the unfused native path,
    and two runs bit-identical (fixed-order reductions of the table and weight gradients)."""
    encoder = _encoder(key).float()
    batch = collate(
        mp20_records,
        BatchViews(graph=NeighborRule(**encoder.neighbor_rule), pdd_k=encoder.pdd_k if encoder.needs_pdd else None),
    )
    expected = _latents_and_grads(encoder, batch, False, "native")
    got = _latents_and_grads(encoder, batch, True, "cpu_fused")
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    for x, y in zip(got[1], expected[1]):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3)
    again = _latents_and_grads(encoder, batch, True, "cpu_fused")
    assert torch.equal(got[0], again[0]) and all(torch.equal(x, y) for x, y in zip(got[1], again[1]))


@pytest.mark.parametrize("key", list(SMALL))
def test_fusion_is_a_switch_with_the_same_weights(key):
    """edge_fusion adds no parameter: the state_dict keys and shapes are those of the unfused model,
    and the option comes from the config (an old config without it gets the fused default)."""
    fused, plain = _encoder(key), _encoder(key, edge_fusion=False)
    assert fused.edge_fusion and not plain.edge_fusion
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    fused.load_state_dict(plain.state_dict(), strict=True)


@pytest.mark.parametrize("key", ["matformer", "pddformer"])
@pytest.mark.parametrize("fusion", [True, False])
def test_weights_saved_before_edge_fusion_load_and_give_the_same_latents(key, fusion, mp20_records):
    """tests/pretrain/assets/pre_edge_fusion_*.safetensors were written by the code before edge fusion
    (commit 1a60c79): a tiny encoder's state_dict and its float64 latents on the first three MP-20
    crystals. They load strictly into today's encoder, fused or not, and reproduce those latents."""
    from safetensors import safe_open

    path = ASSETS / f"pre_edge_fusion_{key}.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    config = ast.literal_eval(meta["config"])
    assert "edge_fusion" not in config
    encoder = build_encoder({**config, "edge_fusion": fusion}).double().eval()
    state = {name[len("state."):]: t for name, t in tensors.items() if name.startswith("state.")}
    encoder.load_state_dict(state, strict=True)
    records = mp20_records[:3]
    assert ",".join(r.key for r in records) == meta["keys"]
    batch = collate(records, BatchViews(graph=NeighborRule(**encoder.neighbor_rule), pdd_k=encoder.pdd_k if encoder.needs_pdd else None), dtype=torch.float64)
    for backend in ("native", "cpu_fused"):
        kernels.set_backend(backend)
        try:
            with torch.no_grad():
                h = encoder(batch)
        finally:
            kernels.set_backend("auto")
        torch.testing.assert_close(h, tensors["latents"], atol=1e-10, rtol=0)
