"""The encoder interface every objective depends on, and the registry that picks one by name.

An encoder maps a CrystalBatch to per-atom latents [N_atoms, out_dim]; `readout` pools them per
crystal. VAE decoders, flow matching, JEPA and fine-tune heads see only this, so backbones swap
by name in config: `build_encoder({"name": "pddformer", ...})`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., "Encoder"]] = {}


class Encoder(nn.Module):
    """Base class. Subclasses set `out_dim`, declare which batch views they need, and implement forward."""

    out_dim: int
    needs_graph: bool = False  # requires the graph view (edges) in the batch
    needs_tokens: bool = False  # requires the token view in the batch
    neighbor_rule: dict | None = None  # the loader's neighbour rule this encoder was designed for
    needs_pdd: bool = False  # requires batch.pdd (pointwise distance distributions)

    def forward(self, batch) -> torch.Tensor:  # [N_atoms, out_dim]
        raise NotImplementedError

    def encode(self, batch) -> torch.Tensor:
        return self(batch)

    def embed(self, batch, kind: str = "mean") -> torch.Tensor:
        """Pooled per-crystal embedding [B, out_dim]. Default: `readout(forward(batch), batch, kind)`;
        encoders with a summary token (the token transformer's [CLS]) add their own kinds."""
        return self.readout(self(batch), batch, kind)

    @staticmethod
    def readout(h: torch.Tensor, batch, kind: str = "mean") -> torch.Tensor:
        """Per-crystal pooling [N, d] → [B, d] ('mean' or 'sum')."""
        out = torch.zeros(batch.num_crystals, h.shape[-1], dtype=h.dtype, device=h.device)
        out = out.index_add(0, batch.batch_index, h)
        if kind == "mean":
            out = out / batch.num_atoms.clamp(min=1).to(h.dtype).unsqueeze(-1)
        elif kind != "sum":
            raise ValueError(f"readout must be 'mean' or 'sum', got {kind!r}")
        return out


def register_encoder(name: str):
    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_encoders() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def build_encoder(config: dict) -> Encoder:
    """config: {"name": <registered name>, **keyword arguments of that encoder}."""
    _import_builtin()
    config = dict(config)
    name = config.pop("name", None)
    if name not in _REGISTRY:
        raise ValueError(f"unknown encoder {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**config)


def _import_builtin() -> None:
    # Importing the modules registers their encoders.
    import importlib

    for module in ("pretrain.encoders.pddformer", "pretrain.encoders.matformer", "pretrain.encoders.token_transformer"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
