"""Crys-JEPA's encoder: a pre-norm transformer over the token view with a learned [CLS] token.

Architecture (shapes: B crystals, L longest crystal, d = width, F coordinate features):

    tokens [B, L, 109] = frac (3) ‖ one-hot Z (100) ‖ lattice polar factor (6);  mask [B, L]
    coordinate features  'fourier': sin/cos(2π n x), n = 1..num_frequencies → [B, L, 6·n_f]
                         'raw':     the frac coords themselves              → [B, L, 3]
    x = C(coord features) + S(one-hot Z) + P(polar6)                         [B, L, d]
    prepend the learned [CLS]                                                 [B, 1 + L, d]
    num_layers × pre-norm block: x += MHSA(LN(x), keys masked to real atoms); x += MLP(LN(x))
    final LayerNorm                                                          [B, 1 + L, d]
    forward → per-atom latents x[:, 1:][mask]  [N, d] in the batch's atom order
    embed(kind='cls') → x[:, 0]  [B, d]

No positional embedding: the encoder is exactly permutation-equivariant per atom and invariant
through [CLS], and padded positions never take part (masked keys). The lattice enters through the
rotation-invariant polar factor, so outputs are exactly rotation invariant. Fractional coordinates
are periodic: the Fourier features are continuous across the cell boundary (x = 0.999 and 0.001 are
neighbours) and a fractional translation t acts on them as a phase rotation by 2π n t, which the
JEPA context view (random translations) teaches the network to ignore.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from data_pipeline.load.batch import TOKEN_DIM
from pretrain.encoders.base import Encoder, register_encoder
from pretrain.encoders.blocks import model_dtype

_MAX_Z = TOKEN_DIM - 3 - 6


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key mask.  x: [B, S, d], keep: [B, S] bool → [B, S, d]"""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, S, D] each
        attn_mask = keep[:, None, None, :]  # [B, 1, 1, S]: True keys take part
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, s, d))  # [B, S, d]


class TransformerBlock(nn.Module):
    """Pre-norm block: x + MHSA(LN(x)), then x + MLP(LN(x)).  x: [B, S, d] → [B, S, d]"""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), keep))
        return x + self.dropout(self.mlp(self.norm2(x)))


class TokenEmbedding(nn.Module):
    """tokens [B, L, 109] → [B, L, d]: coordinate features, species and lattice, each linearly embedded and summed."""

    def __init__(self, width: int, coord_features: str = "fourier", num_frequencies: int = 8):
        super().__init__()
        if coord_features not in ("fourier", "raw"):
            raise ValueError(f"coord_features must be 'fourier' or 'raw', got {coord_features!r}")
        self.coord_features = coord_features
        self.register_buffer("frequencies", 2 * math.pi * torch.arange(1, num_frequencies + 1, dtype=torch.float32))
        coord_dim = 6 * num_frequencies if coord_features == "fourier" else 3
        self.coords = nn.Linear(coord_dim, width)
        # one-hot @ W: an embedding table that also takes soft or masked (all-zero) one-hots
        self.species = nn.Linear(_MAX_Z, width, bias=False)
        self.lattice = nn.Linear(6, width, bias=False)

    def coordinate_features(self, frac: torch.Tensor) -> torch.Tensor:
        if self.coord_features == "raw":
            return frac  # [B, L, 3]
        phase = frac.unsqueeze(-1) * self.frequencies.to(frac.dtype)  # [B, L, 3, n_f]
        return torch.cat([phase.sin(), phase.cos()], dim=-1).flatten(-2)  # [B, L, 6·n_f]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        frac, onehot, polar6 = tokens[..., :3], tokens[..., 3 : 3 + _MAX_Z], tokens[..., 3 + _MAX_Z :]
        return self.coords(self.coordinate_features(frac)) + self.species(onehot) + self.lattice(polar6)  # [B, L, d]


@register_encoder("jepa_transformer")
class TokenTransformerEncoder(Encoder):
    """Crys-JEPA token encoder.

    Args:
        width: d (Crys-JEPA: 512).  num_layers: 8.  heads: 16.  mlp_ratio: 4.  dropout: 0.
        coord_features: 'fourier' (default; periodic sin/cos of frac coords) or 'raw' (the paper's raw frac coords).
        num_frequencies: Fourier frequencies n = 1..num_frequencies per coordinate.
        activation_checkpointing: recompute each block's activations in the backward pass (less memory).
    Input: a CrystalBatch with the token view (or explicit tokens/mask). Output: per-atom latents [N, width];
    `embed(batch, 'cls')` gives the [CLS] output [B, width].
    """

    needs_tokens = True

    def __init__(
        self,
        width: int = 512,
        num_layers: int = 8,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        coord_features: str = "fourier",
        num_frequencies: int = 8,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.out_dim = width
        self.activation_checkpointing = activation_checkpointing
        self.embedding = TokenEmbedding(width, coord_features, num_frequencies)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.cls, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)

    def forward_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L, 109], mask [B, L] bool → ([CLS] [B, d], per-token outputs [B, L, d]; padded rows are junk)."""
        if tokens.shape[-1] != TOKEN_DIM:
            raise ValueError(f"tokens must have {TOKEN_DIM} features per atom, got {tokens.shape[-1]}")
        tokens = tokens.to(model_dtype(self))
        b = tokens.shape[0]
        x = torch.cat([self.cls.expand(b, -1, -1), self.embedding(tokens)], dim=1)  # [B, 1 + L, d]
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)  # [B, 1 + L]
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, keep, use_reentrant=False) if recompute else block(x, keep)  # [B, 1 + L, d]
        x = self.norm(x)
        return x[:, 0], x[:, 1:]

    def _views(self, batch, tokens, mask):
        tokens = batch.tokens if tokens is None else tokens
        mask = batch.token_mask if mask is None else mask
        if tokens is None or mask is None:
            raise ValueError("jepa_transformer needs the token view: build the batch with BatchViews(tokens=True)")
        return tokens, mask

    def forward(self, batch, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-atom latents [N, d] in the batch's atom order (`tokens[mask]` order); `tokens`/`mask`
        override the batch's (e.g. a translated or masked JEPA context view)."""
        tokens, mask = self._views(batch, tokens, mask)
        _, h = self.forward_tokens(tokens, mask)
        return h[mask.bool()]  # [N, d]

    def embed(self, batch, kind: str = "cls", tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """[B, d]: the [CLS] output ('cls') or the masked mean / sum of the atom outputs ('mean', 'sum')."""
        tokens, mask = self._views(batch, tokens, mask)
        cls, h = self.forward_tokens(tokens, mask)
        if kind == "cls":
            return cls
        if kind not in ("mean", "sum"):
            raise ValueError(f"embed kind must be 'cls', 'mean' or 'sum', got {kind!r}")
        weights = mask.to(h.dtype).unsqueeze(-1)  # [B, L, 1]
        pooled = (h * weights).sum(1)  # [B, d]
        return pooled / weights.sum(1).clamp(min=1) if kind == "mean" else pooled
