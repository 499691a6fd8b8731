"""The encoder a fine-tune run trains: a copy of a released encoder, or the same architecture
freshly initialised (the from-scratch baseline), plus the batch views it needs.

Every run loads its own copy (`load_pretrained` rebuilds the objective each call), so per-property
encoders are independent, as in CrysLDNet's protocol.

`spec` says how to rebuild the bare encoder later without the pretraining objective:
    {"encoder": <build_encoder config>}       when the objective config names its encoder
    {"objective": <build_objective config>}   otherwise (rebuilt whole, `.encoder` taken)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_pipeline.load.collate import BatchViews


@dataclass
class Backbone:
    encoder: torch.nn.Module
    spec: dict  # how to rebuild the architecture (see module docstring)
    label: str  # release id, or "scratch"
    info: dict = field(default_factory=dict)  # release dir, pretraining MLflow run, objective, ...
    # The pretraining objective's auxiliary property head (pretrain/objectives/property_head.py),
    # when the release has one: what `head_init: property_head` starts the fine-tune head from.
    property_head: torch.nn.Module | None = None


def load_backbone(encoder: str, mode: str, *, encoder_config: dict | None = None, seed: int = 0) -> Backbone:
    """encoder: a release directory or "scratch"; mode: full | frozen | scratch."""
    torch.manual_seed(seed)  # scratch initialisation is part of what the seed fixes
    if encoder == "scratch":
        if encoder_config is None:
            raise ValueError("a scratch encoder needs encoder_config, e.g. {'name': 'pddformer', 'width': 128}")
        from pretrain.encoders.base import build_encoder

        spec = {"encoder": dict(encoder_config)}
        return Backbone(build_encoder(dict(encoder_config)), spec, "scratch", {"encoder_name": encoder_config.get("name")})

    from pretrain.release import load_pretrained, read_release_config, release_id

    path = Path(encoder).expanduser()
    config = read_release_config(path)  # clear error when it is not a release
    spec = release_spec(config)
    info = {
        "release_dir": str(path.resolve()),
        "release_id": release_id(path),
        "objective": config.get("objective", {}).get("name"),
        "pretrain_mlflow_run_id": config.get("mlflow_run_id"),
        "manifest_sha256": config.get("manifest_sha256"),
    }
    property_head = None
    if mode == "scratch":
        module = rebuild_encoder(spec)  # same architecture, random initialisation
        label = "scratch"
    else:
        objective = load_pretrained(path)
        module, property_head = objective.encoder, getattr(objective, "property_head", None)
        label = info["release_id"]
    info["encoder_name"] = _encoder_name(spec, module)
    return Backbone(module.train(), spec, label, info, property_head)


def release_spec(release_config: dict) -> dict:
    objective = dict(release_config.get("objective") or {})
    encoder = objective.get("encoder")
    if isinstance(encoder, dict) and "name" in encoder:
        return {"encoder": dict(encoder)}
    return {"objective": objective}


def rebuild_encoder(spec: dict) -> torch.nn.Module:
    if "encoder" in spec:
        from pretrain.encoders.base import build_encoder

        return build_encoder(dict(spec["encoder"]))
    from pretrain.objectives import build_objective

    return build_objective(dict(spec["objective"])).encoder


def views_for(encoder: torch.nn.Module) -> BatchViews:
    """The batch views an encoder declares it needs (graph with its neighbour rule, tokens, PDD)."""
    return BatchViews.from_dict(views_dict(encoder))


def views_dict(encoder: torch.nn.Module) -> dict:
    """The same as JSON (stored in model.json): pretrain's own rule, so both stages build alike."""
    from pretrain.objectives.config import encoder_views

    return encoder_views(encoder)


def _encoder_name(spec: dict, module) -> str:
    if "encoder" in spec:
        return str(spec["encoder"].get("name"))
    encoder = spec["objective"].get("encoder")
    if isinstance(encoder, dict) and encoder.get("name"):
        return str(encoder["name"])
    return type(module).__name__
