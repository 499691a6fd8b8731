"""Collapse diagnostics for latents and embeddings (logged as metrics, never optimised).

A representation has collapsed when its samples stop spreading out: every dimension's variance
goes to zero (complete collapse) or the samples fill only a few directions (dimensional collapse).
`latent_variance` and `per_dim_std` catch the first, `effective_rank` the second.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def per_dim_std(x: torch.Tensor) -> torch.Tensor:
    """[M, d] samples → [d] standard deviation of each dimension (0 for fewer than 2 samples)."""
    if x.shape[0] < 2:
        return torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    return x.float().std(dim=0, unbiased=False)


@torch.no_grad()
def latent_variance(x: torch.Tensor) -> float:
    """Mean over dimensions of the per-dimension variance of [M, d] samples."""
    return float(per_dim_std(x).pow(2).mean())


@torch.no_grad()
def effective_rank(x: torch.Tensor, eps: float = 1e-12) -> float:
    """Effective rank (Roy & Vetterli 2007) of centred [M, d] samples: exp of the Shannon entropy of
    the normalised singular values. d for isotropic samples (M >> d), 1 when all lie on a line,
    and at most min(M, d)."""
    if x.shape[0] < 2:
        return 0.0
    centred = x.float() - x.float().mean(dim=0, keepdim=True)  # [M, d]
    s = torch.linalg.svdvals(centred)  # [min(M, d)]
    total = s.sum()
    if total <= eps:
        return 0.0
    p = s / total
    entropy = -(p * torch.log(p.clamp(min=eps))).sum()
    return float(torch.exp(entropy))


def collapse_metrics(x: torch.Tensor, prefix: str) -> dict[str, float]:
    """The metrics every objective logs for its latent/embedding `x` [M, d]."""
    std = per_dim_std(x)
    return {
        f"{prefix}_variance": float(std.pow(2).mean()),
        f"{prefix}_std_mean": float(std.mean()),
        f"{prefix}_std_min": float(std.min()) if std.numel() else 0.0,
        f"{prefix}_effective_rank": effective_rank(x),
    }
