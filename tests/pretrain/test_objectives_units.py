"""Unit tests of the objectives' parts: configs, geometry, Shoemake, SIGReg, collapse metrics, DiT."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.record import lattice_polar6
from pretrain.objectives import build_objective
from pretrain.objectives.collapse import effective_rank, per_dim_std
from pretrain.objectives.dit import DiT, DiTConfig, pad_atoms, unpad_atoms
from pretrain.objectives.geometry import min_image_distance, polar6, random_rotation, wrap_centered
from pretrain.objectives.sigreg import SIGReg, gaussian_expectation

TOKENS = {"name": "jepa_transformer", "width": 32, "num_layers": 1, "heads": 4}




@pytest.mark.parametrize(
    "config, bad",
    [
        ({"name": "vae", "encoder": TOKENS, "latent_dims": 8}, "latent_dims"),
        ({"name": "jepa", "encoder": TOKENS, "tau": 0.1}, "tau"),
        ({"name": "latent_flow", "vae": {"encoder": TOKENS}, "dit": {"preset": "tiny", "depth": 3}}, "depth"),
        ({"name": "latent_flow", "vae": {"encoder": TOKENS, "alpha": 1}}, "alpha"),
    ],
)
def test_configs_reject_unknown_keys(config, bad):
    with pytest.raises(ValueError, match=bad):
        build_objective(config)


def test_configs_reject_bad_choices():
    with pytest.raises(ValueError, match="target_mode"):
        build_objective({"name": "vae", "encoder": TOKENS, "target_mode": "cartesian"})
    with pytest.raises(ValueError, match="guard"):
        build_objective({"name": "latent_flow", "vae": {"encoder": TOKENS}, "guard": "weights"})
    with pytest.raises(ValueError, match="loss"):
        build_objective({"name": "jepa", "encoder": TOKENS, "loss": "mse"})


def test_polar6_matches_numpy_and_is_rotation_invariant(mp20_records):
    lattices = torch.from_numpy(np.stack([r.lattice for r in mp20_records]))  # [64, 3, 3]
    expected = np.stack([lattice_polar6(r.lattice) for r in mp20_records])
    np.testing.assert_allclose(polar6(lattices).numpy(), expected, rtol=1e-9, atol=1e-9)
    rot, _ = random_rotation(len(lattices), torch.Generator().manual_seed(0), dtype=torch.float64)
    rotated = lattices @ rot.transpose(-1, -2)
    np.testing.assert_allclose(polar6(rotated).numpy(), expected, rtol=1e-9, atol=1e-9)


def test_shoemake_rotations_are_haar_uniform():
    rot, u = random_rotation(40000, torch.Generator().manual_seed(1), dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand_as(rot)
    assert torch.allclose(rot @ rot.transpose(-1, -2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(len(rot), dtype=torch.float64), atol=1e-12)
    assert u.shape == (40000, 3) and float(u.min()) >= 0 and float(u.max()) < 1
    # Haar moments: E[R] = 0, E[R_ij²] = 1/3, and the rotation angle has density (1 − cos θ)/π,
    # so E[cos θ] = −1/2 (i.e. E[tr R] = 0) — a biased sampler (e.g. Euler angles ~ U) fails these.
    assert float(rot.mean(0).abs().max()) < 0.02
    assert float((rot**2).mean(0).sub(1 / 3).abs().max()) < 0.01
    cos_angle = (rot.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    assert abs(float(cos_angle.mean()) + 0.5) < 0.01


def test_min_image_distance_against_brute_force(mp20_records):
    rng = np.random.default_rng(0)
    for record in mp20_records[:16]:
        d = rng.uniform(-2, 2, size=(5, 3))
        shifts = np.array(np.meshgrid(*[np.arange(-3, 4)] * 3)).reshape(3, -1).T  # [343, 3]
        brute = np.linalg.norm((d[:, None, :] + shifts[None]) @ record.lattice, axis=-1).min(1)
        lattice = torch.tensor(record.lattice).expand(5, 3, 3)
        got = min_image_distance(torch.from_numpy(d), lattice).numpy()
        np.testing.assert_allclose(got, brute, rtol=1e-9)
    assert float(wrap_centered(torch.tensor([0.5, -0.5, 1.25, -0.75])).sub(torch.tensor([-0.5, -0.5, 0.25, 0.25])).abs().max()) == 0


def test_sigreg_near_zero_on_gaussians_and_large_on_collapse():
    torch.manual_seed(0)
    sigreg = SIGReg(num_slices=256)
    m, d = 512, 64
    gaussian = sigreg(torch.randn(m, d))
    expected = gaussian_expectation()  # ≈ 1.06 for any M: EP is M × a squared distance of order 1/M
    assert 0.5 * expected < float(gaussian) < 2 * expected
    assert float(gaussian) / m < 5e-3  # per-sample distance from N(0, I) is near zero
    collapsed = sigreg(torch.randn(1, d).expand(m, d) + 1e-3 * torch.randn(m, d))
    squashed = sigreg(0.1 * torch.randn(m, d))  # spread but far from unit variance
    low_rank = sigreg(torch.randn(m, 2) @ torch.randn(2, d))  # dimensional collapse
    for bad in (collapsed, squashed, low_rank):
        assert float(bad) > 20 * float(gaussian)
    # and it is differentiable (it is a training loss)
    z = torch.randn(64, 8, requires_grad=True)
    sigreg(0.1 * z).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_collapse_metrics():
    torch.manual_seed(0)
    iso = torch.randn(4096, 16)
    assert 15.0 < effective_rank(iso) <= 16.0
    line = torch.randn(4096, 1) * torch.randn(1, 16)
    assert effective_rank(line) < 1.01
    assert float(per_dim_std(torch.ones(10, 4)).max()) == 0.0
    assert effective_rank(torch.ones(10, 4)) == 0.0


def _randomised_dit(latent_dim=8):
    torch.manual_seed(0)
    dit = DiT(latent_dim, DiTConfig(preset="tiny"))
    with torch.no_grad():  # adaLN-Zero starts at exactly 0 output; perturb so the test can fail
        for p in dit.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return dit.eval()


def test_dit_starts_at_zero_and_is_permutation_equivariant():
    torch.manual_seed(0)
    num_atoms = torch.tensor([3, 5, 1])
    batch_index = torch.repeat_interleave(torch.arange(3), num_atoms)
    x = torch.randn(int(num_atoms.sum()), 8)
    t = torch.tensor([0.1, 0.5, 0.9])
    xp, mask = pad_atoms(x, batch_index, num_atoms)
    assert torch.equal(unpad_atoms(xp, mask), x)
    assert DiT(8, DiTConfig(preset="tiny"))(xp, t, mask).abs().max() == 0  # adaLN-Zero

    dit = _randomised_dit()
    out = unpad_atoms(dit(xp, t, mask), mask)  # [N, 8]
    # shuffle atoms inside each crystal: outputs shuffle the same way
    perm = torch.argsort(batch_index.double() + torch.rand(len(x), dtype=torch.float64))
    outp = unpad_atoms(dit(*pad_atoms(x[perm], batch_index, num_atoms)[:1], t, mask), mask)
    torch.testing.assert_close(outp, out[perm], atol=1e-5, rtol=1e-5)
    # garbage in the padded slots changes nothing; other crystals change nothing
    garbage = xp.clone()
    garbage[~mask] = 100.0
    torch.testing.assert_close(unpad_atoms(dit(garbage, t, mask), mask), out, atol=1e-5, rtol=1e-5)
    alone = dit(xp[1:2, :5], t[1:2], mask[1:2, :5])[0]
    torch.testing.assert_close(alone, out[3:8], atol=1e-5, rtol=1e-5)
    # and it does depend on t and on the other atoms of its crystal (not a per-token MLP)
    assert (dit(xp, t.flip(0), mask) - dit(xp, t, mask)).abs().max() > 1e-3
    moved = xp.clone()
    moved[1, 0] += 1.0
    assert (dit(moved, t, mask)[1, 1:5] - dit(xp, t, mask)[1, 1:5]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "path", ["objective_vae.yaml", "objective_vae_paper.yaml", "objective_latent_flow.yaml",
             "objective_jepa.yaml", "objective_jepa_sigreg.yaml"],
)
def test_example_configs_build(path):
    import dataclasses
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / path).read_text())["objective"]
    objective = build_objective(config)
    # every key the file spells out is a real field, and defaults written there are the code's
    fields = {f.name: f for f in dataclasses.fields(objective.config)}
    assert set(config) - {"name"} <= set(fields)
    if path in ("objective_vae.yaml", "objective_latent_flow.yaml", "objective_jepa.yaml"):  # "every key with its default"
        defaults = dataclasses.asdict(type(objective.config)())
        assert set(config) - {"name"} == set(defaults)
        for key, value in config.items():
            if key != "name":
                assert value == defaults[key], (path, key)
    views = objective.batch_views()
    assert set(views) == {"graph", "tokens", "pdd_k"}
