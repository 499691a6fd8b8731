"""Heads, readouts, target normalisation and the self-contained model directory."""
from __future__ import annotations

import json

import pytest
import torch

from data_pipeline.load.collate import collate
from finetune.heads import AttentionReadout, PropertyHead, PropertyModel, TargetNormalizer


def test_normalizer_round_trip_and_serialisation():
    y = torch.tensor([-3.2, 0.5, 1.25, 7.0, float("nan")], dtype=torch.float64)
    norm = TargetNormalizer.fit(y)
    finite = y[torch.isfinite(y)]
    z = norm.normalize(finite)
    assert abs(float(z.mean())) < 1e-9 and abs(float(z.std(unbiased=False)) - 1.0) < 1e-9
    torch.testing.assert_close(norm.denormalize(z), finite)
    again = TargetNormalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again == norm
    assert TargetNormalizer.fit(torch.tensor([2.0, 2.0])).std == 1.0  # constant target: no division by 0
    assert TargetNormalizer.fit(y, "none") == TargetNormalizer()
    with pytest.raises(ValueError, match="standard"):
        TargetNormalizer.fit(y, "minmax")


def test_attention_readout_is_a_convex_combination_per_crystal():
    torch.manual_seed(0)
    readout = AttentionReadout(4)
    batch_index = torch.tensor([0, 0, 0, 1, 1])
    constant = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3 + [[-1.0, 0.0, 5.0, 2.0]] * 2)
    # identical atoms → the pooled vector is that atom, whatever the scores
    torch.testing.assert_close(readout(constant, batch_index, 2), torch.stack([constant[0], constant[3]]))
    h = torch.randn(5, 4)
    pooled = readout(h, batch_index, 2)
    permuted = readout(h[[2, 0, 1, 4, 3]], batch_index, 2)  # atom order inside a crystal is irrelevant
    torch.testing.assert_close(pooled, permuted)
    assert (pooled[0] <= h[:3].max(0).values + 1e-6).all() and (pooled[0] >= h[:3].min(0).values - 1e-6).all()


@pytest.mark.parametrize("readout", ["mean", "sum", "attention"])
def test_head_readouts_and_linear_probe(readout):
    h = torch.randn(7, 8)
    batch_index = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    num_atoms = torch.tensor([2, 3, 2])
    head = PropertyHead(8, readout, hidden=(16,))
    assert head(h, batch_index, num_atoms).shape == (3,)
    probe = PropertyHead(8, readout, hidden=())
    assert [type(m).__name__ for m in probe.mlp] == ["Linear"]
    if readout == "sum":
        torch.testing.assert_close(head.pool(h, batch_index, num_atoms)[0], h[:2].sum(0))
    if readout == "mean":
        torch.testing.assert_close(head.pool(h, batch_index, num_atoms)[1], h[2:5].mean(0))


def test_model_dir_round_trip_predicts_identically(tmp_path, tiny_encoder, mp20_records):
    from finetune.backbone import views_dict, views_for
    from finetune.model_dir import ENCODER_WEIGHTS, HEAD_WEIGHTS, load_model, save_model_dir
    from pretrain.encoders.base import build_encoder

    torch.manual_seed(1)
    encoder = build_encoder(tiny_encoder)
    model = PropertyModel(encoder, PropertyHead(16, "attention", (8,)), TargetNormalizer(mean=-1.5, std=0.7)).eval()
    batch = collate(mp20_records[:6], views_for(encoder))
    expected = model.predict(batch)
    meta = {
        "task": {"name": "t", "target": "formation_energy_per_atom", "unit": "eV/atom"},
        "encoder_spec": {"encoder": tiny_encoder},
        "views": views_dict(encoder),
        "head": {"readout": "attention", "hidden": [8], "dropout": 0.0},
    }
    out = save_model_dir(model, tmp_path / "model", meta)
    assert {p.name for p in out.iterdir()} == {"model.json", ENCODER_WEIGHTS, HEAD_WEIGHTS, "README.md"}
    for name in (ENCODER_WEIGHTS, HEAD_WEIGHTS):  # safetensors: an 8-byte header length then JSON
        assert (out / name).read_bytes()[8:9] == b"{"
    loaded = load_model(out)
    assert loaded.unit == "eV/atom" and loaded.model.normalizer == TargetNormalizer(-1.5, 0.7)
    torch.testing.assert_close(loaded.model.predict(collate(mp20_records[:6], loaded.views)), expected)
    with pytest.raises(FileNotFoundError, match="not a fine-tuned crystalfm model"):
        load_model(tmp_path)
