"""Crys-JEPA: an energy-aware joint-embedding predictive architecture for crystals.

    target   z_i = encoder.embed(crystal_i)                        [B, d]   ([CLS] of the token encoder)
    context  c_i = encoder.embed(moved crystal_i)                  [B, d]   (random translation, Haar
             rotation, atom order shuffled: `augment.random_context`)
    predict  p_i = MLP(c_i + MLP(params_i)),  params = (t ‖ u)      [B, d]   conditioned on the move

loss 'infonce' (the paper's):  energy-weighted InfoNCE with cosine similarity, τ = 0.1
    s_ik = cos(p_i, z_k);  ω_ik = 1 − exp(−|E_i − E_k|), ω_ii = 1  (E = formation energy per atom)
    L_i  = −log softmax_k(ω_ik s_ik / τ)[i]
    Pairs of near-equal energy get ω ≈ 0, so their similarity is left alone; the further apart two
    crystals are in energy, the harder they are pushed apart — the embedding keeps ΔE_f ordered.
    A crystal without the energy label uses ω = 1 with everyone (plain InfoNCE for its pairs).
loss 'sigreg' (the paper's appendix, LeJEPA's recipe): (1 − λ) · MSE(p_i, z_i) + λ · SIGReg of the
    embeddings (random 1-D projections pushed towards N(0, 1) by the Epps–Pulley statistic).

Target encoder: `shared` (default) — the same encoder, with gradients through both views, as in
the reference code (one backbone encodes both views; no EMA, no stop-gradient): InfoNCE's
negatives and SIGReg's Gaussian target are what prevent collapse, which is why an EMA teacher is
not needed. `ema` (an EMA copy, no gradient) is offered for ablations.

Normalisation: both losses are per-crystal terms, summed and divided by norm.crystals; the SIGReg
statistic is a property of the local batch and is weighted by its share of the crystals
(B / norm.crystals), so over ranks it adds up to a crystal-weighted mean. InfoNCE's negatives are
the crystals of the local batch: with several ranks, the loss is the mean of per-rank InfoNCE
losses, not one InfoNCE over the global batch (the reference trains the same way).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.encoders.base import Encoder, build_encoder
from pretrain.objectives.augment import CONTEXT_LATTICE, random_context
from pretrain.objectives.base import LossNorm, Objective
from pretrain.objectives.collapse import collapse_metrics
from pretrain.objectives.property_head import PropertyHeadConfig, build_property_head
from pretrain.objectives.config import encoder_views, parse_config
from pretrain.objectives.sigreg import SIGReg
from pretrain.precision import at_least_fp32, fp32_region

LOSSES = ("infonce", "sigreg")
TARGETS = ("shared", "ema")


@dataclass(frozen=True)
class JEPAConfig:
    """Crys-JEPA settings (paper defaults unless noted).

    encoder: backbone config (default the token transformer `jepa_transformer`).
    embedding: which pooled embedding of the encoder is the crystal's ('cls' for the token
        transformer, as in the paper; 'mean' for graph encoders).
    loss: 'infonce' (paper) or 'sigreg' (appendix: MSE + SIGReg).
    temperature: τ of the InfoNCE (0.1).
    energy_label: the label giving E in ω_ik (formation_energy_per_atom).
    target_encoder: 'shared' (paper/reference) or 'ema'.  ema_decay: its decay.
    sigreg_weight: λ in (1 − λ) MSE + λ SIGReg (LeJEPA's 0.05).  sigreg_slices: random projections.
    translate, rotate, permute: the parts of the context move (all on, as in the paper).
    context_lattice: 'polar' (default; the token view's invariant lattice) or 'rotated_triu'
        (the reference's upper triangle of S Rᵀ); see augment.py.
    predictor_hidden: hidden width of the predictor and of the move embedding (0 → encoder width).
    """

    encoder: dict = field(default_factory=lambda: {"name": "jepa_transformer"})
    embedding: str = "cls"
    loss: str = "infonce"
    temperature: float = 0.1
    energy_label: str = "formation_energy_per_atom"
    target_encoder: str = "shared"
    ema_decay: float = 0.996
    sigreg_weight: float = 0.05
    sigreg_slices: int = 256
    translate: bool = True
    rotate: bool = True
    permute: bool = True
    context_lattice: str = "polar"
    predictor_hidden: int = 0
    property_head: PropertyHeadConfig = field(default_factory=PropertyHeadConfig)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"jepa.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.target_encoder not in TARGETS:
            raise ValueError(f"jepa.target_encoder must be one of {TARGETS}, got {self.target_encoder!r}")
        if self.context_lattice not in CONTEXT_LATTICE:
            raise ValueError(f"jepa.context_lattice must be one of {CONTEXT_LATTICE}, got {self.context_lattice!r}")
        if self.temperature <= 0:
            raise ValueError(f"jepa.temperature must be > 0, got {self.temperature}")


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """The reference's two-layer SiLU MLP."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


def energy_weights(energy: torch.Tensor) -> torch.Tensor:
    """ω [B, B]: 1 − exp(−|E_i − E_k|) off the diagonal, 1 on it; 1 wherever an energy is missing."""
    diff = (energy.unsqueeze(0) - energy.unsqueeze(1)).abs()  # [B, B]
    w = 1.0 - torch.exp(-diff)
    w = torch.where(torch.isnan(w), torch.ones_like(w), w)
    return w.fill_diagonal_(1.0)


def weighted_infonce(pred: torch.Tensor, target: torch.Tensor, energy: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B] per-crystal energy-weighted InfoNCE: −log softmax_k(ω_ik cos(p_i, z_k) / τ)[i]."""
    sim = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).transpose(0, 1)  # [B, B] cosine
    logits = sim * energy_weights(energy).to(sim.dtype) / temperature
    return -torch.diagonal(F.log_softmax(logits, dim=-1))


class JEPAObjective(Objective):
    def __init__(self, config: JEPAConfig):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder)
        if config.embedding == "cls" and type(self.encoder).embed is Encoder.embed:
            raise ValueError(
                f"jepa.embedding 'cls' needs an encoder with a [CLS] token (jepa_transformer); "
                f"{config.encoder['name']} offers 'mean' or 'sum': set jepa.embedding: mean"
            )
        d = self.encoder.out_dim
        hidden = config.predictor_hidden or d
        self.move_embedding = _mlp(6, hidden, d)  # the reference's cond_emb of (t ‖ u)
        self.predictor = _mlp(d, hidden, d)
        self.sigreg = SIGReg(num_slices=config.sigreg_slices)
        self.property_head = build_property_head(config.property_head, d)  # None unless weighted
        if config.target_encoder == "ema":
            self.target = copy.deepcopy(self.encoder).requires_grad_(False)

    def batch_views(self) -> dict:
        return encoder_views(self.encoder)

    def embed(self, batch, encoder: nn.Module | None = None) -> torch.Tensor:
        """[B, d] crystal embeddings (what evaluation and discovery compare)."""
        encoder = encoder or self.encoder
        return encoder.embed(batch, self.config.embedding)

    def draw_context(self, batch):
        cfg = self.config
        return random_context(batch, None, cfg.translate, cfg.rotate, cfg.permute, cfg.context_lattice)

    def loss(self, batch, norm: LossNorm | None = None):
        norm = norm or LossNorm.of(batch)
        cfg = self.config
        if cfg.target_encoder == "ema":
            with torch.no_grad():
                target = self.embed(batch, self.target)  # [B, d]
        else:
            target = self.embed(batch)  # [B, d]
        with fp32_region(batch.frac_coords.device):  # rotations are matmuls: keep the moved crystal fp32
            view, params = self.draw_context(batch)
        context = self.embed(view)  # [B, d]
        pred = self.predictor(context + self.move_embedding(params.to(context.dtype)))  # [B, d]

        # Similarities, targets and reductions in fp32 whatever the autocast dtype (pretrain/precision.py).
        with fp32_region(batch.frac_coords.device):
            pred, target, context = at_least_fp32(pred, target, context)
            if cfg.loss == "infonce":
                energy = batch.labels.get(cfg.energy_label)
                if energy is None:
                    raise ValueError(
                        f"jepa: the batch has no '{cfg.energy_label}' label, which the energy-weighted InfoNCE needs "
                        "(set jepa.energy_label, or use loss: sigreg, which needs no labels)"
                    )
                per_crystal = weighted_infonce(pred, target, energy.to(pred.device), cfg.temperature)  # [B]
                loss = per_crystal.sum() / norm.crystals
                extra = {"infonce": float(loss.detach())}
            else:
                mse = (pred - target).pow(2).mean(-1).sum() / norm.crystals
                embeddings = torch.cat([target, context], 0) if cfg.target_encoder == "shared" else context
                reg = self.sigreg(embeddings) * (batch.num_crystals / norm.crystals)
                loss = (1 - cfg.sigreg_weight) * mse + cfg.sigreg_weight * reg
                extra = {"mse": float(mse.detach()), "sigreg": float(reg.detach())}

        if self.property_head is not None:  # reduces its loss in fp32 itself
            # On the target (unmoved) embedding: the one fine-tuning and screening read.
            source = target if cfg.target_encoder == "shared" else self.embed(batch)
            property_loss, property_metrics = self.property_head.loss(source, batch, norm.crystals)
            loss = loss + property_loss
            extra.update(property_metrics)
        with torch.no_grad():
            cos = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T  # [B, B]
            metrics = {
                "loss": float(loss.detach()),
                **extra,
                "positive_cosine": float(cos.diagonal().mean()),
                "retrieval_acc": float((cos.argmax(-1) == torch.arange(len(cos), device=cos.device)).float().mean()),
                **collapse_metrics(target.detach(), "embedding"),
            }
        return loss, metrics

    @torch.no_grad()
    def after_step(self) -> None:
        if self.config.target_encoder != "ema":
            return
        decay = self.config.ema_decay
        for ema, online in zip(self.target.parameters(), self.encoder.parameters()):
            ema.lerp_(online.detach(), 1.0 - decay)
        for ema, online in zip(self.target.buffers(), self.encoder.buffers()):
            ema.copy_(online)


def build(config: dict) -> JEPAObjective:
    return JEPAObjective(parse_config(JEPAConfig, config, "objective 'jepa'"))
