"""CrysLDNet stage 2: joint latent flow matching of the encoder's per-atom latents.

    Z1 = encoder(batch)                               [N, d]   the per-atom latents (reference: the
                                                               encoder output before the VAE moments)
    Z0 ~ N(0, I),  t ~ U[0.01, 0.99] per crystal      [N, d], [B]
    Z_t = (1 − t) Z0 + t Z1                           [N, d]
    Ẑ1 = DiT(Z_t, t)   (the atoms of each crystal are one token set)
    loss_flow = Σ_atoms mean_d (Ẑ1 − Z1)² / (1 − min(t, 0.9))²  / norm.atoms

Encoder and DiT are trained together, so the encoder can lower the loss by shrinking its latents
towards a constant (latent collapse). `guard` picks what stops it:
    stopgrad  (default) the regression target is sg(Z1): the encoder still trains with the DiT,
              but only through the DiT's input Z_t, never by moving the target
    ema       the target is the latent of an exponential-moving-average copy of the encoder
    vae       keep the stage-1 VAE loss with weight `vae_weight`: the latents must still
              reconstruct the crystal. Weak with latent='encoder': the VAE's moments layer can
              undo any shrinking of Z1, so the reconstruction does not hold Z1's scale up; costs a
              second encoder pass (the VAE sees the species-masked batch)
    none      no guard — the reference code's setting (flow loss only)
Measured on 8 MP-20 crystals, 80 steps (tests/pretrain/test_latent_flow.py, pretrain/README.md):
latent variance none 0.013, vae 0.015, ema 0.25, stopgrad 0.34 (0.12 at the start).
Latent variance and effective rank of Z1 are logged every step either way.

Stage 2 normally starts from a stage-1 release: `init_from: <release dir>` takes the VAE config
(encoder included) from the release and copies its weights. The config to save with a stage-2
checkpoint is `export_config()`, which inlines that VAE config and drops `init_from`, so the
release loads without the stage-1 directory.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from pretrain.objectives.base import LossNorm, Objective, require_init_source
from pretrain.objectives.collapse import collapse_metrics
from pretrain.objectives.config import parse_config
from pretrain.objectives.dit import DiT, DiTConfig, pad_atoms
from pretrain.objectives.vae import VAEConfig, VAEObjective
from pretrain.encoders.blocks import model_dtype
from pretrain.precision import at_least_fp32, fp32_region

GUARDS = ("vae", "stopgrad", "ema", "none")
LATENTS = ("encoder", "posterior_mean")


@dataclass(frozen=True)
class LatentFlowConfig:
    """CrysLDNet stage-2 settings.

    vae: the stage-1 VAE config (encoder included); taken from the release when `init_from` is set.
    dit: DiT settings; preset 'base' = 12 layers, width 768, 12 heads (the paper's).
    latent: 'encoder' (Z1 = encoder output, as the reference) or 'posterior_mean' (Z1 = the VAE's μ).
    guard: collapse guard, one of stopgrad (default) | ema | vae | none (see the module docstring;
        the reference code trains with none).
    vae_weight: weight of the VAE loss under guard 'vae'.
    ema_decay: decay of the EMA target encoder under guard 'ema'.
    t_min, t_max: t ~ U[t_min, t_max] (paper: 0.01, 0.99).
    t_clip: the loss weight is 1 / (1 − min(t, t_clip))² (paper: 0.9).
    init_from: a stage-1 (vae) or stage-2 (latent_flow) release directory to start from.
    """

    vae: dict = field(default_factory=dict)
    dit: DiTConfig = field(default_factory=DiTConfig)
    latent: str = "encoder"
    guard: str = "stopgrad"
    vae_weight: float = 1.0
    ema_decay: float = 0.999
    t_min: float = 0.01
    t_max: float = 0.99
    t_clip: float = 0.9
    init_from: str | None = None

    def __post_init__(self):
        if self.guard not in GUARDS:
            raise ValueError(f"latent_flow.guard must be one of {GUARDS}, got {self.guard!r}")
        if self.latent not in LATENTS:
            raise ValueError(f"latent_flow.latent must be one of {LATENTS}, got {self.latent!r}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"latent_flow needs 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if not 0.0 < self.t_clip < 1.0:
            raise ValueError(f"latent_flow.t_clip must be in (0, 1), got {self.t_clip}")


def _read_init(path: str, init_source):
    """(vae config dict, vae state dict) from a stage-1 or stage-2 release (loaded by the caller)."""
    source = require_init_source(path, init_source, "latent_flow")
    if isinstance(source, VAEObjective):
        return asdict(source.config), source.state_dict()
    if isinstance(source, LatentFlowObjective):
        return asdict(source.vae.config), source.vae.state_dict()
    raise ValueError(f"latent_flow.init_from: {path} holds a {type(source).__name__}, not a vae or latent_flow release")


class LatentFlowObjective(Objective):
    def __init__(self, config: LatentFlowConfig, init_source=None):
        super().__init__()
        init_state = None
        if config.init_from is not None:
            vae_config, init_state = _read_init(config.init_from, init_source)
            config = replace(config, vae=vae_config)
        self.config = config
        self.vae = VAEObjective(parse_config(VAEConfig, config.vae, "objective 'latent_flow'.vae"))
        if init_state is not None:
            self.vae.load_state_dict(init_state, strict=True)
        latent_dim = self.vae.encoder.out_dim if config.latent == "encoder" else self.vae.config.latent_dim
        self.dit = DiT(latent_dim, config.dit)
        if config.guard == "ema":
            self.ema_encoder = copy.deepcopy(self.vae.encoder).requires_grad_(False)

    @property
    def encoder(self):
        # A property, not a second registration: the encoder's weights appear once in state_dict
        # (as vae.encoder.*), which safetensors requires.
        return self.vae.encoder

    def export_config(self) -> dict:
        """The config to save with a checkpoint: VAE config inlined, init_from dropped."""
        out = asdict(self.config)
        out["init_from"] = None
        return {"name": "latent_flow", **out}

    def batch_views(self) -> dict:
        return self.vae.batch_views()

    # ------------------------------------------------------------------ randomness (overridable in tests)
    def draw_time(self, batch) -> torch.Tensor:
        """[B] flow times."""
        u = torch.rand(batch.num_crystals, device=batch.atomic_numbers.device)
        return self.config.t_min + (self.config.t_max - self.config.t_min) * u

    def draw_prior(self, z1: torch.Tensor, batch) -> torch.Tensor:
        return torch.randn_like(z1)

    # ------------------------------------------------------------------ model
    def latents(self, batch, encoder: nn.Module | None = None) -> torch.Tensor:
        """Z1 [N, d] from `encoder` (default: the online encoder)."""
        encoder = encoder or self.encoder
        h = encoder(batch)  # [N, d_enc]
        if self.config.latent == "encoder":
            return h
        mean, _ = self.vae.moments(h).chunk(2, dim=-1)
        return mean

    def loss(self, batch, norm: LossNorm | None = None):
        norm = norm or LossNorm.of(batch)
        cfg = self.config
        z1 = self.latents(batch)  # [N, d]
        if cfg.guard == "stopgrad":
            target = z1.detach()
        elif cfg.guard == "ema":
            with torch.no_grad():
                target = self.latents(batch, self.ema_encoder)
        else:
            target = z1

        # Time, path and loss in at least fp32 (autocast lowers only the DiT's layers; pretrain/precision.py).
        z1, target = at_least_fp32(z1, target)
        t = self.draw_time(batch).to(z1.dtype)  # [B]
        t_atom = t[batch.batch_index].unsqueeze(-1)  # [N, 1]
        z0 = self.draw_prior(z1, batch)  # [N, d]
        zt = (1 - t_atom) * z0 + t_atom * z1  # [N, d]
        zt_pad, mask = pad_atoms(zt, batch.batch_index, batch.num_atoms)  # [B, L, d], [B, L]
        pred = at_least_fp32(self.dit(zt_pad.to(model_dtype(self.dit)), t, mask)[mask])  # [N, d] in atom order
        with fp32_region(batch.frac_coords.device):
            weight = 1.0 / (1.0 - torch.clamp(t_atom, max=cfg.t_clip)) ** 2  # [N, 1]
            flow_loss = (weight * (pred - target) ** 2).mean(-1).sum() / norm.atoms
        loss = flow_loss

        metrics = {}
        if cfg.guard == "vae":
            vae_loss, vae_metrics = self.vae.loss(batch, norm)
            loss = loss + cfg.vae_weight * vae_loss
            metrics.update({f"vae_{k}": v for k, v in vae_metrics.items() if not k.startswith("latent_")})
        with torch.no_grad():
            unweighted = ((pred - target) ** 2).mean()
        metrics.update(
            {
                "loss": float(loss.detach()),
                "flow_loss": float(flow_loss.detach()),
                "flow_mse": float(unweighted),
                **collapse_metrics(z1.detach(), "latent"),
            }
        )
        return loss, metrics

    @torch.no_grad()
    def after_step(self) -> None:
        if self.config.guard != "ema":
            return
        decay = self.config.ema_decay
        for ema, online in zip(self.ema_encoder.parameters(), self.encoder.parameters()):
            ema.lerp_(online.detach(), 1.0 - decay)
        for ema, online in zip(self.ema_encoder.buffers(), self.encoder.buffers()):
            ema.copy_(online)


def build(config: dict, init_source=None) -> LatentFlowObjective:
    return LatentFlowObjective(parse_config(LatentFlowConfig, config, "objective 'latent_flow'"), init_source)
