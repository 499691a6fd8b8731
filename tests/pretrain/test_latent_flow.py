"""CrysLDNet stage 2 (joint latent flow matching) on real MP-20 crystals."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from data_pipeline.load.collate import BatchViews, collate
from pretrain.objectives import LossNorm, build_objective
from pretrain.release import build_with_init, load_pretrained, save_release

TOKENS = {"name": "jepa_transformer", "width": 32, "num_layers": 1, "heads": 4}
VAE = {"latent_dim": 16, "encoder": TOKENS}




def _flow(**overrides):
    return build_objective({"name": "latent_flow", "vae": VAE, "dit": {"preset": "tiny"}, **overrides})


def _batch(objective, records, dtype=torch.float32):
    return collate(records, BatchViews.from_dict(objective.batch_views()), dtype=dtype)


@pytest.mark.parametrize("guard", ["none", "vae", "stopgrad", "ema"])
def test_encoder_and_dit_receive_gradient(mp20_records, guard):
    torch.manual_seed(0)
    flow = _flow(guard=guard)
    batch = _batch(flow, mp20_records[:4])
    _train(flow, batch, 1)  # adaLN-Zero: the DiT's output, hence the gradient through its input, starts at 0
    flow.zero_grad()
    loss, metrics = flow.loss(batch)
    loss.backward()
    encoder_grad = sum(float(p.grad.abs().sum()) for p in flow.encoder.parameters() if p.grad is not None)
    dit_grad = sum(float(p.grad.abs().sum()) for p in flow.dit.parameters() if p.grad is not None)
    assert encoder_grad > 0 and dit_grad > 0
    assert {"flow_loss", "latent_variance", "latent_effective_rank"} <= set(metrics)
    assert ("vae_loss" in metrics) == (guard == "vae")
    if guard == "ema":
        assert all(p.grad is None for p in flow.ema_encoder.parameters())


def test_time_sampling_and_loss_weight():
    flow = _flow()
    fake = type("B", (), {"num_crystals": 20000, "atomic_numbers": torch.zeros(1)})()
    t = flow.draw_time(fake)
    assert float(t.min()) >= 0.01 and float(t.max()) <= 0.99 and abs(float(t.mean()) - 0.5) < 0.01


def _train(flow, batch, steps, lr=1e-3):
    optimiser = torch.optim.Adam(flow.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        loss, metrics = flow.loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        flow.after_step()
        history.append((float(loss), metrics))
    return history


@pytest.mark.slow
def test_flow_overfits_and_the_collapse_guard_changes_the_outcome(mp20_records):
    """Without a guard the jointly trained encoder shrinks its latents (the flow loss is easiest
    on a constant); the stop-gradient guard holds their variance up."""
    records = mp20_records[:8]
    outcome = {}
    for guard in ("none", "stopgrad"):
        torch.manual_seed(0)
        flow = _flow(guard=guard)
        history = _train(flow, _batch(flow, records), 80)
        losses = [h[0] for h in history]
        outcome[guard] = history[-1][1]["latent_variance"]
        if guard == "none":
            assert np.mean(losses[-5:]) < losses[0] / 10, (losses[0], losses[-5:])
    assert outcome["stopgrad"] > 5 * outcome["none"], outcome


def _keyed_draws(flow):
    """Noise that depends only on each crystal's key, so a crystal draws the same in any batch."""

    def seed(key):
        return zlib.crc32(key.encode())

    def draw_time(batch):
        return torch.tensor([0.01 + 0.98 * (seed(k) % 1000) / 1000 for k in batch.keys], dtype=torch.float64)

    def draw_prior(z1, batch):
        parts = []
        for key, n in zip(batch.keys, batch.num_atoms.tolist()):
            g = torch.Generator().manual_seed(seed(key))
            parts.append(torch.randn(n, z1.shape[-1], generator=g, dtype=z1.dtype))
        return torch.cat(parts)

    flow.draw_time, flow.draw_prior = draw_time, draw_prior


def test_loss_normalisation_matches_one_big_batch(mp20_records, summed_grads):
    torch.manual_seed(0)
    flow = _flow(guard="none").double().eval()
    with torch.no_grad():  # leave adaLN-Zero's exact zeros so the DiT path matters
        for p in flow.dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _keyed_draws(flow)
    part_a, part_b = mp20_records[:5], mp20_records[5:9]
    whole = _batch(flow, part_a + part_b, torch.float64)
    norm = LossNorm.of(whole)

    def grads(batches):
        return summed_grads(flow, batches, norm)

    loss_whole, g_whole = grads([whole])
    loss_parts, g_parts = grads([_batch(flow, part_a, torch.float64), _batch(flow, part_b, torch.float64)])
    assert abs(loss_whole - loss_parts) < 1e-10 * abs(loss_whole)
    for gw, gp in zip(g_whole, g_parts):
        torch.testing.assert_close(gw, gp, rtol=1e-8, atol=1e-12)


def test_stage_two_starts_from_a_stage_one_release(tmp_path, mp20_records):
    torch.manual_seed(0)
    vae_config = {"name": "vae", **VAE}
    vae = build_objective(vae_config)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p))
    release = save_release(vae, vae_config, tmp_path / "stage1", views=vae.batch_views())

    torch.manual_seed(1)
    flow = build_with_init({"name": "latent_flow", "init_from": str(release), "dit": {"preset": "tiny"}})
    for name, tensor in vae.state_dict().items():
        assert torch.equal(flow.vae.state_dict()[name], tensor), name
    assert flow.config.vae["latent_dim"] == VAE["latent_dim"]  # the config came from the release

    # the exported config rebuilds stage 2 without the stage-1 directory
    exported = flow.export_config()
    assert exported["init_from"] is None and exported["vae"]["encoder"] == TOKENS
    stage2 = save_release(flow, exported, tmp_path / "stage2")
    (release / "model.safetensors").unlink()
    loaded = load_pretrained(stage2)
    for name, tensor in flow.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # and stage 2 can itself be the starting point of another stage-2 run
    again = build_with_init({"name": "latent_flow", "init_from": str(stage2), "dit": {"preset": "tiny"}})
    assert torch.equal(again.vae.moments.weight, flow.vae.moments.weight)

    with pytest.raises(FileNotFoundError, match="init_from"):
        build_with_init({"name": "latent_flow", "init_from": str(tmp_path / "missing")})
