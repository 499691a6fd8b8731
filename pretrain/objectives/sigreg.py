"""SIGReg (LeJEPA, Balestriero & LeCun 2025): push a batch of embeddings towards an isotropic
standard Gaussian by testing many random 1-D projections of it.

For each of `num_slices` random unit directions a, the projected samples x_i = <z_i, a> are
compared with N(0, 1) by the Epps–Pulley statistic, which measures the weighted L2 distance between
the empirical characteristic function φ̂(t) = mean_i exp(i t x_i) and the Gaussian one exp(-t²/2):

    EP = M ∫ |φ̂(t) − exp(−t²/2)|² exp(−t²/2) dt      (M samples; trapezoid rule on [−t_max, t_max])

Under the null hypothesis (Gaussian samples) E[EP] = ∫ (1 − e^{−t²}) e^{−t²/2} dt ≈ 1.06 whatever M
is; for samples collapsed onto one point it grows like M. The statistic only uses bounded cos/sin
terms, so its gradients stay bounded however clustered the batch is. SIGReg is the mean of EP over
the slices; directions are redrawn every call (a fresh sketch each step, as in LeJEPA).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SIGReg(nn.Module):
    def __init__(self, num_slices: int = 256, t_max: float = 3.0, num_points: int = 17):
        super().__init__()
        if num_points < 3 or num_points % 2 == 0:
            raise ValueError(f"num_points must be odd and >= 3, got {num_points}")
        self.num_slices = num_slices
        # The integrand is even in t: integrate over [0, t_max] and double.
        t = torch.linspace(0.0, t_max, num_points)  # [T]
        dt = t_max / (num_points - 1)
        weights = torch.full((num_points,), 2.0 * dt)
        weights[0] = dt  # t = 0 is counted once when doubling the half-line
        weights[-1] = dt
        gaussian_cf = torch.exp(-0.5 * t**2)  # [T]
        self.register_buffer("t", t, persistent=False)
        self.register_buffer("gaussian_cf", gaussian_cf, persistent=False)
        self.register_buffer("weights", weights * gaussian_cf, persistent=False)

    def epps_pulley(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, S] samples of S one-dimensional distributions → [S] statistics."""
        xt = x.unsqueeze(-1) * self.t  # [M, S, T]
        cos_mean = torch.cos(xt).mean(dim=0)  # [S, T]
        sin_mean = torch.sin(xt).mean(dim=0)  # [S, T]
        err = (cos_mean - self.gaussian_cf) ** 2 + sin_mean**2  # [S, T]
        return (err @ self.weights) * x.shape[0]  # [S]

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z: [M, d] embeddings → scalar SIGReg statistic."""
        if z.shape[0] < 2:
            return z.sum() * 0.0
        directions = torch.randn(z.shape[-1], self.num_slices, generator=generator, device=z.device)
        directions = directions / directions.norm(dim=0, keepdim=True)  # [d, S] unit columns
        projected = z.float() @ directions.to(torch.float32)  # [M, S]
        return self.epps_pulley(projected).mean()


def gaussian_expectation(t_max: float = 3.0) -> float:
    """E[EP] under the null for an infinite grid: ∫_{-t_max}^{t_max} (1 − e^{−t²}) e^{−t²/2} dt."""
    return math.sqrt(2 * math.pi) * math.erf(t_max / math.sqrt(2)) - math.sqrt(2 * math.pi / 3) * math.erf(
        t_max * math.sqrt(1.5)
    )
