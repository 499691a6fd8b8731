"""Crystal geometry in torch, used by the VAE targets, the JEPA augmentations and evaluation.

Conventions follow `data_pipeline.record`: lattice rows are the lattice vectors (Å), fractional
coordinates are row vectors, Cartesian = frac @ lattice, a rotation R acts as L → L Rᵀ.
"""
from __future__ import annotations

import itertools
import math

import torch

_TRIU = torch.triu_indices(3, 3)


def polar_matrix(lattice: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] → the symmetric polar factor S = sqrt(L Lᵀ) (rotation-invariant; L = S V).

    Computed in float64 through the eigendecomposition of the Gram matrix and returned in the input
    dtype. Meant for targets and token features: its gradient is ill-defined for degenerate
    (e.g. cubic) lattices, so callers use it without gradient.
    """
    lat64 = lattice.detach().to(torch.float64)
    gram = lat64 @ lat64.transpose(-1, -2)  # [..., 3, 3]
    w, v = torch.linalg.eigh(gram)
    s = (v * torch.sqrt(w.clamp(min=0.0)).unsqueeze(-2)) @ v.transpose(-1, -2)
    return s.to(lattice.dtype)


def polar6(lattice: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] → [..., 6]: S00, S01, S02, S11, S12, S22 (the torch twin of `lattice_polar6`)."""
    s = polar_matrix(lattice)
    return s[..., _TRIU[0], _TRIU[1]]


def upper_triangle(matrix: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] → [..., 6] in the order of `polar6`."""
    return matrix[..., _TRIU[0], _TRIU[1]]


def wrap_centered(d: torch.Tensor) -> torch.Tensor:
    """Fractional differences folded into [-0.5, 0.5)."""
    return d - torch.floor(d + 0.5)


def circular_mean(x: torch.Tensor, batch_index: torch.Tensor, num_crystals: int, weight: torch.Tensor | None = None):
    """Per-crystal circular mean of fractional values x [N, 3] → [B, 3] in [-0.5, 0.5).

    Translation-equivariant: shifting every x of a crystal by τ shifts its mean by τ (mod 1).
    Undefined (returns 0) where the resultant vanishes.
    """
    angle = 2 * math.pi * x  # [N, 3]
    w = torch.ones_like(x[:, :1]) if weight is None else weight.unsqueeze(-1)
    cos_sum = torch.zeros(num_crystals, 3, dtype=x.dtype, device=x.device).index_add(0, batch_index, w * torch.cos(angle))
    sin_sum = torch.zeros(num_crystals, 3, dtype=x.dtype, device=x.device).index_add(0, batch_index, w * torch.sin(angle))
    return torch.atan2(sin_sum, cos_sum) / (2 * math.pi)  # [B, 3]


def aligned_frac_residual(pred: torch.Tensor, target: torch.Tensor, batch_index: torch.Tensor, num_crystals: int):
    """Periodic residual pred − target − τ_b, wrapped to [-0.5, 0.5), with τ_b the crystal's
    translation that best aligns prediction and target (circular mean of the residuals, detached).

    This is the 'canonical origin' of the invariant VAE targets: a translation-invariant encoder
    cannot know where the stored origin is, so the loss compares coordinates up to one rigid
    translation per crystal. [N, 3] → [N, 3].
    """
    residual = wrap_centered(pred - target)  # [N, 3]
    shift = circular_mean(residual.detach(), batch_index, num_crystals)  # [B, 3]
    return wrap_centered(residual - shift[batch_index])


_IMAGES = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=3)))  # [27, 3]


def min_image_distance(frac_diff: torch.Tensor, lattice_per_atom: torch.Tensor) -> torch.Tensor:
    """Shortest Cartesian length over periodic images of fractional differences.

    frac_diff: [N, 3]; lattice_per_atom: [N, 3, 3] → [N] (Å). The difference is first folded into
    [-0.5, 0.5) and the 27 neighbouring images are searched, exact for all but extremely skewed cells.
    """
    base = wrap_centered(frac_diff).unsqueeze(1) + _IMAGES.to(frac_diff)  # [N, 27, 3]
    cart = torch.einsum("nki,nij->nkj", base, lattice_per_atom)  # [N, 27, 3]
    return cart.norm(dim=-1).min(dim=1).values


def random_rotation(n: int, generator: torch.Generator | None = None, device=None, dtype=torch.float32):
    """Haar-uniform rotations by Shoemake's method (uniform random unit quaternion from u ~ U[0,1)³).

    Returns (R [n, 3, 3] with det +1, u [n, 3] the uniforms, i.e. the rotation's parameters).
    """
    u = torch.rand(n, 3, generator=generator, device=device, dtype=torch.float64)
    return shoemake_rotation(u).to(dtype), u.to(dtype)


def shoemake_rotation(u: torch.Tensor) -> torch.Tensor:
    """[n, 3] uniforms in [0, 1) → [n, 3, 3] rotation matrices (Shoemake 1992, 'Uniform random rotations')."""
    u1, u2, u3 = u.unbind(-1)
    a, b = torch.sqrt(1 - u1), torch.sqrt(u1)
    x = a * torch.sin(2 * math.pi * u2)
    y = a * torch.cos(2 * math.pi * u2)
    z = b * torch.sin(2 * math.pi * u3)
    w = b * torch.cos(2 * math.pi * u3)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        dim=-2,
    )
