"""`head_init: property_head`: the fine-tune head starts from the release's pretraining property head
(finetune/heads.py), so before any step it predicts exactly what the pretraining head predicts."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.load.collate import collate
from finetune.backbone import load_backbone, views_dict, views_for
from finetune.config import FinetuneConfig
from finetune.heads import TargetNormalizer
from finetune.model_dir import load_model, save_model_dir
from finetune.train import build_model, fit

TARGET = "formation_energy_per_atom"


@pytest.fixture(scope="module")
def energy_release(tmp_path_factory, tiny_encoder):
    """A real release of a VAE with a formation-energy property head (random weights, scale 2 so the
    affine map from pretraining units to normalised units is exercised)."""
    from pretrain.objectives import build_objective
    from pretrain.release import save_release

    torch.manual_seed(7)
    config = {"name": "vae", "encoder": dict(tiny_encoder), "latent_dim": 8,
              "property_head": {"label": TARGET, "weight": 1.0, "scale": 2.0, "hidden": 12}}
    objective = build_objective(config)
    return save_release(objective, config, tmp_path_factory.mktemp("release") / "tiny-vae-energy",
                        views=objective.batch_views())


def _config(release, **changes) -> FinetuneConfig:
    base = dict(task="mp20_formation_energy_per_atom", encoder=str(release), mode="full", epochs=2, batch_size=8,
                lr=3e-3, head_hidden=[16], head_init="property_head")
    return FinetuneConfig.from_dict({**base, **changes})


def _zero_shot(backbone, batch) -> torch.Tensor:
    """What the pretraining head predicts, in eV/atom (pretrain/objectives/property_head.py)."""
    head = backbone.property_head
    embedding = backbone.encoder.readout(backbone.encoder(batch), batch, "mean")
    return head.mlp(embedding).squeeze(-1) * head.config.scale


def test_the_untrained_head_predicts_the_pretraining_heads_zero_shot_values(energy_release, mp20_task_data):
    config = _config(energy_release)
    backbone = load_backbone(config.encoder, config.mode, seed=0)
    assert backbone.property_head is not None and backbone.property_head.config.label == TARGET
    normalizer = TargetNormalizer(mean=-1.3, std=0.7)
    model = build_model(config, backbone, normalizer, TARGET).eval()
    batch = collate(mp20_task_data.test, views_for(backbone.encoder))
    with torch.no_grad():
        torch.testing.assert_close(model.predict(batch), _zero_shot(backbone, batch).detach())
    random_head = build_model(config.replace(head_init="random"), backbone, normalizer, TARGET).eval()
    assert random_head.head.prior is None
    with torch.no_grad():
        assert not torch.allclose(random_head.predict(batch), model.predict(batch))


def test_head_from_pretraining_trains_saves_and_reloads(energy_release, mp20_task_data, tmp_path):
    config = _config(energy_release)
    backbone = load_backbone(config.encoder, config.mode, seed=0)
    prior_before = {k: v.clone() for k, v in backbone.property_head.mlp.state_dict().items()}
    result = fit(config, mp20_task_data, backbone, progress=False)
    head = result.model.head
    assert head.prior is not None
    # The prior itself is fine-tuned (it is part of the head), the copy in the release is not touched.
    assert any(not torch.equal(prior_before[k], v) for k, v in head.prior.state_dict().items())
    meta = {"task": mp20_task_data.task.to_dict(), "encoder_spec": backbone.spec, "views": views_dict(backbone.encoder),
            "head": {"readout": "mean", "hidden": [16], "dropout": 0.0, "prior_hidden": 12}}
    out = save_model_dir(result.model, tmp_path / "model", meta)
    loaded = load_model(out)
    batch = collate(mp20_task_data.test, loaded.views)
    torch.testing.assert_close(loaded.model.predict(batch), result.model.eval().predict(batch))


def test_head_init_needs_a_release_with_a_head_for_the_same_target(energy_release, release_dir, mp20_task_data):
    no_head = _config(release_dir)
    with pytest.raises(ValueError, match="has none"):
        fit(no_head, mp20_task_data, load_backbone(no_head.encoder, no_head.mode, seed=0), progress=False)
    other = _config(energy_release)
    backbone = load_backbone(other.encoder, other.mode, seed=0)
    with pytest.raises(ValueError, match="band_gap"):
        build_model(other, backbone, TargetNormalizer(), "band_gap")
    with pytest.raises(ValueError, match="readout: mean"):
        build_model(other.replace(readout="sum"), backbone, TargetNormalizer(), TARGET)
    with pytest.raises(ValueError, match="head_init"):
        FinetuneConfig.from_dict({"head_init": "pretrained"})


def test_sweep_starts_heads_from_pretraining_only_where_there_is_a_release(energy_release):
    from finetune.config import SweepConfig
    from finetune.sweep import expand

    sweep = SweepConfig.from_dict({"encoders": [str(energy_release), "scratch", "baseline"], "modes": ["full", "frozen"],
                                   "seeds": [0], "train": {"head_init": "property_head"}})
    inits = {(r.encoder if r.mode != "scratch" else "scratch", r.mode): r.head_init for r in expand(sweep)}
    assert inits[(str(energy_release), "full")] == inits[(str(energy_release), "frozen")] == "property_head"
    assert inits[("scratch", "scratch")] == inits[("baseline", "baseline")] == "random"
