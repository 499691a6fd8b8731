"""Crys-JEPA on real MP-20 crystals: augmentations, the energy-weighted InfoNCE, SIGReg, overfitting."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_pipeline.load.collate import BatchViews, collate
from data_pipeline.record import CrystalRecord
from pretrain.objectives import build_objective
from pretrain.objectives.augment import augment_batch, random_context, random_permutation
from pretrain.objectives.geometry import random_rotation

TOKENS = {"name": "jepa_transformer", "width": 64, "num_layers": 2, "heads": 4}




def _records_of(batch) -> list[CrystalRecord]:
    out, start = [], 0
    for b, n in enumerate(batch.num_atoms.tolist()):
        out.append(CrystalRecord(key=batch.keys[b], source="test", atomic_numbers=batch.atomic_numbers[start : start + n].numpy(),
                                 frac_coords=batch.frac_coords[start : start + n].numpy(), lattice=batch.lattice[b].numpy()))
        start += n
    return out


def test_context_view_is_the_same_crystal(mp20_records):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    records = mp20_records[:8]
    batch = collate(records, BatchViews(tokens=True), dtype=torch.float64)
    view, params = random_context(batch, torch.Generator().manual_seed(0))
    assert params.shape == (8, 6) and float(params.min()) >= 0 and float(params.max()) < 1
    moved = _records_of(view)
    matcher = StructureMatcher()
    for original, new in zip(records, moved):
        assert not np.allclose(original.frac_coords, new.frac_coords)  # it did move
        assert not np.allclose(original.lattice, new.lattice)
        assert matcher.fit(original.to_structure(), new.to_structure())
    # the matcher can fail: a different crystal of the batch does not match
    assert not matcher.fit(records[0].to_structure(), moved[1].to_structure())


def test_augmentation_keeps_every_view_consistent(mp20_records):
    records = mp20_records[:6]
    views = BatchViews.from_dict({"graph": {"kind": "knn", "k": 12, "cutoff": 6.0}, "tokens": True})
    batch = collate(records, views, dtype=torch.float64)
    batch.pdd = torch.randn(batch.num_nodes, 9, dtype=torch.float64)  # per-atom rows must follow their atoms
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(6, 3, generator=gen, dtype=torch.float64)
    rot, _ = random_rotation(6, gen, dtype=torch.float64)
    perm = random_permutation(batch, gen)
    moved = augment_batch(batch, t, rot, perm)
    # graph view: every atom keeps its neighbour distances through the permutation (edges of old
    # atom i, sorted by length, equal those of its new index), receivers stay sorted, CSR is valid
    def edges_by_old_receiver(b, receiver_to_old):
        key = receiver_to_old[b.edge_dst].double() * 1e3 + b.edge_vectors().norm(dim=-1)  # lengths < 1e3 Å
        return torch.sort(key).values

    identity = torch.arange(batch.num_nodes)
    torch.testing.assert_close(edges_by_old_receiver(moved, perm), edges_by_old_receiver(batch, identity))
    assert moved.num_edges == batch.num_edges
    assert bool((moved.edge_dst[1:] >= moved.edge_dst[:-1]).all())
    assert torch.equal(moved.csr_offsets[1:] - moved.csr_offsets[:-1], torch.bincount(moved.edge_dst, minlength=moved.num_nodes))
    assert torch.equal(moved.pdd, batch.pdd[perm])
    # the table of distinct lengths still describes every (re-sorted) edge, so encoders keep using it
    torch.testing.assert_close(moved.edge_lengths[moved.edge_length_index], moved.edge_vectors().norm(dim=-1), atol=1e-8, rtol=0)
    # token view: the rebuilt tokens equal the loader's tokens of the moved records
    expected = collate(_records_of(moved), BatchViews(tokens=True), dtype=torch.float64)
    torch.testing.assert_close(moved.tokens, expected.tokens)
    assert torch.equal(moved.token_mask, expected.token_mask)


def test_rotation_acts_trivially_on_the_token_view(mp20_records):
    batch = collate(mp20_records[:4], BatchViews(tokens=True), dtype=torch.float64)
    rot, _ = random_rotation(4, torch.Generator().manual_seed(2), dtype=torch.float64)
    rotated = augment_batch(batch, rotation=rot)
    torch.testing.assert_close(rotated.tokens, batch.tokens)  # polar factor and frac coords are invariant
    assert not torch.allclose(rotated.lattice, batch.lattice)
    reference = augment_batch(batch, rotation=rot, context_lattice="rotated_triu")  # the reference code's features
    assert not torch.allclose(reference.tokens[..., -6:], batch.tokens[..., -6:])
    torch.testing.assert_close(reference.tokens[..., :-6], batch.tokens[..., :-6])


def test_infonce_equals_hand_computation(mp20_records):
    torch.manual_seed(0)
    jepa = build_objective({"name": "jepa", "encoder": TOKENS}).double()
    batch = collate(mp20_records[:3], BatchViews.from_dict(jepa.batch_views()), dtype=torch.float64)
    torch.manual_seed(5)
    loss, metrics = jepa.loss(batch)
    # the same draws, then InfoNCE by hand with explicit loops
    torch.manual_seed(5)
    with torch.no_grad():
        z = jepa.embed(batch)
        view, params = jepa.draw_context(batch)
        p = jepa.predictor(jepa.embed(view) + jepa.move_embedding(params))
    energy = [r.formation_energy_per_atom for r in mp20_records[:3]]
    p, z = p.numpy(), z.numpy()
    total = 0.0
    for i in range(3):
        logits = []
        for k in range(3):
            cos = float(p[i] @ z[k] / (np.linalg.norm(p[i]) * np.linalg.norm(z[k])))
            weight = 1.0 if i == k else 1.0 - math.exp(-abs(energy[i] - energy[k]))
            logits.append(weight * cos / 0.1)
        total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    assert abs(float(loss) - total / 3) < 1e-9
    assert abs(metrics["infonce"] - total / 3) < 1e-9


def test_infonce_needs_the_energy_label(mp20_records):
    jepa = build_objective({"name": "jepa", "encoder": TOKENS})
    records = [r.replace(formation_energy_per_atom=None) for r in mp20_records[:3]]
    with pytest.raises(ValueError, match="formation_energy_per_atom"):
        jepa.loss(collate(records, BatchViews.from_dict(jepa.batch_views())))


@pytest.mark.slow
@pytest.mark.parametrize("loss_kind", ["infonce", "sigreg"])
def test_jepa_overfits_eight_crystals(mp20_records, loss_kind):
    torch.manual_seed(0)
    jepa = build_objective({"name": "jepa", "encoder": TOKENS, "loss": loss_kind})
    batch = collate(mp20_records[:8], BatchViews.from_dict(jepa.batch_views()))
    optimiser = torch.optim.Adam(jepa.parameters(), lr=1e-3)
    losses = []
    for _ in range(60 if loss_kind == "infonce" else 150):
        loss, metrics = jepa.loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        jepa.after_step()
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < losses[0] / 10, (losses[0], losses[-5:])
    assert metrics["positive_cosine"] > 0.9
    for key in ("embedding_std_mean", "embedding_std_min", "embedding_effective_rank", "embedding_variance"):
        assert key in metrics


def test_ema_target_follows_the_encoder(mp20_records):
    torch.manual_seed(0)
    jepa = build_objective({"name": "jepa", "encoder": TOKENS, "target_encoder": "ema", "ema_decay": 0.5})
    batch = collate(mp20_records[:4], BatchViews.from_dict(jepa.batch_views()))
    loss, _ = jepa.loss(batch)
    loss.backward()
    assert all(p.grad is None for p in jepa.target.parameters())  # no gradient into the target
    with torch.no_grad():
        for p in jepa.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in jepa.target.parameters()]
    jepa.after_step()
    for old, new, online in zip(before, jepa.target.parameters(), jepa.encoder.parameters()):
        torch.testing.assert_close(new, 0.5 * old + 0.5 * online)


def test_graph_encoder_sees_the_context_as_the_same_crystal(mp20_records):
    """An invariant graph encoder (Matformer) embeds the moved crystal exactly as the original:
    the augmentation keeps the graph view consistent through translation, rotation and shuffling."""
    graph = {"name": "matformer", "width": 16, "num_layers": 1, "heads": 2, "rbf_bins": 16}
    with pytest.raises(ValueError, match="embedding: mean"):
        build_objective({"name": "jepa", "encoder": graph})
    torch.manual_seed(0)
    jepa = build_objective({"name": "jepa", "encoder": graph, "embedding": "mean"}).double()
    batch = collate(mp20_records[:6], BatchViews.from_dict(jepa.batch_views()), dtype=torch.float64)
    view, _ = jepa.draw_context(batch)
    assert not torch.allclose(view.lattice, batch.lattice)
    torch.testing.assert_close(jepa.embed(view), jepa.embed(batch), rtol=1e-9, atol=1e-9)
    loss, _ = jepa.loss(batch)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in jepa.encoder.parameters())
