"""Job config (YAML + overrides, unknown keys rejected), DeepSpeed config, lr schedules, CLI config printing."""
from __future__ import annotations

import math

import pytest

from pretrain.config import ConfigError, JobConfig, apply_override, load_config


def test_yaml_and_overrides_are_typed(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("run: {name: a}\ntrain: {max_steps: 10, zero_stage: 2}\noptim: {lr: 1}\nobjective: {name: jepa, depth: 2}\n")
    config = load_config(path, ["train.zero_stage=3", "optim.eps=1e-6", "optim.betas=[0.8, 0.9]", "objective.encoder.name=pddformer",
                                "checkpoint.resume=none", "data.max_crystals=null"])
    assert config.train.zero_stage == 3 and config.train.max_steps == 10
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)  # ints widen to floats
    assert config.optim.betas == [0.8, 0.9]
    assert config.optim.eps == 1e-6  # YAML 1.1 would read `1e-6` as a string
    assert config.objective == {"name": "jepa", "depth": 2, "encoder": {"name": "pddformer"}}
    assert config.data.max_crystals is None
    assert str(config.run_dir).endswith("runs/a") and str(config.checkpoint_dir).endswith("runs/a/checkpoints")
    # The saved YAML reloads to the same config.
    again = tmp_path / "again.yaml"
    again.write_text(config.to_yaml())
    assert load_config(again) == config


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "did you mean 'train.max_steps'"),
    ("trian.max_steps=3", "did you mean 'train'"),
    ("train.zero_stage=4", "must be one of [0, 1, 2, 3]"),
    ("train.max_steps=many", "must be an integer"),
    ("train.precision=fp8", "must be one of ['fp32', 'bf16', 'fp16']"),
    ("optim.lr=true", "must be a number"),
    ("train", "must look like key.sub=value"),
])
def test_bad_keys_and_values_are_rejected_with_a_reason(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_missing_config_file_says_where_to_look(tmp_path):
    with pytest.raises(ConfigError, match="configs/pretrain_"):
        load_config(tmp_path / "nope.yaml")


def test_override_into_non_mapping_is_an_error():
    data = {"train": 3}
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_override(data, "train.max_steps=1")


def test_shipped_configs_load(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    paths = sorted((root / "configs").glob("pretrain_*.yaml"))
    assert paths, "configs/pretrain_*.yaml missing"
    for path in paths:
        assert isinstance(load_config(path), JobConfig)


def test_shipped_configs_spell_out_every_section_the_trainer_reads():
    """A documented config that loses a section trains on defaults without a word (session 6 lost the DDPM
    config's train: lines, and its documented run trained 1,000 steps instead of 5,500 for two sessions)."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "configs").glob("pretrain_*.yaml")):
        raw = yaml.safe_load(path.read_text())
        missing = {"run", "data", "objective", "optim", "schedule", "train", "checkpoint", "tracking"} - set(raw)
        assert not missing, f"{path.name} lacks {sorted(missing)}"
        assert "max_steps" in raw["train"] and "lr" in raw["optim"], path.name
        assert raw["train"]["max_steps"] == load_config(path).train.max_steps, path.name


def test_deepspeed_config_follows_the_job():
    from pretrain.parallelize import deepspeed_config

    config = load_config(None, ["train.zero_stage=3", "train.precision=bf16", "train.grad_accum=4", "optim.grad_clip=0.5",
                                "deepspeed.zero_optimization.overlap_comm=true"])
    ds = deepspeed_config(config)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    # bf16 is torch autocast over fp32 weights, not DeepSpeed's bf16 weights (pretrain/precision.py).
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds and "fp16" not in ds
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    fp16 = deepspeed_config(load_config(None, ["train.precision=fp16", "train.zero_stage=0"]))
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert fp16["zero_optimization"]["stage"] == 0


def test_lr_schedules():
    from pretrain.optim import LrSchedule

    warm = LrSchedule("warmup_cosine", total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    values = [warm(s) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:10], values[1:10]))  # rising warmup
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # decaying cosine
    assert values[100] == pytest.approx(0.1)
    cycle = LrSchedule("one_cycle", total_steps=100, pct_start=0.3, div_factor=25, final_div_factor=1e4)
    ups = [cycle(s) for s in range(101)]
    assert ups[0] == pytest.approx(1 / 25) and max(ups) == pytest.approx(1.0) and ups.index(max(ups)) == 30
    assert ups[100] == pytest.approx(1 / 25 / 1e4)
    assert LrSchedule("constant", 10)(7) == 1.0
    assert not any(math.isnan(v) for v in values + ups)


def test_cli_prints_the_resolved_config(tmp_path, capsys):
    from pretrain.cli import main

    path = tmp_path / "job.yaml"
    path.write_text("train: {max_steps: 5}\n")
    assert main(["config", str(path), "train.log_every=2"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 5" in out and "log_every: 2" in out and "zero_stage: 2" in out
    assert main(["config", str(path), "train.nope=1"]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err
