"""Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023) over a crystal's atoms.

The DiT of CrysLDNet stage 2: it reads the noisy per-atom latents Z_t of each crystal as a set of
tokens and predicts the clean latents Z_1, conditioned on the flow time t. Unlike the reference
code, which adds a sinusoidal embedding of each atom's *index*, there is no positional encoding at
all: atom order in a crystal is arbitrary, so the network is permutation-equivariant by
construction (self-attention, per-token MLPs, per-crystal conditioning) and a test checks it.

adaLN-Zero: every block regresses shift/scale/gate of its two sub-layers from the conditioning
vector; the regressors (and the output layer) start at zero, so each block starts as the identity
and the network's first prediction is exactly 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = {
    # name: (layers, width, heads) — "base" is the paper's DiT (12 layers, width 768, 12 heads)
    "base": (12, 768, 12),
    "small": (6, 384, 6),
    "tiny": (2, 64, 4),
}


@dataclass(frozen=True)
class DiTConfig:
    """preset fills layers/width/heads unless they are given explicitly."""

    preset: str = "base"
    layers: int | None = None
    width: int | None = None
    heads: int | None = None
    mlp_ratio: float = 4.0
    time_frequencies: int = 256  # size of the sinusoidal embedding of t

    def resolved(self) -> tuple[int, int, int]:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown DiT preset {self.preset!r}; available: {sorted(PRESETS)}")
        layers, width, heads = PRESETS[self.preset]
        layers = self.layers or layers
        width = self.width or width
        heads = self.heads or heads
        if width % heads:
            raise ValueError(f"DiT width {width} is not divisible by heads {heads}")
        return layers, width, heads


def pad_atoms(x: torch.Tensor, batch_index: torch.Tensor, num_atoms: torch.Tensor):
    """Per-atom rows [N, d] → padded [B, L, d] and mask [B, L] (True for real atoms)."""
    num_crystals = int(num_atoms.shape[0])
    longest = int(num_atoms.max()) if num_crystals else 0
    starts = torch.cumsum(num_atoms, 0) - num_atoms  # [B]
    slot = torch.arange(x.shape[0], device=x.device) - starts[batch_index]  # [N] position inside the crystal
    out = x.new_zeros(num_crystals, longest, x.shape[-1])
    out[batch_index, slot] = x
    mask = torch.zeros(num_crystals, longest, dtype=torch.bool, device=x.device)
    mask[batch_index, slot] = True
    return out, mask


def unpad_atoms(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Padded [B, L, d] → per-atom rows [N, d] in the original order (inverse of `pad_atoms`)."""
    return x[mask]


class TimestepEmbedder(nn.Module):
    """Scalar t ∈ [0, 1] → sinusoidal features → MLP → [B, width]."""

    def __init__(self, width: int, frequencies: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequencies = frequencies
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        # t is in [0, 1]; scale to the [0, 1000] range the frequencies were designed for.
        args = (t.float() * 1000.0).unsqueeze(-1) * freqs  # [B, half]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, frequencies]
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def attention(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)  # 3 × [B, H, L, D]
        keep = mask[:, None, None, :]  # [B, 1, 1, L]: every query attends to the crystal's real atoms
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # [B, H, L, D]
        return self.proj(out.transpose(1, 2).reshape(b, length, width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # 6 × [B, W]
        x = x + gate1.unsqueeze(1) * self.attention(modulate(self.norm1(x), shift1, scale1), mask)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """x_t [B, L, d], t [B], mask [B, L] → predicted x_1 [B, L, d] (zero on padding)."""

    def __init__(self, latent_dim: int, config: DiTConfig = DiTConfig()):
        super().__init__()
        layers, width, heads = config.resolved()
        self.latent_dim = latent_dim
        self.embed = nn.Linear(latent_dim, width)
        self.time = TimestepEmbedder(width, config.time_frequencies)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, config.mlp_ratio) for _ in range(layers))
        self.final = FinalLayer(width, latent_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.time.mlp[0], self.time.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output layer at zero.
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        for layer in (self.final.ada[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # [B, L, W]
        c = self.time(t)  # [B, W]
        for block in self.blocks:
            h = block(h, c, mask)
        return self.final(h, c) * mask.unsqueeze(-1).to(h.dtype)  # [B, L, d]
