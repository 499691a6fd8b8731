"""CrysLDNet stage 1: a per-atom variational autoencoder on top of any encoder.

    encoder(batch with 30% of atom types masked)      h        [N, d_enc]
    Linear (no bias) → mean, log-variance              μ, log σ² [N, d_lat] (d_lat = 256)
    Z = μ + σ ⊙ ε (training) or μ (eval)               Z        [N, d_lat]
    decoders: atom type  Linear(Z) → logits           [N, 100]   cross-entropy on the masked atoms
              coordinate Linear(Z) → 3 per atom        [N, 3]
              lattice    Linear(mean_crystal Z) → 9|6 [B, 9|6]
    loss = CE + coord + lattice + α · KL(q(Z|x) ‖ N(0, I)),   α = 1e-5

Masking (the paper's "mask ratio 0.3"): each atom's *input* species is hidden with probability
0.3 and the type decoder is scored only on those atoms, as in the reference code — a masked-atom
prediction task (BERT style), not a corruption of the whole crystal. Hiding a species means
Z → 0 (the encoders' reserved mask index), zeroing its one-hot in the token view, and recomputing
the PDD weight column of the crystal from the visible species only (the column is Z_i/ΣZ, so an
unchanged ΣZ would leak the masked species). Coordinates and lattice are reconstructed for every
atom/crystal.

Targets (`target_mode`):
  paper      Cartesian coordinates (Å) and the raw 3×3 lattice, L1 losses, as in the reference code.
             An invariant encoder cannot know the crystal's orientation or origin, so these targets
             carry an irreducible loss; pretrain/README.md gives its measured size.
  invariant  (default) fractional coordinates compared up to one rigid translation per crystal
             (the translation that best aligns prediction and target: the canonical origin) with
             a periodic residual, scored as its Cartesian length (Å, pseudo-Huber); and the 6
             entries of the lattice's symmetric polar factor S = sqrt(L Lᵀ) (Å, L1). Both are
             invariant to rotations and translations, so a perfect invariant encoder can reach 0.

Normalisation (pretrain/objectives/base.py): per-atom terms (coordinate, KL, CE) are summed and
divided by norm.atoms — the CE sum by mask_ratio · norm.atoms, the expected number of masked atoms,
which keeps the reference's per-masked-atom mean while staying a plain sum over atoms —, the
lattice term is summed and divided by norm.crystals.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.record import MAX_Z
from pretrain.encoders.base import build_encoder
from pretrain.objectives.base import LossNorm, Objective
from pretrain.objectives.collapse import collapse_metrics
from pretrain.precision import at_least_fp32, fp32_region
from pretrain.objectives.property_head import PropertyHeadConfig, build_property_head
from pretrain.objectives.config import encoder_views, parse_config
from pretrain.objectives.geometry import aligned_frac_residual, min_image_distance, polar6

TARGET_MODES = ("invariant", "paper")


@dataclass(frozen=True)
class VAEConfig:
    """CrysLDNet stage-1 settings (defaults follow the paper unless noted).

    encoder: the backbone config for `build_encoder` (default PDDFormer, the paper's backbone).
    latent_dim: width of the per-atom latent Z (paper: 256).
    target_mode: 'invariant' (default; rotation/translation-invariant targets) or 'paper'
        (Cartesian coordinates and raw lattice, the reference code's targets).
    mask_ratio: probability that an atom's input species is hidden and predicted (paper: 0.3).
    kl_weight: α, the weight of the KL term (paper: 1e-5).
    type_weight, coord_weight, lattice_weight: weights of the three reconstruction terms (1 each).
    decoder_hidden: 0 → linear decoders (the reference); > 0 → one hidden SiLU layer of this width.
    coord_huber: δ (Å) of the pseudo-Huber coordinate loss of the invariant mode.
    logvar_init: initial log σ² of the posterior (a bias on the log-variance half of the moments
        layer). The reference has no bias, so σ starts at 1, far above the latent's spread; with
        α = 1e-5 nothing favours σ = 1, and starting there costs thousands of noise-dominated steps.
        -4 (σ ≈ 0.14) starts the decoders on signal; `null` reproduces the reference exactly.
    """

    encoder: dict = field(default_factory=lambda: {"name": "pddformer"})
    latent_dim: int = 256
    target_mode: str = "invariant"
    mask_ratio: float = 0.3
    kl_weight: float = 1e-5
    type_weight: float = 1.0
    coord_weight: float = 1.0
    lattice_weight: float = 1.0
    decoder_hidden: int = 0
    coord_huber: float = 0.01
    logvar_init: float | None = -4.0
    property_head: PropertyHeadConfig = field(default_factory=PropertyHeadConfig)

    def __post_init__(self):
        if self.target_mode not in TARGET_MODES:
            raise ValueError(f"vae.target_mode must be one of {TARGET_MODES}, got {self.target_mode!r}")
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"vae.mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if "name" not in self.encoder:
            raise ValueError("vae.encoder needs a 'name' (e.g. pddformer, matformer, jepa_transformer)")


def _head(in_dim: int, out_dim: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


def mask_atom_types(batch, mask: torch.Tensor):
    """A copy of `batch` whose atoms under `mask` [N] bool have their species hidden in every view."""
    z = batch.atomic_numbers.masked_fill(mask, 0)  # [N]; 0 is the encoders' mask index
    changes = {"atomic_numbers": z}
    if batch.tokens is not None:
        tokens = batch.tokens.clone()
        species = tokens[..., 3 : 3 + MAX_Z]  # view into the clone
        species[batch.token_mask] = species[batch.token_mask].masked_fill(mask.unsqueeze(-1), 0.0)
        changes["tokens"] = tokens
    if batch.pdd is not None:
        # Column 0 is Z_i / ΣZ of the crystal: recompute it from the visible species only.
        zf = z.to(batch.pdd.dtype)
        total = torch.zeros(batch.num_crystals, dtype=zf.dtype, device=zf.device).index_add(0, batch.batch_index, zf)
        pdd = batch.pdd.clone()
        pdd[:, 0] = zf / total[batch.batch_index].clamp(min=1.0)
        changes["pdd"] = pdd
    return replace(batch, **changes)


class VAEObjective(Objective):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder)
        d_enc, d_lat, hidden = self.encoder.out_dim, config.latent_dim, config.decoder_hidden
        self.moments = nn.Linear(d_enc, 2 * d_lat, bias=config.logvar_init is not None)  # the reference's quant_conv
        if config.logvar_init is not None:
            with torch.no_grad():
                self.moments.bias[:d_lat].zero_()  # mean half
                self.moments.bias[d_lat:].fill_(config.logvar_init)  # log-variance half
        self.type_head = _head(d_lat, MAX_Z, hidden)
        self.coord_head = _head(d_lat, 3, hidden)
        self.lattice_head = _head(d_lat, 9 if config.target_mode == "paper" else 6, hidden)
        self.property_head = build_property_head(config.property_head, d_enc)  # None unless weighted

    # ------------------------------------------------------------------ randomness (overridable in tests)
    def draw_mask(self, batch) -> torch.Tensor:
        """[N] bool: atoms whose species is hidden."""
        return torch.rand(batch.num_nodes, device=batch.atomic_numbers.device) < self.config.mask_ratio

    def draw_eps(self, mean: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(mean)

    # ------------------------------------------------------------------ model
    def batch_views(self) -> dict:
        return encoder_views(self.encoder)

    def posterior(self, batch, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) [N, d_lat] of q(Z | batch with `mask`ed species)."""
        return self._moments(self._encode(batch, mask))

    def _encode(self, batch, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            batch = mask_atom_types(batch, mask)
        return self.encoder(batch)  # [N, d_enc]

    def _moments(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.moments(h).chunk(2, dim=-1)  # [N, d_lat] each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, batch) -> dict[str, torch.Tensor]:
        crystal_z = self.encoder.readout(z, batch, "mean")  # [B, d_lat]
        return {
            "type_logits": self.type_head(z),  # [N, MAX_Z]; class c is Z = c + 1
            "coords": self.coord_head(z),  # [N, 3] Å (paper) or fractional (invariant)
            "lattice": self.lattice_head(crystal_z),  # [B, 9] (paper) or [B, 6] polar factor
        }

    # ------------------------------------------------------------------ losses
    def coord_error(self, pred: torch.Tensor, batch) -> torch.Tensor:
        """[N] per-atom coordinate loss."""
        if self.config.target_mode == "paper":
            return (pred - batch.cart_coords().to(pred.dtype)).abs().mean(-1)  # L1, mean over x, y, z
        residual = aligned_frac_residual(pred, batch.frac_coords.to(pred.dtype), batch.batch_index, batch.num_crystals)
        cart = torch.einsum("ni,nij->nj", residual, batch.lattice.to(pred.dtype)[batch.batch_index])  # [N, 3] Å
        delta = self.config.coord_huber
        return torch.sqrt(cart.pow(2).sum(-1) + delta**2) - delta  # pseudo-Huber of the length

    def lattice_target(self, batch) -> torch.Tensor:
        if self.config.target_mode == "paper":
            return batch.lattice.reshape(-1, 9)  # [B, 9]
        return polar6(batch.lattice)  # [B, 6]

    def loss(self, batch, norm: LossNorm | None = None):
        norm = norm or LossNorm.of(batch)
        cfg = self.config
        mask = self.draw_mask(batch)  # [N]
        h = self._encode(batch, mask)  # [N, d_enc]
        mean, logvar = self._moments(h)
        z = mean + torch.exp(0.5 * logvar) * self.draw_eps(mean) if self.training else mean  # [N, d_lat]
        out = self.decode(z, batch)

        # Targets, geometry and reductions in fp32 whatever the autocast dtype (pretrain/precision.py).
        with fp32_region(batch.frac_coords.device):
            out = {k: at_least_fp32(v) for k, v in out.items()}
            mean, logvar = at_least_fp32(mean, logvar)
            target_type = (batch.atomic_numbers - 1).clamp(min=0)  # [N]
            ce = F.cross_entropy(out["type_logits"], target_type, reduction="none")  # [N]
            type_loss = (ce * mask).sum() / (cfg.mask_ratio * norm.atoms)
            coord_loss = self.coord_error(out["coords"], batch).sum() / norm.atoms
            lattice_target = self.lattice_target(batch).to(out["lattice"].dtype)
            lattice_loss = (out["lattice"] - lattice_target).abs().mean(-1).sum() / norm.crystals
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)  # [N]
            kl_loss = kl.sum() / norm.atoms

            loss = (
                cfg.type_weight * type_loss
                + cfg.coord_weight * coord_loss
                + cfg.lattice_weight * lattice_loss
                + cfg.kl_weight * kl_loss
            )
        property_metrics = {}
        if self.property_head is not None:
            # 'masked': the masked pass's embedding (no second pass; masking as augmentation).
            # 'clean': a second pass with every species visible, as fine-tuning will see the crystal.
            h_property = self.encoder(batch) if cfg.property_head.input == "clean" else h
            property_loss, property_metrics = self.property_head.loss(self.encoder.readout(h_property, batch, "mean"), batch, norm.crystals)
            loss = loss + property_loss
        with torch.no_grad():
            correct = (out["type_logits"].argmax(-1) == target_type) & mask
            metrics = {
                "loss": float(loss.detach()),
                "type_loss": float(type_loss.detach()),
                "coord_loss": float(coord_loss.detach()),
                "lattice_loss": float(lattice_loss.detach()),
                "kl": float(kl_loss.detach()),
                "type_acc_masked": float(correct.sum() / mask.sum().clamp(min=1)),
                "masked_atoms": float(mask.sum()),
                **collapse_metrics(mean.detach(), "latent"),
                **property_metrics,
            }
        return loss, metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def reconstruct(self, batch, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Deterministic reconstruction (Z = μ) with `mask`ed species, in common units:
        types [N] (predicted Z), frac [N, 3] (predicted fractional coordinates, in the target's
        frame), lattice_error [B] (mean absolute error of the lattice target, Å),
        coord_rmsd [B] (minimum-image RMSD, Å) and coord_rmsd_aligned [B] (after the best rigid
        translation)."""
        mean, _ = self.posterior(batch, mask)
        out = self.decode(mean, batch)
        lattice = batch.lattice.to(mean.dtype)
        per_atom_lattice = lattice[batch.batch_index]  # [N, 3, 3]
        if self.config.target_mode == "paper":
            frac = torch.linalg.solve(per_atom_lattice.transpose(-1, -2), out["coords"].unsqueeze(-1)).squeeze(-1)
        else:
            frac = out["coords"]
        target = batch.frac_coords.to(mean.dtype)
        raw = min_image_distance(frac - target, per_atom_lattice)  # [N]
        aligned_residual = aligned_frac_residual(frac, target, batch.batch_index, batch.num_crystals)
        aligned = min_image_distance(aligned_residual, per_atom_lattice)  # [N]
        counts = batch.num_atoms.to(mean.dtype)

        def per_crystal_rms(d):
            sq = torch.zeros(batch.num_crystals, dtype=d.dtype, device=d.device).index_add(0, batch.batch_index, d**2)
            return torch.sqrt(sq / counts)

        lattice_error = (out["lattice"] - self.lattice_target(batch).to(mean.dtype)).abs().mean(-1)  # [B]
        return {
            "types": out["type_logits"].argmax(-1) + 1,
            "frac": frac,
            "coord_rmsd": per_crystal_rms(raw),
            "coord_rmsd_aligned": per_crystal_rms(aligned),
            "lattice_error": lattice_error,
        }


def build(config: dict) -> VAEObjective:
    return VAEObjective(parse_config(VAEConfig, config, "objective 'vae'"))
