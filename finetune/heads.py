"""A property head on an encoder: per-atom latents → readout → MLP → one scalar per crystal.

    h = encoder(batch)                 # [N, d]
    g = readout(h, batch)              # [B, d]   mean | sum | attention
    y_norm = mlp(g)                    # [B]      in normalised target units
    y = normalizer.denormalize(y_norm) # [B]      in the target's physical unit

The target normaliser (mean/std of the training labels) is part of the head: it is saved with
the head weights and applied inside `PropertyModel.predict`, so a saved model always answers
in physical units.

With a *prior* (`head_init: property_head`: the pretraining objective's own property head for the
same label, see pretrain/objectives/property_head.py), the head predicts a correction to it:

    y_norm = (prior(g) · scale − mean) / std + mlp(g)     mlp's last layer starts at zero

so the first epoch starts from the pretrained head's zero-shot prediction instead of a random one,
and both the prior and the correction are trained on the task's labels.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

READOUTS = ("mean", "sum", "attention")


@dataclass(frozen=True)
class TargetNormalizer:
    """y_norm = (y - mean) / std. `std` is 1 and `mean` 0 when normalisation is off."""

    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, values: torch.Tensor, kind: str = "standard") -> "TargetNormalizer":
        values = values[torch.isfinite(values)].double()
        if kind == "none" or values.numel() == 0:
            return cls()
        if kind != "standard":
            raise ValueError(f"target normalisation must be 'standard' or 'none', got {kind!r}")
        std = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
        # A constant target (or a single label) would divide by zero: fall back to unit scale.
        return cls(mean=float(values.mean()), std=std if std > 1e-12 else 1.0)

    def normalize(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.mean) / self.std

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.std + self.mean

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TargetNormalizer":
        return cls(mean=float(data["mean"]), std=float(data["std"]))


class AttentionReadout(nn.Module):
    """Gated attention pooling: g_b = Σ_i softmax_i(w·h_i + c) h_i over the atoms of crystal b."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, h: torch.Tensor, batch_index: torch.Tensor, num_crystals: int) -> torch.Tensor:
        s = self.score(h).squeeze(-1)  # [N]
        # Segment softmax: subtract each crystal's max for stability.
        s_max = torch.full((num_crystals,), -math.inf, dtype=s.dtype, device=s.device)
        s_max = s_max.scatter_reduce(0, batch_index, s, reduce="amax", include_self=True)
        w = torch.exp(s - s_max[batch_index])  # [N]
        denom = torch.zeros(num_crystals, dtype=s.dtype, device=s.device).index_add(0, batch_index, w)
        w = w / denom[batch_index].clamp(min=1e-30)  # [N]
        out = torch.zeros(num_crystals, h.shape[-1], dtype=h.dtype, device=h.device)
        return out.index_add(0, batch_index, w.unsqueeze(-1) * h)  # [B, d]


def prior_mlp(in_dim: int, hidden: int) -> nn.Sequential:
    """The architecture of a pretraining property head (pretrain/objectives/property_head.py)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))


class PropertyHead(nn.Module):
    """Readout + MLP. `hidden=()` makes it a linear probe on the pooled latent. `prior_hidden`:
    the hidden width of a prior head (module docstring); its weights come from `set_prior`."""

    def __init__(self, in_dim: int, readout: str = "mean", hidden: tuple[int, ...] = (256, 256), dropout: float = 0.0,
                 prior_hidden: int | None = None):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.readout_kind = readout
        self.attention = AttentionReadout(in_dim) if readout == "attention" else None
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.SiLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.prior = None
        if prior_hidden is not None:
            self.prior = prior_mlp(in_dim, int(prior_hidden))
            # y_norm of the prior = prior(g) · slope + offset (set from the scale and normaliser).
            self.register_buffer("prior_affine", torch.tensor([1.0, 0.0]))

    def set_prior(self, prior: nn.Module, scale: float, normalizer: "TargetNormalizer") -> None:
        """Copy a pretraining head's MLP in and start the correction at zero (module docstring)."""
        if self.prior is None:
            raise ValueError("this head was built without prior_hidden")
        self.prior.load_state_dict(prior.state_dict(), strict=True)
        self.prior_affine.copy_(torch.tensor([scale / normalizer.std, -normalizer.mean / normalizer.std]))
        last = self.mlp[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def pool(self, h: torch.Tensor, batch_index: torch.Tensor, num_atoms: torch.Tensor) -> torch.Tensor:
        """[N, d] per-atom latents → [B, d] per-crystal vectors."""
        num_crystals = int(num_atoms.shape[0])
        if self.attention is not None:
            return self.attention(h, batch_index, num_crystals)
        out = torch.zeros(num_crystals, h.shape[-1], dtype=h.dtype, device=h.device).index_add(0, batch_index, h)
        if self.readout_kind == "mean":
            out = out / num_atoms.clamp(min=1).to(h.dtype).unsqueeze(-1)
        return out

    def forward(self, h: torch.Tensor, batch_index: torch.Tensor, num_atoms: torch.Tensor) -> torch.Tensor:
        g = self.pool(h, batch_index, num_atoms)  # [B, d]
        y = self.mlp(g).squeeze(-1)  # [B] normalised units
        if self.prior is not None:
            slope, offset = self.prior_affine.to(g.dtype)
            y = y + self.prior(g).squeeze(-1) * slope + offset
        return y


class PropertyModel(nn.Module):
    """Encoder + head + normaliser. `forward` returns normalised predictions (for the loss);
    `predict` returns physical units."""

    def __init__(self, encoder: nn.Module, head: PropertyHead, normalizer: TargetNormalizer, frozen: bool = False):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.normalizer = normalizer
        self.frozen = frozen
        if frozen:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a frozen encoder keeps eval behaviour (dropout off, norms fixed)
            self.encoder.eval()
        return self

    def encode(self, batch) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return self.encoder(batch)  # [N, d]
        return self.encoder(batch)

    def forward(self, batch) -> torch.Tensor:
        return self.head(self.encode(batch), batch.batch_index, batch.num_atoms)  # [B]

    @torch.no_grad()
    def predict(self, batch) -> torch.Tensor:
        return self.normalizer.denormalize(self(batch))  # [B] physical units
