"""The DDPM generator: token round trip, permutation equivariance, learning, seeded sampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.load.collate import collate
from pretrain.objectives import build_objective
from pretrain.objectives.dit import pad_atoms

SMALL = {"name": "ddpm", "layers": 2, "width": 64, "heads": 4, "dropout": 0.0, "steps": 32}


def test_tokens_decode_back_to_the_crystal(mp20_records):
    from data_pipeline.record import lattice_polar6

    objective = build_objective(SMALL)
    batch = collate(mp20_records[:4], dtype=torch.float64)
    x, mask = pad_atoms(objective.encode_tokens(batch), batch.batch_index, batch.num_atoms)
    for record, (z, frac, lattice) in zip(mp20_records[:4], objective.decode_tokens(x, mask)):
        np.testing.assert_array_equal(z, record.atomic_numbers)
        np.testing.assert_allclose(frac, record.frac_coords, atol=1e-9)
        np.testing.assert_allclose(lattice_polar6(lattice), lattice_polar6(record.lattice), atol=1e-6)


def test_denoiser_is_permutation_equivariant(mp20_records):
    torch.manual_seed(0)
    objective = build_objective(SMALL).double().eval()
    batch = collate(mp20_records[:3], dtype=torch.float64)
    x, mask = pad_atoms(objective.encode_tokens(batch), batch.batch_index, batch.num_atoms)
    t = torch.tensor([3, 10, 20])
    out = objective.denoiser(x, t, mask)
    # One predicted-noise row per padded slot; the mask marks exactly each crystal's atoms.
    assert out.shape == x.shape and x.shape[:2] == (3, int(batch.num_atoms.max()))
    assert mask.sum(dim=1).tolist() == batch.num_atoms.tolist()
    # permute only real atoms of crystal 0 that are all real in a fully-populated row
    n0 = int(batch.num_atoms[0])
    p0 = torch.randperm(n0)
    x2 = x.clone()
    x2[0, :n0] = x[0, p0]
    out2 = objective.denoiser(x2, t, mask)
    torch.testing.assert_close(out2[0, :n0], out[0, p0])
    torch.testing.assert_close(out2[1:], out[1:])


def _assert_permuting_crystal_0_permutes_its_output(objective, x, t, mask, out, n0):
    p0 = torch.randperm(n0)
    x2 = x.clone()
    x2[0, :n0] = x[0, p0]
    torch.testing.assert_close(objective.denoiser(x2, t, mask)[0, :n0], out[0, p0])


def _loss_before_and_after_training(objective, batch, steps=60):
    """The loss over 4 fixed draws (same timesteps and noise every time: a fair comparison) before and
    after `steps` Adam steps on the batch, and the last step's metrics."""
    optimizer = torch.optim.Adam(objective.parameters(), lr=2e-3)

    def fixed_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return float(sum(objective.loss(batch)[0] for _ in range(4)))

    before = fixed_loss()
    for _ in range(steps):
        loss, metrics = objective.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, fixed_loss(), metrics


def test_ddpm_learns_and_samples_reproducibly(mp20_records):
    torch.manual_seed(0)
    objective = build_objective(SMALL)
    batch = collate(mp20_records[:8])
    before, after, _ = _loss_before_and_after_training(objective, batch)
    assert after < 0.8 * before  # measured: about 0.69 after 60 steps
    # every batch seen in training mode (60 steps + 2 × 4 fixed evaluations) fed the atom-count histogram
    assert int(objective.atom_counts.sum()) == (60 + 8) * 8
    samples = objective.sample(5, seed=7, steps=8)
    again = objective.sample(5, seed=7, steps=8)
    assert [s.key for s in samples] == [f"ddpm:7-{i}" for i in range(5)]
    for a, b in zip(samples, again):
        np.testing.assert_array_equal(a.atomic_numbers, b.atomic_numbers)
        np.testing.assert_allclose(a.frac_coords, b.frac_coords)
        assert a.num_atoms in set(int(n) for n in batch.num_atoms)
        assert a.volume > 1.0 and np.all((a.atomic_numbers >= 1) & (a.atomic_numbers <= 100))


def _trained_briefly(records, steps=30):
    torch.manual_seed(0)
    objective = build_objective(SMALL)
    batch = collate(records)
    optimizer = torch.optim.Adam(objective.parameters(), lr=2e-3)
    for _ in range(steps):
        loss, _ = objective.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return objective, batch


def test_species_histogram_counts_every_training_atom(mp20_records):
    objective, batch = _trained_briefly(mp20_records[:8], steps=3)
    expected = torch.bincount(batch.atomic_numbers - 1, minlength=100) * 3
    torch.testing.assert_close(objective.species_counts, expected.to(objective.species_counts))
    trained = set(torch.nonzero(expected).flatten().add(1).tolist())
    mask = objective.allowed_species()
    assert set(torch.nonzero(mask).flatten().add(1).tolist()) == {z for z in trained if z <= 94}


def test_sampling_keeps_to_the_allowed_species(mp20_records):
    objective, batch = _trained_briefly(mp20_records[:8])
    trained = set(batch.atomic_numbers.tolist())
    # unrestricted, a briefly trained generator strays outside its training species (so the checks
    # below can fail); restricted, it never does
    free = objective.sample(12, seed=1, steps=8, species="all", max_z=None)
    assert set(np.concatenate([s.atomic_numbers for s in free]).tolist()) - trained
    for sample in objective.sample(12, seed=1, steps=8):
        assert set(sample.atomic_numbers.tolist()) <= trained
    picked = objective.sample(12, seed=1, steps=8, species=["Li", "O", 26])
    assert set(np.concatenate([s.atomic_numbers for s in picked]).tolist()) <= {3, 8, 26}
    for sample in objective.sample(12, seed=1, steps=8, species="all"):  # max_z 94 by default
        assert sample.atomic_numbers.max() <= 94


def test_decode_argmax_respects_the_species_mask():
    x = -torch.ones(1, 2, 3 + 100 + 6)
    x[0, 0, 3 + 1] = 1.0  # He wins the unmasked argmax on atom 0
    x[0, 0, 3 + 7] = 0.5  # O second
    x[0, 1, 3 + 94] = 1.0  # Am (Z = 95) on atom 1, then Fe
    x[0, 1, 3 + 25] = 0.2
    mask = torch.ones(1, 2, dtype=torch.bool)
    (z, _, _), = build_objective(SMALL).decode_tokens(x, mask)
    assert z.tolist() == [2, 95]
    allowed = torch.ones(100, dtype=torch.bool)
    allowed[[1, 94]] = False  # He and Am (index Z − 1) banned
    (z, _, _), = build_objective(SMALL).decode_tokens(x, mask, allowed)
    assert z.tolist() == [8, 26]


def test_release_without_species_histogram_still_loads(mp20_records):
    objective, batch = _trained_briefly(mp20_records[:4], steps=2)
    state = {k: v for k, v in objective.state_dict().items() if k != "species_counts"}
    old = build_objective(SMALL)
    old.load_state_dict(state, strict=True)
    assert float(old.species_counts.sum()) == 0
    mask = old.allowed_species()  # an empty histogram allows every Z up to max_z
    assert int(mask.sum()) == 94
    with pytest.raises(ValueError, match="no species"):
        old.allowed_species(["Cm"])  # Z = 96 > 94


def test_part_weights_blend_each_parts_own_mean():
    """part_weights: the loss is the weighted mean of the three parts' own ε-MSEs (hand-computed)."""
    from pretrain.objectives.ddpm import TOKEN

    objective = build_objective({**SMALL, "part_weights": [1, 2, 3]})
    eps = torch.zeros(1, 1, TOKEN)
    noise = torch.zeros(1, 1, TOKEN)
    noise[..., :3] = 1.0  # coordinates: mean squared error 1
    noise[..., 3:5] = 10.0  # species: 2 of 100 dims at 100 → mean 2
    noise[..., -6:] = 2.0  # lattice: mean 4
    expected = (1 * 1 + 2 * 2 + 3 * 4) / 6
    assert float(objective._weighted_mse(eps, noise)) == pytest.approx(expected)
    plain = build_objective(SMALL)._weighted_mse(eps, noise)  # the paper's mean over all 109 dims
    assert float(plain) == pytest.approx((3 * 1 + 2 * 100 + 6 * 4) / TOKEN)
    with pytest.raises(ValueError, match="part_weights"):
        build_objective({**SMALL, "part_weights": [1, -1, 1]})


def test_part_weights_train_and_log_each_part(mp20_records):
    objective = build_objective({**SMALL, "part_weights": [1, 1, 1]})
    loss, metrics = objective.loss(collate(mp20_records[:4]))
    loss.backward()
    assert {"loss/ddpm_eps_mse_coords", "loss/ddpm_eps_mse_species", "loss/ddpm_eps_mse_lattice"} <= set(metrics)
    assert objective.export_config()["part_weights"] == (1.0, 1.0, 1.0)
    assert build_objective(objective.export_config()).config == objective.config


def test_volume_model_recovers_element_volumes_and_rescales_samples(mp20_records):
    """The per-element volume model is least squares over the training crystals: on crystals
    built to have volume 10·n_Na + 30·n_Cl it recovers 10 and 30, and volume='composition' gives
    every sample exactly the volume its composition predicts (shape and coordinates kept)."""
    from data_pipeline.record import CrystalRecord

    objective = build_objective(SMALL)
    assert objective.element_volumes() is None  # never trained
    with pytest.raises(ValueError, match="volume model"):
        objective.sample(2, seed=0, steps=4, volume="composition")
    crystals = []
    for i, (na, cl) in enumerate([(1, 1), (2, 1), (1, 3), (4, 4), (2, 5)]):
        z = np.array([11] * na + [17] * cl)
        volume = 10.0 * na + 30.0 * cl
        lattice = np.diag([1.0, 1.3, 0.8]) * (volume / (1.0 * 1.3 * 0.8)) ** (1 / 3)
        frac = np.random.default_rng(i).random((len(z), 3))
        crystals.append(CrystalRecord(f"x{i}", "test", z, frac, lattice))
    objective.train()
    objective.loss(collate(crystals))
    volumes = objective.element_volumes()
    assert float(volumes[10]) == pytest.approx(10.0, rel=1e-4) and float(volumes[16]) == pytest.approx(30.0, rel=1e-4)
    objective.species_counts.zero_()
    objective.species_counts[[10, 16]] = 1.0
    free = objective.sample(6, seed=3, steps=4)
    scaled = objective.sample(6, seed=3, steps=4, volume="composition")
    for a, b in zip(free, scaled):
        na, cl = int((b.atomic_numbers == 11).sum()), int((b.atomic_numbers == 17).sum())
        assert b.volume == pytest.approx(float(volumes[10]) * na + float(volumes[16]) * cl, rel=1e-9)
        np.testing.assert_array_equal(a.atomic_numbers, b.atomic_numbers)
        np.testing.assert_allclose(a.frac_coords, b.frac_coords)
        np.testing.assert_allclose(a.lattice / np.cbrt(a.volume), b.lattice / np.cbrt(b.volume), atol=1e-9)
    # an older release without the buffers loads with an empty model
    state = {k: v for k, v in objective.state_dict().items() if not k.startswith("volume_")}
    fresh = build_objective(SMALL)
    fresh.load_state_dict(state, strict=True)
    assert fresh.element_volumes() is None


def test_self_conditioned_ddpm_reads_its_estimate_trains_and_samples(mp20_records):
    torch.manual_seed(0)
    objective = build_objective({**SMALL, "self_condition": True})
    assert objective.denoiser.embed.in_features == 2 * 109  # [x_t ‖ x̂0]
    batch = collate(mp20_records[:4])
    x, mask = pad_atoms(objective.encode_tokens(batch), batch.batch_index, batch.num_atoms)
    t = torch.tensor([3, 10, 20, 30])
    objective.eval()
    plain = objective.denoiser(x, t, mask)
    # no estimate means a zero estimate, and a non-zero one changes the prediction
    torch.testing.assert_close(plain, objective.denoiser(x, t, mask, torch.zeros_like(x)))
    assert not torch.allclose(plain, objective.denoiser(x, t, mask, x))
    objective.train()
    optimizer = torch.optim.Adam(objective.parameters(), lr=2e-3)
    for _ in range(5):  # both training branches (with and without an estimate) backpropagate
        loss, _ = objective.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    a = objective.sample(3, seed=1, steps=6)
    b = objective.sample(3, seed=1, steps=6)
    for x1, x2 in zip(a, b):
        np.testing.assert_allclose(x1.frac_coords, x2.frac_coords)


def test_pair_bias_denoiser_is_equivariant_sees_geometry_and_starts_geometry_blind(mp20_records):
    torch.manual_seed(0)
    objective = build_objective({**SMALL, "pair_frequencies": 3}).double().eval()
    blind = build_objective(SMALL).double().eval()
    blind.load_state_dict({k: v for k, v in objective.state_dict().items() if "pair_bias" not in k})
    batch = collate(mp20_records[:3], dtype=torch.float64)
    x, mask = pad_atoms(objective.encode_tokens(batch), batch.batch_index, batch.num_atoms)
    t = torch.tensor([3, 10, 20])
    out = objective.denoiser(x, t, mask)
    # zero-initialised bias: exactly the geometry-blind denoiser at the start (padding handled alike)
    torch.testing.assert_close(out[mask], blind.denoiser(x, t, mask)[mask])
    for linear in objective.denoiser.pair_bias:
        torch.nn.init.normal_(linear.weight, std=1.0)
    out = objective.denoiser(x, t, mask)
    assert not torch.allclose(out[mask], blind.denoiser(x, t, mask)[mask])
    _assert_permuting_crystal_0_permutes_its_output(objective, x, t, mask, out, int(batch.num_atoms[0]))
    # the features are periodic: shifting one atom by a whole cell changes nothing
    x3 = x.clone()
    x3[0, 0, 0] += 2.0  # token 2·frac − 1: +2 is frac + 1
    features, shifted = objective.denoiser.pair_features(x), objective.denoiser.pair_features(x3)
    torch.testing.assert_close(features, shifted)
    # and padded slots do not leak into real atoms
    x4 = x.clone()
    x4[~mask] = 5.0
    torch.testing.assert_close(objective.denoiser(x4, t, mask)[mask], out[mask])
    # the written-out layer equals PyTorch's own layer (training path, per-head float mask), and
    # float32 inference under no_grad (where PyTorch would take its NaN-prone fast path) is finite
    layer = objective.denoiser.layers[0].train()
    h = torch.randn(3, x.shape[1], 64, dtype=torch.float64)
    bias = torch.randn(3, 4, x.shape[1], x.shape[1], dtype=torch.float64)
    from pretrain.objectives.ddpm import biased_layer

    torch.testing.assert_close(biased_layer(layer, h, bias), layer(h, src_mask=bias.reshape(12, *bias.shape[2:])))
    single = objective.float().eval()
    with torch.no_grad():
        inferred = single.denoiser(x.float(), t, mask)
    assert torch.isfinite(inferred[mask]).all()
    torch.testing.assert_close(inferred[mask].double(), out[mask], atol=1e-4, rtol=1e-4)
    objective.double().train()
    loss, _ = objective.loss(collate(mp20_records[:3], dtype=torch.float64))
    loss.backward()
    assert objective.denoiser.pair_bias[0].weight.grad.abs().sum() > 0


def test_training_statistics_survive_a_cast_to_fp16(mp20_records):
    """DeepSpeed's fp16 mode casts the module with .half(): the weights go to fp16, the counts and
    the volume model's sums stay in their own dtypes (fp16 would turn a gram entry of 70,000 into inf)."""
    objective = build_objective(SMALL)
    objective.train()
    objective.loss(collate(mp20_records[:4]))
    objective.volume_gram[0, 0] = 70_000.0
    objective.half()
    assert objective.denoiser.embed.weight.dtype == torch.float16
    assert objective.volume_gram.dtype == torch.float64 and objective.volume_rhs.dtype == torch.float64
    assert objective.atom_counts.dtype == torch.float32 and objective.species_counts.dtype == torch.float32
    assert float(objective.volume_gram[0, 0]) == 70_000.0
    objective.float()
    assert objective.denoiser.embed.weight.dtype == torch.float32


# ---------------------------------------------------------------- wrapped (periodic) coordinates
WRAPPED = {**SMALL, "coordinates": "wrapped"}


@pytest.mark.parametrize("sigma", [0.005, 0.05, 0.3, 0.5])
def test_wrapped_normal_score_is_the_derivative_of_its_log_density(sigma):
    from pretrain.objectives.ddpm import wrapped_normal_neg_score

    def log_density(x, images=20):  # the wrapped normal summed over many more images than the score uses
        k = torch.arange(-images, images + 1, dtype=torch.float64)
        return torch.logsumexp(-((x.unsqueeze(-1) + k) ** 2) / (2 * sigma**2), -1)

    x = (torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) - 0.5)
    x.requires_grad_(True)
    (gradient,) = torch.autograd.grad(log_density(x).sum(), x)
    neg_score = wrapped_normal_neg_score(x.detach(), torch.full_like(x, sigma))
    # (the objective only ever passes displacements wrapped to [−½, ½), where ±3 images suffice)
    torch.testing.assert_close(neg_score, -gradient, atol=1e-8 / sigma**2, rtol=1e-7)


def test_wrapped_score_norms_match_the_gaussian_limit_and_vanish_when_uniform():
    from pretrain.objectives.ddpm import wrapped_score_norms, wrapped_sigmas

    sigmas = wrapped_sigmas(256, 0.005, 0.5)
    assert float(sigmas[0]) == pytest.approx(0.005) and float(sigmas[-1]) == pytest.approx(0.5)
    norms = wrapped_score_norms(sigmas)
    # small σ: the wrapped normal is a normal, E[score²] = 1/σ² (Monte Carlo over 20,000 draws: ±3 %)
    assert float(norms[0] * sigmas[0] ** 2) == pytest.approx(1.0, rel=0.03)
    # σ = 0.5: nearly uniform on the torus, the score almost vanishes (< 2 % of the Gaussian value)
    assert float(norms[-1] * sigmas[-1] ** 2) < 0.02


def test_wrapped_noise_moves_each_atom_by_sigma_z_on_the_torus_and_targets_its_score(mp20_records):
    torch.manual_seed(0)
    objective = build_objective(WRAPPED).double()
    assert "coord_sigmas" not in objective.state_dict()  # recomputed from the config
    batch = collate(mp20_records[:4], dtype=torch.float64)
    x0, _ = pad_atoms(objective.encode_tokens(batch), batch.batch_index, batch.num_atoms)
    t = torch.tensor([0, 0, 5, 31])
    torch.manual_seed(1)
    xt, target = objective._wrap_coordinates(x0, x0.clone(), torch.zeros_like(x0), t)
    torch.manual_seed(1)
    z = torch.randn_like(x0[..., :3])
    sigma = objective.coord_sigmas[t].double().view(-1, 1, 1)
    frac0, frac_t = (x0[..., :3] + 1) / 2, (xt[..., :3] + 1) / 2
    assert float(frac_t.min()) >= 0 and float(frac_t.max()) < 1
    moved = torch.remainder(frac_t - frac0 - sigma * z + 0.5, 1.0) - 0.5  # 0 on the torus
    assert float(moved.abs().max()) < 1e-6
    # at the smallest σ the normalised target is z itself (score −z/σ, root-mean-square 1/σ)
    torch.testing.assert_close(target[:2, :, :3], z[:2], atol=0.05, rtol=0.05)
    torch.testing.assert_close(xt[..., 3:], x0[..., 3:])  # species and lattice keep the DDPM's noise
    torch.testing.assert_close(target[..., 3:], torch.zeros_like(x0[..., 3:]))


def test_wrapped_denoiser_reads_coordinates_periodically(mp20_records):
    torch.manual_seed(0)
    objective = build_objective({**WRAPPED, "self_condition": True}).double().eval()
    assert objective.denoiser.embed.in_features == 2 * (109 + 3)  # sin/cos per axis, for x_t and x̂0
    batch = collate(mp20_records[:3], dtype=torch.float64)
    x, mask = pad_atoms(objective.encode_tokens(batch), batch.batch_index, batch.num_atoms)
    t = torch.tensor([3, 10, 20])
    out = objective.denoiser(x, t, mask, x)
    shifted = x.clone()
    shifted[..., :3] += 2.0  # every atom by a whole cell
    torch.testing.assert_close(objective.denoiser(shifted, t, mask, shifted), out)


class _Oracle(torch.nn.Module):
    """The exact denoiser of a one-crystal data set: the DDPM's ε of its tokens, and the wrapped
    normal's normalised −score around its fractional coordinates."""

    def __init__(self, objective, x0):
        super().__init__()
        self.x0 = x0
        self.abar, self.sigmas, self.norms = objective.alphas_cumprod, objective.coord_sigmas, objective.coord_score_norms

    def forward(self, x, t, mask, x0_estimate=None):
        from pretrain.objectives.ddpm import wrapped_normal_neg_score

        abar = self.abar[t].view(-1, 1, 1)
        eps = (x - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        sigma = self.sigmas[t].view(-1, 1, 1).expand_as(x[..., :3])
        delta = torch.remainder((x[..., :3] - self.x0[..., :3]) / 2 + 0.5, 1.0) - 0.5
        score = wrapped_normal_neg_score(delta, sigma) / self.norms[t].sqrt().view(-1, 1, 1)
        return torch.cat([score, eps[..., 3:]], dim=-1)


@pytest.mark.parametrize("corrector_lr", [0.0, 1e-5])
def test_wrapped_sampler_with_the_exact_score_returns_the_one_training_crystal(mp20_records, corrector_lr):
    """The reverse chain (predictor, optionally with the Langevin corrector) is right when an exact
    denoiser makes it land on the data: the crystal's species, lattice and, on the torus, coordinates."""
    from data_pipeline.record import lattice_polar6

    record = mp20_records[0]
    objective = build_objective({**WRAPPED, "steps": 64})
    batch = collate([record])
    x0, _ = pad_atoms(objective.encode_tokens(batch), batch.batch_index, batch.num_atoms)
    objective.atom_counts[record.num_atoms] = 1.0
    objective.denoiser = _Oracle(objective, x0)
    (sample,) = objective.sample(1, seed=3, steps=64, species="all", max_z=None, corrector_lr=corrector_lr)
    np.testing.assert_array_equal(sample.atomic_numbers, record.atomic_numbers)
    off = np.remainder(sample.frac_coords - record.frac_coords + 0.5, 1.0) - 0.5
    assert np.abs(off).max() < 0.02  # σ_begin = 0.005: the last step leaves ~σ of noise per axis
    np.testing.assert_allclose(lattice_polar6(sample.lattice), lattice_polar6(record.lattice), atol=0.05)


def test_wrapped_ddpm_learns_samples_reproducibly_and_reloads(mp20_records):
    torch.manual_seed(0)
    objective = build_objective({**WRAPPED, "self_condition": True, "pair_frequencies": 2})
    batch = collate(mp20_records[:8])
    before, after, metrics = _loss_before_and_after_training(objective, batch)
    assert after < 0.8 * before
    assert set(metrics) >= {"loss/ddpm_eps_mse_coords", "loss/ddpm_eps_mse_species"}
    a = objective.sample(4, seed=2, steps=8, corrector_lr=1e-5)
    b = objective.sample(4, seed=2, steps=8, corrector_lr=1e-5)
    for x1, x2 in zip(a, b):
        np.testing.assert_allclose(x1.frac_coords, x2.frac_coords)
        assert np.all((x1.frac_coords >= 0) & (x1.frac_coords < 1))
    fresh = build_objective(objective.export_config())
    fresh.load_state_dict(objective.state_dict(), strict=True)
    for x1, x2 in zip(a, fresh.sample(4, seed=2, steps=8, corrector_lr=1e-5)):
        np.testing.assert_allclose(x1.frac_coords, x2.frac_coords)


def test_coordinates_option_is_checked():
    with pytest.raises(ValueError, match="coordinates must be 'gaussian' or 'wrapped'"):
        build_objective({**SMALL, "coordinates": "torus"})
    with pytest.raises(ValueError, match="coordinate_head must be 'linear' or 'pair'"):
        build_objective({**SMALL, "coordinate_head": "edges"})
    with pytest.raises(ValueError, match="corrector_lr must be"):
        build_objective({**WRAPPED, "corrector_lr": -1e-5})
    gaussian = build_objective(SMALL)
    gaussian.atom_counts[2] = 1.0
    with pytest.raises(ValueError, match="needs a step ≥ 0 and a generator trained with coordinates: wrapped"):
        gaussian.sample(1, steps=2, corrector_lr=1e-5)


def test_pair_coordinate_head_starts_at_zero_and_is_periodic_equivariant_and_padding_proof(mp20_records):
    from pretrain.objectives.ddpm import PairCoordinateHead

    torch.manual_seed(0)
    objective = build_objective({**WRAPPED, "coordinate_head": "pair"}).double().eval()
    plain = build_objective(WRAPPED).double().eval()
    plain.load_state_dict({k: v for k, v in objective.state_dict().items() if "coordinate_head" not in k})
    batch = collate(mp20_records[:3], dtype=torch.float64)
    x, mask = pad_atoms(objective.encode_tokens(batch), batch.batch_index, batch.num_atoms)
    t = torch.tensor([3, 10, 20])
    # zero-initialised coefficients: exactly the per-atom linear output at the start
    torch.testing.assert_close(objective.denoiser(x, t, mask)[mask], plain.denoiser(x, t, mask)[mask])

    head = PairCoordinateHead(16).double()
    torch.nn.init.normal_(head.coefficients.weight)
    h = torch.randn(3, x.shape[1], 16, dtype=torch.float64)
    frac = (x[..., :3] + 1) / 2
    out = head(h, frac, mask)
    assert float(out[mask].abs().max()) > 0
    # a translation of the whole crystal, and a whole-cell shift of one atom, change nothing
    torch.testing.assert_close(head(h, frac + torch.tensor([0.3, -0.1, 0.7], dtype=torch.float64), mask), out)
    moved = frac.clone()
    moved[0, 1] += torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(head(h, moved, mask), out)
    # permuting the atoms permutes the output; padded slots do not reach real atoms
    n0 = int(batch.num_atoms[0])
    p0 = torch.randperm(n0)
    h2, f2 = h.clone(), frac.clone()
    h2[0, :n0], f2[0, :n0] = h[0, p0], frac[0, p0]
    torch.testing.assert_close(head(h2, f2, mask)[0, :n0], out[0, p0])
    h3, f3 = h.clone(), frac.clone()
    h3[~mask], f3[~mask] = 7.0, 0.123
    torch.testing.assert_close(head(h3, f3, mask)[mask], out[mask])
    # one isolated atom gets no displacement from itself (sin 0 = 0)
    single = torch.ones(1, 1, dtype=torch.bool)
    torch.testing.assert_close(head(h[:1, :1], frac[:1, :1], single), torch.zeros(1, 1, 3, dtype=torch.float64))


CSPNET = {**SMALL, "coordinates": "wrapped", "denoiser": "cspnet", "pair_frequencies": 3}


@pytest.mark.parametrize("denoiser", ["cspnet", "hybrid"])
def test_cspnet_denoiser_is_translation_invariant_periodic_equivariant_and_padding_proof(mp20_records, denoiser):
    torch.manual_seed(0)
    objective = build_objective({**CSPNET, "denoiser": denoiser, "self_condition": True}).double().eval()
    assert (objective.denoiser.attention is not None) == (denoiser == "hybrid")
    batch = collate(mp20_records[:3], dtype=torch.float64)
    x, mask = pad_atoms(objective.encode_tokens(batch), batch.batch_index, batch.num_atoms)
    x = x + 0.3 * torch.randn_like(x)  # noisy tokens: every atom's lattice part differs, as in training
    x[..., :3] = 2 * torch.remainder((x[..., :3] + 1) / 2, 1.0) - 1
    t = torch.tensor([3, 10, 20])
    out = objective.denoiser(x, t, mask)
    assert out.shape == x.shape and bool(torch.isfinite(out[mask]).all())

    def shifted(tokens, shift):  # fractional coordinates moved by `shift`, back in the cell
        moved = tokens.clone()
        moved[..., :3] = 2 * torch.remainder((tokens[..., :3] + 1) / 2 + shift, 1.0) - 1
        return moved

    # translating the crystal, or moving one atom by a whole cell vector, changes nothing: the atoms read
    # no absolute position, only the pairs' Δfrac through periodic features
    torch.testing.assert_close(objective.denoiser(shifted(x, torch.tensor([0.3, -0.1, 0.7], dtype=torch.float64)), t, mask), out)
    whole_cell = torch.zeros_like(x[..., :3])
    whole_cell[0, 1] = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    moved = x.clone()
    moved[..., :3] = x[..., :3] + 2 * whole_cell
    torch.testing.assert_close(objective.denoiser(moved, t, mask), out)
    # the geometry is read: moving one atom within the cell changes its neighbours' outputs
    nudged = x.clone()
    nudged[0, 0, :3] += 0.2
    assert float((objective.denoiser(nudged, t, mask)[0, 1] - out[0, 1]).abs().max()) > 1e-4
    # permuting the atoms permutes the output; padded slots (garbage included) do not reach real atoms
    _assert_permuting_crystal_0_permutes_its_output(objective, x, t, mask, out, int(batch.num_atoms[0]))
    x3 = x.clone()
    x3[~mask] = 5.0
    torch.testing.assert_close(objective.denoiser(x3, t, mask)[mask], out[mask])
    # one isolated atom receives no message and is still defined
    single = objective.denoiser(x[:1, :1], t[:1], torch.ones(1, 1, dtype=torch.bool))
    assert bool(torch.isfinite(single).all())


@pytest.mark.parametrize("denoiser", ["cspnet", "hybrid"])
def test_cspnet_ddpm_learns_samples_reproducibly_and_reloads(mp20_records, denoiser):
    torch.manual_seed(0)
    objective = build_objective({**CSPNET, "denoiser": denoiser, "self_condition": True, "coordinate_head": "pair"})
    batch = collate(mp20_records[:8])
    before, after, _ = _loss_before_and_after_training(objective, batch)
    assert after < 0.8 * before
    a = objective.sample(4, seed=2, steps=8)
    fresh = build_objective(objective.export_config())
    fresh.load_state_dict(objective.state_dict(), strict=True)
    for x1, x2 in zip(a, fresh.sample(4, seed=2, steps=8)):
        np.testing.assert_array_equal(x1.atomic_numbers, x2.atomic_numbers)
        np.testing.assert_allclose(x1.frac_coords, x2.frac_coords)


def test_denoiser_option_is_checked():
    with pytest.raises(ValueError, match="denoiser must be 'transformer', 'cspnet' or 'hybrid'"):
        build_objective({**SMALL, "denoiser": "gnn"})
    for denoiser in ("cspnet", "hybrid"):
        with pytest.raises(ValueError, match=f"denoiser '{denoiser}' reads .* set pair_frequencies ≥ 1"):
            build_objective({**CSPNET, "denoiser": denoiser, "pair_frequencies": 0})


def test_species_temperature_one_is_ancestral_sampling_and_zero_removes_the_species_noise(mp20_records):
    objective, _ = _trained_briefly(mp20_records[:8], steps=10)
    plain = objective.sample(4, seed=5, steps=6)
    for a, b in zip(plain, objective.sample(4, seed=5, steps=6, species_temperature=1.0)):
        np.testing.assert_array_equal(a.atomic_numbers, b.atomic_numbers)
        np.testing.assert_allclose(a.frac_coords, b.frac_coords)
    cold = objective.sample(4, seed=5, steps=6, species_temperature=0.0)
    assert any(not np.allclose(a.frac_coords, b.frac_coords) for a, b in zip(plain, cold))

    class Blind(torch.nn.Module):  # predicts no noise whatever it reads: each token part then evolves on its own
        def forward(self, x, t, mask, x0_estimate=None):
            return torch.zeros_like(x)

    objective.denoiser = Blind()
    plain = objective.sample(4, seed=5, steps=6, species="all", max_z=None)
    cold = objective.sample(4, seed=5, steps=6, species="all", max_z=None, species_temperature=0.0)
    # the temperature scales the species' noise only: coordinates and lattice are drawn exactly as before
    for a, b in zip(plain, cold):
        np.testing.assert_allclose(a.frac_coords, b.frac_coords)
        np.testing.assert_allclose(a.lattice, b.lattice)
    assert any(not np.array_equal(a.atomic_numbers, b.atomic_numbers) for a, b in zip(plain, cold))
    with pytest.raises(ValueError, match="species_temperature must be ≥ 0"):
        objective.sample(1, steps=2, species_temperature=-0.5)


def test_softmax_species_output_gives_the_epsilon_of_its_softmax_and_a_cross_entropy_loss(mp20_records):
    torch.manual_seed(0)
    objective = build_objective({**CSPNET, "species_output": "softmax", "part_weights": [0, 1, 0]}).double()
    batch = collate(mp20_records[:3], dtype=torch.float64)
    x0, mask = pad_atoms(objective.encode_tokens(batch), batch.batch_index, batch.num_atoms)
    t = torch.tensor([0, 12, 31])
    abar = objective.alphas_cumprod[t].double().view(-1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn_like(x0)
    eps, logits = objective.predict(xt, t, mask)
    species = slice(3, 103)
    # the ε handed to the sampler inverts to x̂0 = 2·softmax(logits) − 1 at every step, t = 0 included
    torch.testing.assert_close(objective.x0_from_eps(xt, eps, abar)[..., species], 2 * logits.softmax(-1) - 1)
    # the other parts are the denoiser's own output
    raw = objective.denoiser(xt, t, mask)
    torch.testing.assert_close(eps[..., :3], raw[..., :3])
    torch.testing.assert_close(eps[..., 103:], raw[..., 103:])

    class Uniform(torch.nn.Module):  # every species equally likely: the cross-entropy is ln 100 on every atom
        def forward(self, x, t, mask, x0_estimate=None):
            return torch.zeros_like(x)

    objective.denoiser = Uniform()
    loss, metrics = objective.loss(batch)
    assert float(loss) == pytest.approx(np.log(100))
    assert metrics["loss/ddpm_species_ce"] == pytest.approx(np.log(100))
    # the ε form is the same as before for the default, and the plain mean's weights are the dimensions' counts
    plain = build_objective({**SMALL}).double()
    plain.denoiser = Uniform()
    torch.manual_seed(1)
    loss, _ = plain.loss(batch)
    torch.manual_seed(1)
    x0, mask = pad_atoms(plain.encode_tokens(batch), batch.batch_index, batch.num_atoms)
    torch.randint(0, plain.config.steps, (batch.num_crystals,))
    noise = torch.randn_like(x0)
    assert float(loss) == pytest.approx(float((noise**2).mean(-1)[mask].mean()))


def test_softmax_species_ddpm_learns_and_samples_the_trained_species(mp20_records):
    torch.manual_seed(0)
    objective = build_objective({**CSPNET, "species_output": "softmax", "self_condition": True, "part_weights": [1, 1, 1]})
    batch = collate(mp20_records[:8])
    before, after, metrics = _loss_before_and_after_training(objective, batch)
    assert after < 0.8 * before and "loss/ddpm_species_ce" in metrics
    trained = {int(z) for z in batch.atomic_numbers}
    for crystal in objective.sample(4, seed=2, steps=8):
        assert set(crystal.atomic_numbers.tolist()) <= trained


def test_species_output_option_is_checked():
    with pytest.raises(ValueError, match="species_output must be 'eps', 'softmax' or 'posterior'"):
        build_objective({**SMALL, "species_output": "logits"})


def test_posterior_species_output_adds_the_exact_likelihood_of_the_noisy_one_hot(mp20_records):
    """With a context-blind network (zero logits) the species x̂0 is the exact posterior mean of one token's
    species under a uniform prior: p(k | x_t) ∝ N(x_t | √ᾱ(2e_k − 1), (1 − ᾱ)I), computed here by brute force."""
    objective = build_objective({**SMALL, "species_output": "posterior"}).double()

    class Blind(torch.nn.Module):
        def forward(self, x, t, mask, x0_estimate=None):
            return torch.zeros_like(x)

    objective.denoiser = Blind()
    batch = collate(mp20_records[:2], dtype=torch.float64)
    x0, mask = pad_atoms(objective.encode_tokens(batch), batch.batch_index, batch.num_atoms)
    t = torch.tensor([4, 8])
    abar = objective.alphas_cumprod[t].double().view(-1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn_like(x0)
    eps, logits = objective.predict(xt, t, mask)
    candidates = 2 * torch.eye(100, dtype=torch.float64) - 1  # [K, 100] every species' one-hot
    species = xt[..., 3:103].unsqueeze(-2)  # [B, L, 1, 100]
    log_likelihood = -((species - abar.unsqueeze(-1).sqrt() * candidates) ** 2).sum(-1) / (2 * (1 - abar))
    posterior = log_likelihood.softmax(-1)  # [B, L, K]
    torch.testing.assert_close(objective.x0_from_eps(xt, eps, abar)[..., 3:103], 2 * posterior - 1)
    # at moderate noise it recovers the species better than chance (the evidence is used)
    assert float((posterior.argmax(-1) == x0[..., 3:103].argmax(-1))[mask].double().mean()) > 0.5
