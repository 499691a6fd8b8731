"""An optional auxiliary property head for pretraining objectives (our addition, off by default).

    embedding  e_i = readout(encoder(crystal_i))        [B, d]   (the pooled embedding fine-tuning uses)
    predict    ŷ_i = MLP(e_i)                           [B]      in units of `scale` (eV/atom)
    loss       weight · Σ_{i labelled} huber(ŷ_i − y_i / scale) / norm.crystals

Why: the downstream tasks a crystal foundation model is judged on are mostly energies, and the raw
sources (GNoME, MP, MPTS-52, JARVIS, MPtrj) carry DFT formation energies for most crystals. Neither
published method uses them directly: the CrysLDNet VAE reconstructs structure only, and Crys-JEPA's
energy-weighted InfoNCE uses ΔE only to weight its negatives. Adding a supervised head on the same
embedding is the standard multi-task recipe (pretrain on what the sources label, fine-tune on the
few labels of the task); with `weight: 0` (the default) the objective is exactly the published one.

Crystals without the label contribute nothing but still count in norm.crystals, so the gradient is
that of one big batch whatever the split of labelled crystals over ranks (the trainer's contract).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


INPUTS = ("masked", "clean")


@dataclass(frozen=True)
class PropertyHeadConfig:
    """label: the record label to predict (formation_energy_per_atom).  weight: its loss weight
    (0 → no head at all).  scale: the label is divided by this before the loss (1 eV/atom).
    hidden: width of the MLP's hidden layer (0 → the encoder width).  huber: δ of the Huber loss
    in scaled units (robust to the few extreme labels of some sources).  input (VAE only): 'masked'
    reads the masked pass's embedding (no extra cost; masking acts as augmentation); 'clean' runs
    the encoder a second time on the unmasked crystal, so the head learns the mapping fine-tuning
    and prediction use (every species visible) at ~1.6x the step cost."""

    label: str = "formation_energy_per_atom"
    weight: float = 0.0
    scale: float = 1.0
    hidden: int = 0
    huber: float = 1.0
    input: str = "masked"

    def __post_init__(self):
        if self.input not in INPUTS:
            raise ValueError(f"property_head.input must be one of {INPUTS}, got {self.input!r}")
        if self.weight < 0:
            raise ValueError(f"property_head.weight must be >= 0, got {self.weight}")
        if self.scale <= 0:
            raise ValueError(f"property_head.scale must be > 0, got {self.scale}")


class PropertyHead(nn.Module):
    def __init__(self, config: PropertyHeadConfig, in_dim: int):
        super().__init__()
        self.config = config
        hidden = config.hidden or in_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def loss(self, embedding: torch.Tensor, batch, crystals: float) -> tuple[torch.Tensor, dict[str, float]]:
        """(weighted loss, metrics) for `embedding` [B, d]; `crystals` is the global crystal count."""
        cfg = self.config
        label = batch.labels.get(cfg.label)
        if label is None:
            raise ValueError(
                f"property_head: the batch has no '{cfg.label}' label; set property_head.label to a label "
                "the shards carry (see `crystalfm data inspect`), or property_head.weight: 0"
            )
        dtype = torch.promote_types(embedding.dtype, torch.float32)  # the loss is never reduced below fp32
        target = label.to(device=embedding.device, dtype=dtype) / cfg.scale  # [B], NaN = missing
        pred = self.mlp(embedding).squeeze(-1).to(dtype)  # [B]
        known = torch.isfinite(target)
        err = F.huber_loss(pred[known], target[known], delta=cfg.huber, reduction="sum")
        loss = cfg.weight * err / crystals
        with torch.no_grad():
            mae = (pred[known] - target[known]).abs().mean() * cfg.scale if bool(known.any()) else torch.tensor(float("nan"))
        return loss, {f"{cfg.label}_loss": float(err.detach() / crystals), f"{cfg.label}_mae": float(mae), "labelled": float(known.sum())}


def build_property_head(config: PropertyHeadConfig, in_dim: int) -> PropertyHead | None:
    """The head, or None when its weight is 0 (so a published objective carries no extra weights)."""
    return PropertyHead(config, in_dim) if config.weight > 0 else None
