"""The token-view encoder (jepa_transformer) on real MP-20 crystals.

What it is, exactly: rotation invariant (the lattice enters as its rotation-invariant polar factor),
permutation equivariant per atom and invariant through [CLS] (no positional embedding), and blind to
padding. What it is not, by design: invariant to fractional translations (Crys-JEPA learns that from
randomly translated context views; with Fourier coordinate features a translation is a phase
rotation of the inputs) or to the choice of cell (tokens are cell coordinates); those are not tested
as invariances.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.load.collate import BatchViews, collate
from pretrain.encoders.base import build_encoder

SMALL = {"name": "jepa_transformer", "width": 32, "num_layers": 2, "heads": 4}
ATOL = 1e-10




def _encoder(**overrides):
    torch.manual_seed(0)
    return build_encoder({**SMALL, **overrides}).double().eval()


def _batch(records):
    return collate(records, BatchViews(tokens=True), dtype=torch.float64)


@pytest.fixture(scope="module")
def records(mp20_records):
    return mp20_records[:24]


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_rotation_invariance(records):
    encoder = _encoder()
    rng = np.random.default_rng(1)
    rotated = [r.replace(lattice=r.lattice @ _random_rotation(rng).T) for r in records]
    with torch.no_grad():
        b, b_rot = _batch(records), _batch(rotated)
        torch.testing.assert_close(encoder(b_rot), encoder(b), atol=1e-9, rtol=0)
        torch.testing.assert_close(encoder.embed(b_rot), encoder.embed(b), atol=1e-9, rtol=0)


def test_permutation_equivariance_and_cls_invariance(records):
    encoder = _encoder()
    rng = np.random.default_rng(2)
    perms = [rng.permutation(r.num_atoms) for r in records]
    permuted = [r.replace(atomic_numbers=r.atomic_numbers[p], frac_coords=r.frac_coords[p]) for r, p in zip(records, perms)]
    starts = np.concatenate([[0], np.cumsum([r.num_atoms for r in records])])
    back = np.concatenate([starts[i] + p for i, p in enumerate(perms)])
    with torch.no_grad():
        b, b_p = _batch(records), _batch(permuted)
        h, h_p = encoder(b), encoder(b_p)
        torch.testing.assert_close(h_p, h[back], atol=ATOL, rtol=0)
        for kind in ("cls", "mean", "sum"):
            torch.testing.assert_close(encoder.embed(b_p, kind), encoder.embed(b, kind), atol=ATOL, rtol=0)


def test_padding_is_ignored(records):
    """A crystal gives the same latents alone and padded inside a batch of longer crystals,
    and garbage written into padded token rows changes nothing."""
    encoder = _encoder()
    small = min(records, key=lambda r: r.num_atoms)
    longer = [r for r in records if r.num_atoms > small.num_atoms][:3]
    with torch.no_grad():
        alone = _batch([small])
        together = _batch([small, *longer])
        assert together.tokens.shape[1] > small.num_atoms
        torch.testing.assert_close(encoder(together)[: small.num_atoms], encoder(alone), atol=ATOL, rtol=0)
        torch.testing.assert_close(encoder.embed(together)[:1], encoder.embed(alone), atol=ATOL, rtol=0)
        noisy = together.tokens.clone()
        noisy[~together.token_mask] = torch.randn_like(noisy[~together.token_mask]) * 100
        torch.testing.assert_close(encoder(together, tokens=noisy), encoder(together), atol=ATOL, rtol=0)
        torch.testing.assert_close(encoder.embed(together, tokens=noisy), encoder.embed(together), atol=ATOL, rtol=0)


def test_latents_follow_the_batch_atom_order(records):
    """forward returns [N, d] in concatenated atom order; embed('mean') equals readout of forward."""
    encoder = _encoder()
    with torch.no_grad():
        b = _batch(records[:6])
        h = encoder(b)
        assert h.shape == (b.num_nodes, encoder.out_dim)
        one = [encoder(_batch([r])) for r in records[:6]]
        torch.testing.assert_close(h, torch.cat(one), atol=ATOL, rtol=0)
        torch.testing.assert_close(encoder.embed(b, "mean"), encoder.readout(h, b), atol=ATOL, rtol=0)


def test_token_override_is_a_translated_view(records):
    """forward(batch, tokens=...) runs on the given tokens: translating the fractional coordinates in the
    tokens equals collating translated records; and a translation changes the output (no hidden invariance)."""
    encoder = _encoder()
    rng = np.random.default_rng(3)
    shift = rng.uniform(size=3)
    b = _batch(records[:6])
    translated = [r.replace(frac_coords=r.frac_coords + shift) for r in records[:6]]
    tokens = b.tokens.clone()
    tokens[..., :3] = torch.remainder(tokens[..., :3] + torch.as_tensor(shift), 1.0)
    with torch.no_grad():
        torch.testing.assert_close(encoder(b, tokens=tokens), encoder(_batch(translated)), atol=1e-9, rtol=0)
        torch.testing.assert_close(encoder.embed(b, tokens=tokens), encoder.embed(_batch(translated)), atol=1e-9, rtol=0)
        assert (encoder.embed(b, tokens=tokens) - encoder.embed(b)).abs().max() > 1e-4


def test_fourier_coordinates_are_continuous_across_the_cell_boundary(records):
    """x = 1 − ε and x = ε + 2ε' are neighbours in the crystal; Fourier features see that, raw coordinates do not."""
    record = records[0]
    near_one = record.replace(frac_coords=np.full_like(record.frac_coords, 1.0 - 1e-7))
    near_zero = record.replace(frac_coords=np.full_like(record.frac_coords, 1e-7))
    for features, continuous in (("fourier", True), ("raw", False)):
        encoder = _encoder(coord_features=features)
        with torch.no_grad():
            gap = (encoder.embed(_batch([near_one])) - encoder.embed(_batch([near_zero]))).abs().max()
        assert (gap < 1e-4) == continuous, (features, float(gap))


def test_gradients_reach_tokens_and_float32(records):
    encoder = _encoder().float().train()
    b = collate(records[:4], BatchViews(tokens=True), dtype=torch.float32)
    tokens = b.tokens.clone().requires_grad_(True)
    loss = encoder(b, tokens=tokens).square().mean() + encoder.embed(b, tokens=tokens).square().mean()
    loss.backward()
    assert tokens.grad.dtype == torch.float32 and torch.isfinite(tokens.grad).all()
    assert tokens.grad[b.token_mask].abs().sum() > 0
    assert tokens.grad[~b.token_mask].abs().sum() == 0, "padded rows must not influence anything"


def test_missing_token_view_is_a_clear_error(records):
    encoder = _encoder()
    with pytest.raises(ValueError, match="BatchViews\\(tokens=True\\)"):
        encoder(collate(records[:2], BatchViews(), dtype=torch.float64))
