"""Pretraining objectives, built by name: `build_objective({"name": "vae", ...})`.

Every objective owns its encoder as `.encoder` (an `pretrain.encoders.base.Encoder`).
"""
from __future__ import annotations

import importlib

from pretrain.objectives.base import LossNorm, Objective

_MODULES = {
    "vae": "pretrain.objectives.vae",  # CrysLDNet stage 1
    "latent_flow": "pretrain.objectives.latent_flow",  # CrysLDNet stage 2 (joint latent flow matching)
    "jepa": "pretrain.objectives.jepa",  # Crys-JEPA
    "ddpm": "pretrain.objectives.ddpm",  # Crys-JEPA's base generator (a DDPM over the token view)
}


def build_objective(config: dict, init_source: Objective | None = None) -> Objective:
    """config: {"name": one of vae | latent_flow | jepa | ddpm, **that objective's config}.

    init_source: the released objective that `config["init_from"]` names, already loaded (by
    `pretrain.release.build_with_init`): objectives never load releases themselves."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in _MODULES:
        raise ValueError(f"unknown objective {name!r}; available: {sorted(_MODULES)}")
    module = importlib.import_module(_MODULES[name])
    return module.build(config) if init_source is None else module.build(config, init_source)


__all__ = ["LossNorm", "Objective", "build_objective"]
