"""Mixed precision (pretrain/precision.py): batches, targets and loss reductions stay fp32, only the
network runs under autocast. Real trainer steps (one-rank DeepSpeed engine, gloo) of the VAE on
PDDFormer and of JEPA, in bf16 against fp32 from the same initial weights and the same batches."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.load.collate import BatchViews, collate
from pretrain.config import load_config
from pretrain.objectives import build_objective
from pretrain_trainer_fixtures import Fixed

PDD = {"name": "pddformer", "width": 32, "num_layers": 2, "rbf_bins": 16, "pdd_k": 12}
TOKENS = {"name": "jepa_transformer", "width": 32, "num_layers": 2, "heads": 4}
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 0.2%); through a few layers of these small
# models the loss moves by well under 3%. A loss computed in bf16 end to end, or on rounded
# coordinates, is not what this bounds: the exactness of the inputs is asserted separately.
LOSS_RTOL = 3e-2


def test_batch_geometry_is_exact_under_autocast(mp20_records):
    batch = collate(mp20_records[:6], BatchViews.from_dict({"graph": {"kind": "knn", "k": 8, "cutoff": 5.0}}))
    plain_cart, plain_edges = batch.cart_coords(), batch.edge_vectors()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (batch.frac_coords @ batch.lattice[0]).dtype == torch.bfloat16  # autocast does lower matmuls
        cart, edges = batch.cart_coords(), batch.edge_vectors()
    assert cart.dtype == edges.dtype == torch.float32
    assert torch.equal(cart, plain_cart) and torch.equal(edges, plain_edges)


def _steps(tmp_path, objective_config, batches, precision, steps=2):
    """Losses of `steps` trainer steps, plus what the objective saw: input dtypes, bitwise-equal
    coordinates, whether autocast was on, the output dtype of an encoder layer."""
    from pretrain.trainer import Trainer

    config = load_config(None, [f"run.root={tmp_path}", f"run.name={precision}", "tracking.mlflow=false",
                                "checkpoint.resume=none", f"train.precision={precision}", "train.zero_stage=2",
                                "optim.lr=1e-3", "schedule.kind=constant"])
    torch.manual_seed(0)
    objective = build_objective(objective_config)
    seen = {"coords_exact": [], "dtypes": set(), "autocast": set(), "linear_out": set()}
    originals = [(b.frac_coords.clone(), b.lattice.clone()) for b in batches]

    def before(module, args):
        batch = args[0]
        seen["dtypes"].update({batch.frac_coords.dtype, batch.lattice.dtype})
        seen["coords_exact"].append(any(torch.equal(batch.frac_coords, f) and torch.equal(batch.lattice, l)
                                        for f, l in originals))
        seen["autocast"].add(torch.is_autocast_enabled("cpu"))

    objective.register_forward_pre_hook(before)
    linear = next(m for m in objective.encoder.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, a, out: seen["linear_out"].add(out.dtype))
    trainer = Trainer(config, objective=objective, loader=Fixed(batches), log=lambda s: None)
    losses = []
    for _ in range(steps):
        stats = trainer.train_step()
        losses.append(float(stats.loss))
    assert all(p.dtype == torch.float32 for p in trainer.engine.module.parameters())  # fp32 weights in both
    return losses, seen


def _compare(tmp_path, objective_config, batches):
    full, seen_full = _steps(tmp_path / "fp32", objective_config, batches, "fp32")
    mixed, seen_mixed = _steps(tmp_path / "bf16", objective_config, batches, "bf16")
    # The batch reaches the objective unrounded (fp32, bitwise the loader's) in both runs.
    for seen in (seen_full, seen_mixed):
        assert seen["dtypes"] == {torch.float32} and all(seen["coords_exact"]), seen
    # And the bf16 run really ran its network in bf16 (so the comparison below means something).
    assert seen_full["autocast"] == {False} and seen_full["linear_out"] == {torch.float32}
    assert seen_mixed["autocast"] == {True} and seen_mixed["linear_out"] == {torch.bfloat16}
    assert mixed != full
    for a, b in zip(mixed, full):
        assert a == pytest.approx(b, rel=LOSS_RTOL), (mixed, full)
    return full, mixed


@pytest.mark.slow
def test_vae_pddformer_steps_bf16_match_fp32(tmp_path, mp20_records):
    config = {"name": "vae", "latent_dim": 16, "encoder": PDD}
    views = BatchViews.from_dict(build_objective(config).batch_views())
    batches = [collate(mp20_records[i:i + 8], views) for i in (0, 8)]
    _compare(tmp_path, config, batches)


@pytest.mark.slow
def test_jepa_steps_bf16_match_fp32(tmp_path, mp20_records):
    config = {"name": "jepa", "encoder": TOKENS}
    views = BatchViews.from_dict(build_objective(config).batch_views())
    batches = [collate(mp20_records[i:i + 8], views) for i in (0, 8)]
    _compare(tmp_path, config, batches)
