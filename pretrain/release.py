"""Released checkpoints: a directory anyone can load with one call and no pickle.

    <dir>/model.safetensors    consolidated fp32 weights of the whole objective (encoder + heads)
    <dir>/config.json          {"objective": <objective config incl. encoder>, "views": <batch views>,
                                "normalization": {...}, "manifest_sha256": "...", "metrics": {...},
                                "format_version": 1, ...}
    <dir>/MODEL_CARD.md        what it is, how it was trained, on which data (and licences)

`load_pretrained(dir)` rebuilds the objective from config.json and loads the weights strictly.
`.encoder` of the result is the shared encoder interface that fine-tuning and discovery use.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "MODEL_CARD.md"


def save_release(
    objective: torch.nn.Module,
    objective_config: dict,
    out_dir: str | os.PathLike,
    *,
    views: dict | None = None,
    normalization: dict | None = None,
    manifest_sha256: str | None = None,
    metrics: dict | None = None,
    card: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a release atomically (to `<out_dir>.tmp`, then rename)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().cpu()
             for k, v in objective.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS))
    config = {
        "format_version": FORMAT_VERSION,
        "objective": objective_config,
        "views": views or {},
        "normalization": normalization or {},
        "manifest_sha256": manifest_sha256,
        "metrics": metrics or {},
        "weights_sha256": _sha256(tmp / WEIGHTS),
        **(extra or {}),
    }
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    (tmp / CARD).write_text(card or f"# crystalfm release\n\nObjective: {objective_config.get('name')}\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def read_release_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    config_path = path / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a crystalfm release (no {CONFIG}); make one with `crystalfm pretrain release CHECKPOINT --out DIR`"
        )
    config = json.loads(config_path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: release format {config.get('format_version')} is not {FORMAT_VERSION}")
    return config


def load_pretrained(path: str | os.PathLike, map_location: str = "cpu"):
    """Rebuild a released objective (with its `.encoder`) from a release directory, in eval mode."""
    from pretrain.objectives import build_objective

    path = Path(path)
    config = read_release_config(path)
    objective = build_objective(config["objective"])
    state = load_file(str(path / WEIGHTS), device=map_location)
    objective.load_state_dict(state, strict=True)
    objective.release_config = config
    return objective.eval()


def release_id(path: str | os.PathLike) -> str:
    """A short stable id of a release: the first 12 hex digits of its weights' sha256."""
    return read_release_config(path)["weights_sha256"][:12]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
