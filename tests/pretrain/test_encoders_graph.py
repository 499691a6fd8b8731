"""Invariances of the periodic graph encoders (pddformer, matformer) on real MP-20 crystals.

Each test transforms the records, rebuilds the batch through the real loader path
(`data_pipeline.load.collate.collate` → vesin kNN graph, amd PDD rows) and compares per-atom latents and
per-crystal readouts with the untransformed batch, in float64 and eval mode.

The kNN graph keeps every candidate tied with the k-th distance (data_pipeline.load.neighbors), so it
is a function of the crystal and every crystal is compared, ties included; before that rule, 3 of
the first 64 crystals changed readouts by 0.03-0.35 under an atom permutation.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from data_pipeline.load.collate import BatchViews, collate
from data_pipeline.load.neighbors import NeighborRule
from pretrain.encoders.base import build_encoder

SMALL = {
    "pddformer": {"name": "pddformer", "width": 32, "num_layers": 2, "rbf_bins": 64},
    "matformer": {"name": "matformer", "width": 32, "num_layers": 2, "heads": 2, "rbf_bins": 32},
    "matformer_attention": {"name": "matformer", "width": 32, "num_layers": 2, "heads": 2, "aggregation": "attention"},
}
# float64 and O(1) outputs: rotations agree to 1e-15; 1e-6 leaves room for near-ties (distances within
# 1e-6 Å between symmetry-equivalent atoms of a not quite symmetric cell) that a transformation may
# swap, moving outputs by ~1e-8. A wrong neighbour or a wrong PDD row moves them by 1e-3 or more.
ATOL = 1e-6
_BASE: dict = {}




def _encoder(key, **overrides):
    torch.manual_seed(0)
    return build_encoder({**SMALL[key], **overrides}).double().eval()


def _views(encoder) -> BatchViews:
    return BatchViews(
        graph=NeighborRule(**encoder.neighbor_rule),
        pdd_k=encoder.pdd_k if encoder.needs_pdd else None,
        tokens=encoder.needs_tokens,
    )


def _base(key, records):
    """Encoder `key` and its (h, readout) on the untransformed records, computed once per module."""
    if key not in _BASE:
        encoder = _encoder(key)
        _BASE[key] = (encoder, *_encode(encoder, records)[:2])
    return _BASE[key]


def _encode(encoder, records):
    batch = collate(records, _views(encoder), dtype=torch.float64)
    with torch.no_grad():
        h = encoder(batch)  # [N, d]
    return h, encoder.readout(h, batch), batch


@pytest.fixture(scope="module")
def records(mp20_records):
    return mp20_records[:24]


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q  # proper rotation


ENCODERS = list(SMALL)


@pytest.mark.parametrize("key", ENCODERS)
def test_rotation_invariance(key, records):
    """Rotating the lattice (L → L Rᵀ) leaves distances, hence the graph and every latent, unchanged."""
    encoder, h, y = _base(key, records)
    rng = np.random.default_rng(1)
    rotated = [r.replace(lattice=r.lattice @ _random_rotation(rng).T) for r in records]
    h_rot, y_rot, _ = _encode(encoder, rotated)
    torch.testing.assert_close(h_rot, h, atol=ATOL, rtol=0)
    torch.testing.assert_close(y_rot, y, atol=ATOL, rtol=0)


@pytest.mark.parametrize("key", ENCODERS)
def test_periodic_translation_invariance(key, records):
    encoder, h, y = _base(key, records)
    rng = np.random.default_rng(2)
    shifted = [r.replace(frac_coords=r.frac_coords + rng.uniform(size=3)) for r in records]  # re-wrapped by the record
    h_t, y_t, _ = _encode(encoder, shifted)
    torch.testing.assert_close(h_t, h, atol=ATOL, rtol=0)
    torch.testing.assert_close(y_t, y, atol=ATOL, rtol=0)


@pytest.mark.parametrize("key", ["pddformer", "matformer"])
def test_readouts_ignore_atom_order_on_64_mp20_crystals(key, mp20_records):
    """float32, the loader's default path (distinct-length table, kNN ties kept): three random atom
    orders of each of the first 64 MP-20 crystals give the same readout to float32 precision. With
    ties cut at the k-th neighbour by atom index, 3 of these crystals moved by 0.03-0.35."""
    torch.manual_seed(0)
    encoder = build_encoder(SMALL[key]).eval()
    views = _views(encoder)
    with torch.no_grad():
        batch = collate(mp20_records, views)
        base = encoder.readout(encoder(batch), batch)  # [64, d]
        rng = np.random.default_rng(11)
        for _ in range(3):
            permuted = []
            for r in mp20_records:
                p = rng.permutation(r.num_atoms)
                permuted.append(r.replace(atomic_numbers=r.atomic_numbers[p], frac_coords=r.frac_coords[p]))
            batch_p = collate(permuted, views)
            moved = (encoder.readout(encoder(batch_p), batch_p) - base).abs().amax(-1)  # [64]
            worst = int(moved.argmax())
            assert float(moved.max()) < 1e-5 * (1 + float(base.abs().max())), (
                f"{mp20_records[worst].key}: readout moved by {float(moved.max()):.2e} under an atom permutation")


@pytest.mark.parametrize("key", ENCODERS)
def test_permutation_equivariance(key, records):
    """Per-atom latents follow the atoms; readouts do not change."""
    encoder, h, y = _base(key, records)
    rng = np.random.default_rng(3)
    perms = [rng.permutation(r.num_atoms) for r in records]
    permuted = [r.replace(atomic_numbers=r.atomic_numbers[p], frac_coords=r.frac_coords[p]) for r, p in zip(records, perms)]
    h_p, y_p, _ = _encode(encoder, permuted)
    starts = np.concatenate([[0], np.cumsum([r.num_atoms for r in records])])
    back = np.concatenate([starts[i] + perms[i] for i in range(len(records))])  # h_p[j] is atom back[j] of h
    torch.testing.assert_close(h_p, h[back], atol=ATOL, rtol=0)
    torch.testing.assert_close(y_p, y, atol=ATOL, rtol=0)


def _supercell_2x1x1(record):
    """Atoms i and i + N of the supercell are images of atom i."""
    frac = np.concatenate([record.frac_coords, record.frac_coords + [1.0, 0.0, 0.0]]) / [2.0, 1.0, 1.0]
    lattice = record.lattice * np.array([[2.0], [1.0], [1.0]])
    return record.replace(atomic_numbers=np.tile(record.atomic_numbers, 2), frac_coords=frac, lattice=lattice)


@pytest.mark.parametrize("key", ENCODERS)
def test_supercell_invariance(key, records):
    """A 2×1×1 supercell gives each image the latent of its original atom and the same mean readout
    (the PDD weight column is rescaled by the encoder to stay cell-size invariant)."""
    encoder, h, y = _base(key, records)
    subset = records
    h_s, y_s, _ = _encode(encoder, [_supercell_2x1x1(r) for r in subset])
    starts = np.concatenate([[0], np.cumsum([r.num_atoms for r in subset])])
    images = np.concatenate([np.tile(np.arange(starts[i], starts[i + 1]), 2) for i in range(len(subset))])
    torch.testing.assert_close(h_s, h[images], atol=ATOL, rtol=0)
    torch.testing.assert_close(y_s, y, atol=ATOL, rtol=0)


@pytest.mark.parametrize("key", ENCODERS)
def test_change_of_cell_invariance(key, records):
    """Another basis of the same lattice: a unimodular change (atom order kept, per-atom comparison),
    pymatgen's Niggli-reduced cell, and the primitive cell pymatgen finds in a doubled non-diagonal supercell."""
    from data_pipeline.record import CrystalRecord

    encoder, h, y = _base(key, records)
    subset = records

    m = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]])  # det 1
    sheared = [r.replace(lattice=m @ r.lattice, frac_coords=r.frac_coords @ np.linalg.inv(m)) for r in subset]
    niggli, primitive = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in subset:
            s = r.to_structure()
            niggli.append(CrystalRecord.from_structure(s.get_reduced_structure("niggli"), key=r.key, source="t"))
            doubled = s.copy()
            doubled.make_supercell([[1, 1, 0], [-1, 1, 0], [0, 0, 1]])
            primitive.append(CrystalRecord.from_structure(doubled.get_primitive_structure(), key=r.key, source="t"))
    assert any(not np.allclose(n.lattice, r.lattice) for n, r in zip(niggli + primitive, subset * 2)), "no cell changed"
    h_all, y_all, _ = _encode(encoder, sheared + niggli + primitive)
    n = len(subset)
    torch.testing.assert_close(h_all[: h.shape[0]], h, atol=ATOL, rtol=0)  # sheared: same atom order
    torch.testing.assert_close(y_all[:n], y, atol=ATOL, rtol=0)
    torch.testing.assert_close(y_all[n : 2 * n], y, atol=ATOL, rtol=0)  # Niggli
    torch.testing.assert_close(y_all[2 * n :], y, atol=ATOL, rtol=0)  # primitive


@pytest.mark.parametrize("key", ["pddformer", "matformer"])
def test_gradients_reach_lattice_and_coordinates(key, records):
    """Edge vectors are recomputed from lattice and coordinates, so both get finite, non-zero gradients,
    and a directional finite difference agrees with them (the graph topology is fixed by the loader)."""
    encoder = _encoder(key)
    batch = collate(records[:8], _views(encoder), dtype=torch.float64)
    lattice0, frac0 = batch.lattice.clone(), batch.frac_coords.clone()

    def energy(lattice, frac):
        batch.lattice, batch.frac_coords = lattice, frac
        return encoder.readout(encoder(batch), batch).square().sum()

    lattice, frac = lattice0.clone().requires_grad_(True), frac0.clone().requires_grad_(True)
    energy(lattice, frac).backward()
    for grad in (lattice.grad, frac.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (lattice.grad.flatten(1).abs().sum(1) > 0).all(), "every crystal's lattice gets a gradient"

    gen = torch.Generator().manual_seed(0)
    d_lat = torch.randn(lattice0.shape, generator=gen, dtype=torch.float64)
    d_frac = torch.randn(frac0.shape, generator=gen, dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        plus = energy(lattice0 + eps * d_lat, frac0 + eps * d_frac)
        minus = energy(lattice0 - eps * d_lat, frac0 - eps * d_frac)
    numeric = (plus - minus) / (2 * eps)
    analytic = (lattice.grad * d_lat).sum() + (frac.grad * d_frac).sum()
    torch.testing.assert_close(numeric, analytic, rtol=1e-5, atol=1e-8)


def test_batchnorm_variant_is_invariant_in_eval_and_batch_dependent_in_training(records):
    """norm='batch' (the papers' BatchNorm) is invariant in eval mode but, in training mode, a crystal's
    latents change with the other crystals of the batch; the default norm='layer' never does."""
    rng = np.random.default_rng(4)
    subset = records[:12]
    rotated = [r.replace(lattice=r.lattice @ _random_rotation(rng).T) for r in subset]
    bn = _encoder("pddformer", norm="batch")
    torch.testing.assert_close(_encode(bn, rotated)[1], _encode(bn, subset)[1], atol=ATOL, rtol=0)

    for norm, depends in (("batch", True), ("layer", False)):
        encoder = _encoder("pddformer", norm=norm).train()
        alone = encoder(collate(subset[:1], _views(encoder), dtype=torch.float64))
        together = encoder(collate(subset[:6], _views(encoder), dtype=torch.float64))[: subset[0].num_atoms]
        assert torch.allclose(alone, together, atol=ATOL) != depends, norm


def test_lattice_self_edges_option(records):
    """Matformer's self-connecting edges (±a, ±b, ±c) are opt-in: they keep rotation and permutation
    invariance, but a supercell doubles |a|, so they trade away invariance to the choice of cell."""
    encoder = _encoder("matformer", neighbor_rule={"lattice_self_edges": True})
    subset = records[:8]
    h, y, batch = _encode(encoder, subset)
    plain = collate(subset, BatchViews(graph=NeighborRule(**{**encoder.neighbor_rule, "lattice_self_edges": False})))
    assert batch.num_edges == plain.num_edges + 6 * sum(r.num_atoms for r in subset)
    rng = np.random.default_rng(5)
    rotated = [r.replace(lattice=r.lattice @ _random_rotation(rng).T) for r in subset]
    perms = [rng.permutation(r.num_atoms) for r in subset]
    permuted = [r.replace(atomic_numbers=r.atomic_numbers[p], frac_coords=r.frac_coords[p]) for r, p in zip(subset, perms)]
    torch.testing.assert_close(_encode(encoder, rotated)[1], y, atol=ATOL, rtol=0)
    torch.testing.assert_close(_encode(encoder, permuted)[1], y, atol=ATOL, rtol=0)
    y_super = _encode(encoder, [_supercell_2x1x1(r) for r in subset])[1]
    assert (y_super - y).abs().max() > 1e-4


@pytest.mark.parametrize("key", ENCODERS)
def test_edge_features_once_per_distinct_length_equal_the_per_edge_path(key, records):
    """The loader's table of distinct lengths (edge MLPs run once per length, gathered per edge) gives
    the per-edge path's latents and parameter gradients (float64); a table that no longer matches
    the coordinates (atoms moved after collation) is ignored, not trusted."""
    from dataclasses import replace

    from pretrain.encoders.blocks import edge_lengths

    encoder = _encoder(key).train()
    views = _views(encoder)
    table = collate(records, views, dtype=torch.float64)
    per_edge = collate(records, BatchViews(graph=views.graph, pdd_k=views.pdd_k, distinct_lengths=False), dtype=torch.float64)
    assert edge_lengths(table, torch.float64)[1] is not None and edge_lengths(per_edge, torch.float64)[1] is None
    grads = []
    for batch in (table, per_edge):
        encoder.zero_grad()
        h = encoder(batch)
        encoder.readout(h, batch).square().sum().backward()
        grads.append((h.detach(), [p.grad.clone() for p in encoder.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-9, rtol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)

    noise = 1e-3 * torch.randn(table.frac_coords.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moved = replace(table, frac_coords=table.frac_coords + noise)  # a translation would keep every length
    assert edge_lengths(moved, torch.float64)[1] is None
    fresh = replace(per_edge, frac_coords=per_edge.frac_coords + noise)
    with torch.no_grad():
        torch.testing.assert_close(encoder(moved), encoder(fresh), atol=0, rtol=0)
