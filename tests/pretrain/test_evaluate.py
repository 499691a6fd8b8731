"""`crystalfm pretrain evaluate`: real releases, real shards written by the data pipeline's format."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline.shard_format import encode_record
from data_pipeline.build.shard_writer import write_tar
from pretrain.evaluate import energy_distance_correlation
from pretrain.objectives import build_objective
from pretrain.release import save_release

TOKENS = {"name": "jepa_transformer", "width": 32, "num_layers": 1, "heads": 4}




@pytest.fixture(scope="module")
def shards(tmp_path_factory, mp20_records):
    root = tmp_path_factory.mktemp("shards")
    write_tar(root / "val-000000.tar", [encode_record(r) for r in mp20_records[:20]])
    write_tar(root / "val-000001.tar", [encode_record(r) for r in mp20_records[20:40]])
    return root


def _release(tmp_path, config):
    torch.manual_seed(0)
    objective = build_objective(config)
    return save_release(objective, config, tmp_path / config["name"], views=objective.batch_views())


def _evaluate(*argv):
    from pretrain.cli import main

    return main(["evaluate", *argv])


@pytest.mark.parametrize("name", ["vae", "latent_flow"])
def test_evaluate_reconstruction(tmp_path, shards, name, capsys):
    config = {"name": "vae", "latent_dim": 16, "encoder": TOKENS, "target_mode": "paper"}
    if name == "latent_flow":
        config = {"name": "latent_flow", "vae": {k: v for k, v in config.items() if k != "name"}, "dit": {"preset": "tiny"}}
    release = _release(tmp_path, config)
    out = tmp_path / "eval"
    assert _evaluate(str(release), "--shards", str(shards), "--out", str(out), "--atom-budget", "256") == 0
    results = json.loads((out / "evaluation.json").read_text())
    assert results["crystals"] == 40 and results["split"] == "val" and results["target_mode"] == "paper"
    assert 0 < results["masked_atoms"] < 300 and 0.0 <= results["type_acc_masked"] <= 1.0
    # an untrained model: positions off by Ångströms, but the minimum image bounds the error by the cell
    assert 0.0 < results["coord_rmsd_aligned"] <= results["coord_rmsd"] + 1e-6 < 20.0
    assert results["lattice_mae"] > 0
    assert ("flow_loss" in results) == (name == "latent_flow")
    assert "type_acc_masked" in capsys.readouterr().out


def test_reconstruction_metrics_are_exactly_zero_for_a_perfect_decoder(mp20_records):
    """The exact case: a VAE whose decoder returns the truth scores type accuracy 1 and zero errors."""
    from data_pipeline.load.collate import BatchViews, collate
    from data_pipeline.record import MAX_Z
    from pretrain.evaluate import evaluate_reconstruction

    vae = build_objective({"name": "vae", "latent_dim": 16, "encoder": TOKENS}).double().eval()

    def perfect_decode(z, batch):  # the truth, in the decoder's output layout (invariant targets)
        logits = torch.nn.functional.one_hot(batch.atomic_numbers.long() - 1, MAX_Z).to(z.dtype)
        return {"type_logits": logits, "coords": batch.frac_coords.to(z.dtype),
                "lattice": vae.lattice_target(batch).to(z.dtype)}

    vae.decode = perfect_decode
    views = BatchViews.from_dict(vae.batch_views())
    batches = [collate(mp20_records[i : i + 10], views, dtype=torch.float64) for i in (0, 10)]
    results = evaluate_reconstruction(vae, batches)
    assert results["crystals"] == 20 and results["masked_atoms"] > 0
    assert results["type_acc_masked"] == 1.0
    assert results["coord_rmsd"] == results["coord_rmsd_aligned"] == results["lattice_mae"] == 0.0


def test_evaluate_jepa_embeddings(tmp_path, shards):
    release = _release(tmp_path, {"name": "jepa", "encoder": TOKENS})
    out = tmp_path / "eval"
    assert _evaluate(str(release), "--shards", str(shards), "--out", str(out), "--pairs", "500") == 0
    results = json.loads((out / "evaluation.json").read_text())
    assert results["crystals"] == 40 and results["pairs"] == 500
    assert -1.0 <= results["spearman_distance_vs_dEf"] <= 1.0
    assert results["embedding_effective_rank"] > 1.0
    png = out / "embedding_pca.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_energy_distance_correlation_is_one_for_an_energy_axis():
    rng = np.random.default_rng(0)
    energy = torch.from_numpy(rng.normal(size=200))
    aligned = torch.stack([energy, torch.zeros(200)], -1)  # distance = |ΔE| exactly
    assert energy_distance_correlation(aligned, energy, 2000, 0)["spearman_distance_vs_dEf"] > 0.999
    unrelated = torch.from_numpy(rng.normal(size=(200, 8)))
    assert abs(energy_distance_correlation(unrelated, energy, 2000, 0)["spearman_distance_vs_dEf"]) < 0.1


def test_evaluate_reports_bad_inputs(tmp_path, shards, capsys):
    assert _evaluate(str(tmp_path / "nope"), "--shards", str(shards)) == 2
    assert "not a crystalfm release" in capsys.readouterr().err
    release = _release(tmp_path, {"name": "jepa", "encoder": TOKENS})
    assert _evaluate(str(release), "--shards", str(shards), "--split", "test") == 2
    assert "test" in capsys.readouterr().err
