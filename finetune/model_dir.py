"""A fine-tuned model directory: self-contained, safetensors + JSON, no pickle.

    <dir>/model.json           format version, task (name, target, unit), how to rebuild the
                               encoder, batch views, head shape, target normalisation, provenance
                               (release id, mode, fraction, seed, metrics)
    <dir>/encoder.safetensors  the (fine-tuned, or frozen copy of the released) encoder weights
    <dir>/head.safetensors     readout + MLP weights
    <dir>/README.md            a short card

`load_model(dir)` rebuilds the encoder from model.json (no release directory needed), loads both
weight files strictly and returns a `PropertyModel` that predicts in physical units.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crystalfm_common.metrics import grouped
from data_pipeline.load.collate import BatchViews
from finetune.backbone import rebuild_encoder
from finetune.heads import PropertyHead, PropertyModel, TargetNormalizer

FORMAT_VERSION = 1
KIND = "crystalfm-finetuned-property"
META = "model.json"
ENCODER_WEIGHTS = "encoder.safetensors"
HEAD_WEIGHTS = "head.safetensors"
CARD = "README.md"


@dataclass
class LoadedModel:
    model: PropertyModel
    meta: dict
    views: BatchViews

    @property
    def target(self) -> str:
        return self.meta["task"]["target"]

    @property
    def unit(self) -> str:
        return self.meta["task"]["unit"]


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_model_dir(model: PropertyModel, out_dir: str | os.PathLike, meta: dict) -> Path:
    """Write atomically (`<dir>.tmp` then rename). `meta` must hold task, encoder_spec, views, head."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_cpu_state(model.encoder), str(tmp / ENCODER_WEIGHTS))
    save_file(_cpu_state(model.head), str(tmp / HEAD_WEIGHTS))
    meta = {"format_version": FORMAT_VERSION, "kind": KIND, **meta, "normalizer": model.normalizer.to_dict()}
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    task = meta["task"]
    (tmp / CARD).write_text(
        f"# crystalfm fine-tuned model: {task['name']}\n\n"
        f"Predicts `{task['target']}` ({task['unit'] or 'dimensionless'}) from a crystal structure.\n\n"
        f"- encoder: {meta.get('encoder_label')} ({meta.get('mode')} fine-tuning), fraction {meta.get('fraction')}, seed {meta.get('seed')}\n"
        f"- metrics (as MLflow names them): {_card_metrics(meta.get('metrics', {}))}\n\n"
        f"Use: `crystalfm finetune predict {out_dir.name} STRUCTURE_FILES_OR_FOLDER`, or from Python:\n\n"
        f"```python\nimport crystalfm\nmodel = crystalfm.load('{out_dir.name}')  # or models:/crystalfm-{task['name']}@best\n"
        f"values = model.predict([structure, atoms, 'crystal.cif'])  # {task['unit'] or 'dimensionless'}\n```\n"
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _card_metrics(metrics: dict) -> str:
    """`val/best_mae 0.1, test/mae 0.12, ...` (crystalfm_common/metrics.py names)."""
    logged = metrics.get("logged") or {**grouped("val", metrics.get("val", {}), prefix="best_", skip=("count",)),
                                       **grouped("test", metrics.get("test", {}), skip=("count",))}
    return ", ".join(f"{k} {v:.4g}" for k, v in logged.items() if isinstance(v, (int, float))) or "none"


def load_model(path: str | os.PathLike, map_location: str = "cpu") -> LoadedModel:
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a fine-tuned crystalfm model (no {META}); train one with `crystalfm finetune train TASK ...`"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != KIND or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: model format {meta.get('kind')} v{meta.get('format_version')} is not {KIND} v{FORMAT_VERSION}")
    encoder = rebuild_encoder(meta["encoder_spec"])
    encoder.load_state_dict(load_file(str(path / ENCODER_WEIGHTS), device=map_location), strict=True)
    head_cfg = meta["head"]
    head = PropertyHead(encoder.out_dim, head_cfg["readout"], tuple(head_cfg["hidden"]), head_cfg.get("dropout", 0.0),
                        prior_hidden=head_cfg.get("prior_hidden"))
    head.load_state_dict(load_file(str(path / HEAD_WEIGHTS), device=map_location), strict=True)
    model = PropertyModel(encoder, head, TargetNormalizer.from_dict(meta["normalizer"]), frozen=True).eval()
    return LoadedModel(model, meta, BatchViews.from_dict(meta["views"]))
