"""Small building blocks shared by the graph encoders: radial bases and the choice of norm."""
from __future__ import annotations

import torch
from torch import nn


class GaussianRBF(nn.Module):
    """Expand a scalar per edge into `bins` Gaussians with centres evenly spaced over [vmin, vmax].

    The width is the centre spacing (SchNet/CGCNN/Matformer convention): γ = 1 / spacing.
    x: [E] → [E, bins]
    """

    def __init__(self, vmin: float, vmax: float, bins: int):
        super().__init__()
        if bins < 2 or not vmax > vmin:
            raise ValueError(f"RBF needs bins >= 2 and vmax > vmin, got bins={bins}, range=[{vmin}, {vmax}]")
        self.register_buffer("centers", torch.linspace(vmin, vmax, bins))
        self.gamma = 1.0 / ((vmax - vmin) / (bins - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.gamma * (x.unsqueeze(-1) - self.centers.to(x.dtype)) ** 2)  # [E, bins]


def make_norm(kind: str, dim: int) -> nn.Module:
    """'layer' (per-row; outputs of one crystal never depend on the rest of the batch),
    'batch' (the papers' BatchNorm1d over all atoms or edges of the batch), or 'none'."""
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'layer', 'batch' or 'none', got {kind!r}")


def model_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of a module's parameters (inputs are cast to it)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()
