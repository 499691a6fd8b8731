"""The trainer in this process (a one-rank gloo group): accumulation over uneven micro-batches,
padding batches, bf16, and a real objective end to end with the real shard loader when present."""
from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.load.collate import collate
from pretrain.config import load_config
from pretrain_trainer_fixtures import Fixed, LinearEnergy, ListLoader

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(mp20_records):
    return mp20_records[:48]


def _trainer(tmp_path, loader, *overrides, objective=None):
    from pretrain.trainer import Trainer

    config = load_config(None, [f"run.root={tmp_path}", "run.name=t", "tracking.mlflow=false",
                                "checkpoint.resume=none", "optim.grad_clip=0", *overrides])
    torch.manual_seed(config.run.seed)
    return Trainer(config, objective=objective or LinearEnergy(dim=8), loader=loader, log=lambda s: None)


def _full_grads(trainer):
    import deepspeed

    return {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in trainer.engine.module.named_parameters()}


def test_accumulation_over_uneven_micro_batches_is_one_big_batch(tmp_path, records):
    parts = [records[0:1], records[1:6], records[6:8]]  # 1, 5 and 2 crystals: very different atom counts
    trainer = _trainer(tmp_path, Fixed([collate(p) for p in parts]), "train.grad_accum=3", "train.zero_stage=2")
    init = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    stats = trainer.forward_backward()
    got = _full_grads(trainer)
    reference = LinearEnergy(dim=8)
    reference.load_state_dict(init)
    big = collate(records[0:8])
    loss, _ = reference.loss(big)
    loss.backward()
    assert stats.atoms == big.num_nodes and stats.crystals == 8
    assert float(stats.loss) == pytest.approx(float(loss), rel=1e-6)  # shares add up to the big-batch mean
    for name, param in reference.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-6)
    trainer.optimizer_step()
    assert trainer.step == 1


def test_padding_batches_weigh_nothing(tmp_path, records):
    real = [collate(records[0:3]), collate(records[3:5])]
    pad = collate(records[10:14])
    pad.padding = True  # the loader's filler batch for ranks that ran out
    with_pad = _trainer(tmp_path, Fixed([real[0], pad, real[1]]), "train.grad_accum=3", "train.zero_stage=0")
    stats = with_pad.forward_backward()
    grads_pad = _full_grads(with_pad)
    plain = _trainer(tmp_path, Fixed(real), "train.grad_accum=2", "train.zero_stage=0")
    plain.forward_backward()
    grads = _full_grads(plain)
    assert stats.crystals == 5
    for name in grads:
        torch.testing.assert_close(grads_pad[name], grads[name], rtol=1e-6, atol=1e-7)


def test_bf16_trains(tmp_path, records, capsys):
    trainer = _trainer(tmp_path, ListLoader(records), "train.precision=bf16", "train.zero_stage=2", "train.max_steps=3",
                       "train.log_every=1", "checkpoint.every_steps=3", "optim.lr=0.01")
    summary = trainer.fit()
    assert summary["status"] == "finished" and summary["step"] == 3
    assert math.isfinite(summary["metrics"]["train/loss"]), summary["metrics"]
    # bf16 is autocast over fp32 weights (pretrain/precision.py): the release is those weights.
    assert trainer.engine.module.head.weight.dtype == torch.float32
    from pretrain.release import consolidate_fp32

    capsys.readouterr()
    state = consolidate_fp32(tmp_path / "t/checkpoints/step_00000003")
    printed = capsys.readouterr()
    assert "zero checkpoint" not in printed.out + printed.err  # DeepSpeed's consolidation prints only with verbose
    assert state["head.weight"].dtype == torch.float32
    torch.testing.assert_close(state["head.weight"], trainer.engine.module.head.weight.detach())
