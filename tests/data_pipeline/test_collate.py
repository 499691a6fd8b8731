"""Batch views: graph view CSR, token view contents, PDD features against a brute-force search."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.load.batch import TOKEN_DIM
from data_pipeline.load.collate import BatchViews, collate, pdd_features
from data_pipeline.load.neighbors import NeighborRule, compute_neighbors
from data_pipeline.record import MAX_Z, CrystalRecord, lattice_polar6


def sorted_periodic_distances(record: CrystalRecord, k: int) -> np.ndarray:
    """[N, k] each atom's k smallest distances to every other point of the periodic set."""
    lattice = record.lattice
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(lattice).T, axis=1)
    reach = np.ceil(12.0 / spacing).astype(int) + 1  # 12 Å holds > 92 neighbours in MP-20 cells
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1).reshape(-1, 3)
    cart = record.cart_coords
    points = (cart[None, :, :] + (grid @ lattice)[:, None, :]).reshape(-1, 3)
    out = []
    for i in range(record.num_atoms):
        d = np.sort(np.linalg.norm(points - cart[i], axis=1))
        out.append(d[1 : k + 1])  # d[0] is the atom itself
    return np.array(out)


@pytest.mark.slow  # amd's first call JIT-compiles (seconds)
def test_pdd_features_are_sorted_knn_distances_with_z_weights(mp20_records):
    for record in mp20_records[:8]:
        pdd = pdd_features(record, 92)
        assert pdd.shape == (record.num_atoms, 93)
        np.testing.assert_allclose(pdd[:, 0], record.atomic_numbers / record.atomic_numbers.sum())
        np.testing.assert_allclose(pdd[:, 1:], sorted_periodic_distances(record, 92), atol=1e-6, err_msg=record.key)
    batch = collate(mp20_records[:3], BatchViews(pdd_k=92))
    assert batch.pdd.shape == (batch.num_nodes, 93)


def test_graph_view_csr_and_edge_vectors(mp20_records):
    records = mp20_records[:5]
    rule = NeighborRule(kind="knn", k=12, cutoff=5.0)
    batch = collate(records, BatchViews(graph=rule), dtype=torch.float64)
    assert torch.all(batch.edge_dst[1:] >= batch.edge_dst[:-1])
    counts = torch.bincount(batch.edge_dst, minlength=batch.num_nodes)
    assert torch.equal(batch.csr_offsets[1:] - batch.csr_offsets[:-1], counts)
    assert batch.csr_offsets[0] == 0 and batch.csr_offsets[-1] == batch.num_edges
    # edges never cross crystals, and recomputed lengths equal the neighbour list's distances
    assert torch.equal(batch.batch_index[batch.edge_src], batch.batch_index[batch.edge_dst])
    expected = np.concatenate([compute_neighbors(r.frac_coords, r.lattice, rule).distance for r in records])
    np.testing.assert_allclose(batch.edge_vectors().norm(dim=1).numpy(), expected, atol=1e-9)
    # differentiable in the lattice (for stress) and coordinates
    lattice = batch.lattice.clone().requires_grad_(True)
    batch.lattice = lattice
    batch.edge_vectors().norm(dim=1).sum().backward()
    assert lattice.grad is not None and torch.isfinite(lattice.grad).all()


def test_token_view_contents(mp20_records):
    records = mp20_records[:6]
    batch = collate(records, BatchViews(tokens=True), dtype=torch.float64)
    longest = max(r.num_atoms for r in records)
    assert batch.tokens.shape == (6, longest, TOKEN_DIM) == (6, longest, 109)
    for b, record in enumerate(records):
        n = record.num_atoms
        tokens = batch.tokens[b].numpy()
        assert batch.token_mask[b, :n].all() and not batch.token_mask[b, n:].any()
        np.testing.assert_array_equal(tokens[:n, :3], record.frac_coords)
        onehot = tokens[:n, 3 : 3 + MAX_Z]
        assert np.array_equal(onehot.argmax(1) + 1, record.atomic_numbers) and np.all(onehot.sum(1) == 1)
        np.testing.assert_allclose(tokens[:n, 3 + MAX_Z :], np.tile(lattice_polar6(record.lattice), (n, 1)))
        assert np.all(tokens[n:] == 0)
    # the lattice part is rotation-invariant
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = records[0].replace(lattice=records[0].lattice @ q.T)
    again = collate([rotated], BatchViews(tokens=True), dtype=torch.float64)
    np.testing.assert_allclose(again.tokens[0, :, 103:].numpy(), batch.tokens[0, : records[0].num_atoms, 103:].numpy(),
                               atol=1e-9)


def test_labels_missing_values_are_nan():
    rng = np.random.default_rng(0)
    a = CrystalRecord(key="t:a", source="t", atomic_numbers=[1, 8], frac_coords=rng.random((2, 3)),
                      lattice=np.eye(3) * 4, energy=-3.0, forces=np.ones((2, 3)), properties={"k_vrh": 50.0})
    b = CrystalRecord(key="t:b", source="t", atomic_numbers=[26], frac_coords=rng.random((1, 3)),
                      lattice=np.eye(3) * 3, band_gap=1.5)
    batch = collate([a, b])
    assert torch.isnan(batch.labels["energy"][1]) and batch.labels["energy"][0] == -3.0
    assert torch.isnan(batch.labels["band_gap"][0]) and batch.labels["k_vrh"].tolist()[0] == 50.0
    assert batch.labels["forces"].shape == (3, 3) and torch.isnan(batch.labels["forces"][2]).all()
    assert "stress" not in batch.labels and batch.padding is False and batch.weight == 1.0


def test_token_view_refuses_elements_beyond_the_one_hot():
    record = CrystalRecord(key="t:heavy", source="t", atomic_numbers=[101], frac_coords=[[0, 0, 0]],
                           lattice=np.eye(3) * 5)
    with pytest.raises(ValueError, match="t:heavy"):
        collate([record], BatchViews(tokens=True))


def _assert_same_batch(a, b):
    """Every tensor of two batches equal, bit for bit."""
    from dataclasses import fields

    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert y is not None and x.dtype == y.dtype and torch.equal(x, y), f.name
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), f.name
            for k in x:
                torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, equal_nan=True)
        else:
            assert x == y, f.name


@pytest.mark.slow  # amd's first call JIT-compiles (seconds)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_pdd_rows_and_neighbour_lists_give_the_per_batch_numbers(mp20_records, dtype):
    """The fine-tune cache (records carrying their PDD rows, a NeighborCache) builds exactly the batch
    the per-batch path builds, for PDDFormer's and Matformer's views on 64 real MP-20 crystals."""
    from data_pipeline.load.collate import NeighborCache, with_pdd

    for views in (BatchViews(graph=NeighborRule(kind="knn", k=25, cutoff=4.0), pdd_k=92),
                  BatchViews(graph=NeighborRule(kind="knn", k=12, cutoff=8.0))):
        records = [with_pdd(r, 92) for r in mp20_records] if views.pdd_k else list(mp20_records)
        if views.pdd_k:
            assert all(r.pdd is not None and r.pdd.shape == (r.num_atoms, 93) for r in records)
        cache = NeighborCache(views.graph, records)
        assert len(cache) == len(records)
        for start in range(0, len(records), 16):
            per_batch = collate(mp20_records[start : start + 16], views, dtype=dtype)
            cached = collate(records[start : start + 16], views, dtype=dtype, neighbors=cache)
            _assert_same_batch(cached, per_batch)


def test_neighbour_cache_recomputes_for_a_moved_crystal_and_refuses_another_rule(mp20_records):
    from data_pipeline.load.collate import NeighborCache

    rule = NeighborRule(kind="knn", k=12, cutoff=8.0)
    record = mp20_records[0]
    cache = NeighborCache(rule, [record])
    moved = record.replace(lattice=record.lattice * 1.1)  # same key, another structure
    got = cache.get(moved)
    np.testing.assert_allclose(got.distance, compute_neighbors(moved.frac_coords, moved.lattice, rule).distance)
    with pytest.raises(ValueError, match="neighbour cache built for"):
        collate([record], BatchViews(graph=NeighborRule(kind="knn", k=25, cutoff=4.0)), neighbors=cache)


def test_a_record_drops_its_pdd_rows_when_its_structure_changes(mp20_records):
    record = mp20_records[1].replace(pdd=np.zeros((mp20_records[1].num_atoms, 93)))
    assert record.replace(formation_energy_per_atom=0.0).pdd is not None  # a label: the rows still hold
    assert record.replace(frac_coords=record.frac_coords + 0.1).pdd is None
    with pytest.raises(ValueError, match="pdd must be"):
        record.replace(pdd=np.zeros((record.num_atoms + 1, 93)))


def test_distinct_length_table_maps_every_edge_and_ignores_atom_order(mp20_records):
    """Each edge's length is its table entry (to 1e-8 Å); the table is the same for any atom order;
    symmetric crystals repeat lengths (the table is several times shorter than the edge list)."""
    views = BatchViews(graph=NeighborRule(kind="knn", k=25, cutoff=4.0))
    batch = collate(mp20_records, views, dtype=torch.float64)
    lengths = batch.edge_vectors().norm(dim=1)
    assert torch.all(batch.edge_lengths[1:] > batch.edge_lengths[:-1])
    torch.testing.assert_close(batch.edge_lengths[batch.edge_length_index], lengths, atol=1e-8, rtol=0)
    assert batch.edge_lengths.numel() * 4 < batch.num_edges
    rng = np.random.default_rng(0)
    permuted = []
    for r in mp20_records:
        p = rng.permutation(r.num_atoms)
        permuted.append(r.replace(atomic_numbers=r.atomic_numbers[p], frac_coords=r.frac_coords[p]))
    other = collate(permuted, views, dtype=torch.float64)
    torch.testing.assert_close(other.edge_lengths, batch.edge_lengths, atol=1e-12, rtol=0)
    assert collate(mp20_records[:2], BatchViews(graph=views.graph, distinct_lengths=False)).edge_lengths is None
