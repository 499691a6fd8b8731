"""DDPM crystal generator over the token view: the Crys-JEPA paper's base generator (§4.2).

Each atom is one 109-d token x = [2·frac − 1 (3) ‖ 2·one-hot(Z) − 1 (100) ‖ lattice (6)], where
the lattice part is the crystal's rotation-invariant polar factor S = sqrt(L Lᵀ), normalised with
fixed constants (diagonal (S − 6 Å)/3 Å, off-diagonal S/2 Å) and repeated on every atom of the
crystal. A DDPM (T = 256, cosine schedule, ε-prediction) learns to denoise these tokens with a
pre-norm Transformer (default 12 layers, width 1024, 8 heads, dropout 0.01); a sinusoidal
timestep embedding through a linear layer is added to the input of every layer; there is no
atom-order positional encoding, so the denoiser is permutation-equivariant.

Sampling draws the number of atoms from the training distribution (a histogram the objective
accumulates while training and stores in its weights), runs ancestral sampling, and decodes:
frac = ((x + 1)/2) mod 1, Z = argmax of the one-hot part, lattice = S averaged over the crystal's
atoms (symmetrised, eigenvalues floored at 1 Å so the cell is never degenerate; its orientation
is the canonical one L = S).

The ε-MSE is the paper's mean over all 109 dimensions by default, which gives the species one-hot
100/109 of the weight and the coordinates 3/109; `part_weights` weighs the three parts' own means
instead (docs/discovery_mp20.md measures what that does to validity). The objective also
accumulates the normal equations of a per-element volume model (cell volume ≈ Σ_atoms v_Z, least
squares over the training crystals); `sample(volume="composition")` scales each denoised cell,
shape and fractional coordinates kept, to the volume that model predicts for its composition.

`coordinates: wrapped` replaces the coordinates' DDPM with DiffCSP's score matching on the torus
(Jiao et al., NeurIPS 2023): frac_t = (frac_0 + σ_t·z) mod 1 with σ_t geometric from 0.005 to 0.5, the
denoiser reads sin/cos(2π·frac_t) and predicts the wrapped normal's −score divided by its root mean
square at σ_t, and sampling starts from uniform coordinates and takes the reverse VE-SDE step on the
torus (plus an optional Langevin corrector step). The species and lattice keep the DDPM, on the same t.

`denoiser: cspnet` replaces the Transformer's layers with DiffCSP's CSPNet message passing over every
ordered pair of a crystal's atoms (edge features: the crystal's lattice numbers and sin/cos(2πk·Δfrac)).
Its atoms read no absolute position, so the denoiser is invariant to translating the crystal.
`denoiser: hybrid` follows every second CSPNet layer with a Transformer layer over the crystal's atoms.

`species_output: softmax` reads the denoiser's species outputs as logits (x̂0 = 2·softmax − 1, the implied
ε goes to the sampler, the loss's species term is the cross-entropy); `posterior` adds each species' exact
log-likelihood of the token's own noisy one-hot to those logits, so the network supplies only the prior
that the rest of the crystal implies.

Species are restricted at sampling time to an allowed set (default: the elements the training
crystals contain, from a second histogram stored in the weights, and Z ≤ 94, CHGNet's table). The
restriction is a projection onto the data's support, applied at every step of the chain: the
predicted x̂0's one-hot entries of a disallowed species are set to −1 (the value every training
token has there), and the final argmax runs over the allowed species only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from data_pipeline.record import MAX_Z, CrystalRecord
from pretrain.objectives.base import LossNorm, Objective, require_init_source
from pretrain.objectives.config import parse_config
from pretrain.objectives.dit import pad_atoms

TOKEN = 3 + MAX_Z + 6
SAMPLE_MAX_Z = 94  # CHGNet's element table stops at plutonium (discovery.relax.CHGNET_MAX_Z)
_TRIU = torch.triu_indices(3, 3)
# the token's three parts: part_weights and the per-part ε-MSE metrics use the same slices
TOKEN_PARTS = {"coords": slice(0, 3), "species": slice(3, 3 + MAX_Z), "lattice": slice(3 + MAX_Z, TOKEN)}
_DIAG = torch.tensor([True, False, False, True, False, True])  # which polar6 entries are diagonal


@dataclass(frozen=True)
class DDPMConfig:
    """layers/width/heads/dropout: the denoiser (paper defaults). steps: T of the DDPM.
    cosine_s: offset of the cosine schedule (Nichol & Dhariwal). max_atoms: largest crystal the
    atom-count histogram tracks (larger ones are counted at max_atoms). init_from: a ddpm release
    directory whose architecture and weights (histogram included) this objective starts from."""

    layers: int = 12
    width: int = 1024
    heads: int = 8
    dropout: float = 0.01
    steps: int = 256
    cosine_s: float = 0.008
    max_atoms: int = 64
    init_from: str | None = None  # a ddpm release to continue from (refinement); its sizes win
    # ε-MSE weights of the token's three parts (coordinates, species, lattice), each part's mean
    # over its dimensions; None: the paper's plain mean over all 109 dimensions, where the species
    # one-hot is 100/109 of the loss and the lattice 6/109 (docs/discovery_mp20.md)
    part_weights: tuple[float, float, float] | None = None
    # self-conditioning (Chen, Zhang & Hinton, "Analog Bits", 2022): the denoiser also reads its own
    # previous x̂0 estimate (zeros on half the training batches, the estimate of a first no-grad pass
    # on the others; the last step's x̂0 while sampling), so the atoms of a crystal can agree on a
    # composition they have already half decided; off: the paper's denoiser
    self_condition: bool = False
    # periodic pair bias: each layer adds to its attention logits a learned linear map (per head) of
    # the Fourier features sin/cos(2πk·Δfrac), k = 1..pair_frequencies, of every atom pair's noisy
    # fractional-coordinate difference (DiffCSP's periodic edge features, Graphormer's attention
    # bias), so the denoiser sees which atoms are close; 0: the paper's denoiser, geometry-blind
    pair_frequencies: int = 0
    # how the fractional coordinates are noised: "gaussian" is the paper's DDPM on 2·frac − 1 (the
    # ε target of an atom near a cell face is then ambiguous: 0.02 and 0.98 are neighbours); "wrapped"
    # is DiffCSP's score matching on the torus (Jiao et al., NeurIPS 2023): frac_t = (frac + σ_t·z) mod 1
    # with σ_t geometric from sigma_begin to sigma_end over the T steps, the denoiser reads sin/cos(2π·frac)
    # and predicts the wrapped normal's score, normalised per step; species and lattice stay DDPM
    coordinates: str = "gaussian"
    sigma_begin: float = 0.005
    sigma_end: float = 0.5
    # how the denoiser outputs the coordinates' part: "linear" (the output layer on each atom's state), or
    # "pair", that plus Σ_j c_k(h_i, h_j)·sin(2πk·Δfrac_ij), k = 1..4, over the crystal's other atoms (a
    # periodic displacement read from every pair, as the coordinate messages of DiffCSP's CSPNet)
    coordinate_head: str = "linear"
    # wrapped coordinates only: the step size of one Langevin corrector step per sampling step
    # (DiffCSP's step_lr, scaled by (σ_t/σ_begin)²); 0: the predictor alone
    corrector_lr: float = 0.0
    # the denoiser's layers: "transformer" (the paper's: attention over the crystal's atoms, geometry only
    # through the optional pair bias), or "cspnet", DiffCSP's CSPNet message passing (Jiao et al., 2023):
    # every ordered pair of the cell's atoms sends m_ij = MLP(h_i, h_j, lattice, sin/cos(2πk·Δfrac_ij)),
    # k = 1..pair_frequencies, and each atom adds MLP(h_i, mean_j m_ij), so the atoms' states carry
    # where their neighbours are (heads and dropout are unused there); "hybrid": every second CSPNet layer
    # (the last included) is followed by a Transformer layer over the crystal's atoms (heads, dropout used),
    # so the atoms also attend to each other's states, species included: CSPNet's mean over all pairs
    # cannot single out what the others chose (one after every layer costs 2.5× CSPNet's step)
    denoiser: str = "transformer"
    # what the denoiser's species outputs are: "eps", the one-hot part's noise like every other part (the
    # paper's; the 128-wide stream must then carry 100 dims of noise, and session 10 measured the species
    # x̂0 less accurate at ᾱ = 0.84 than the argmax of x_t itself, biased to O), or "softmax", logits over
    # the species: x̂0 = 2·softmax − 1, the ε it implies goes to the sampler unchanged, and the species
    # part of the loss is the cross-entropy against the true species (CDCD, Dieleman et al. 2022); "posterior",
    # softmax with the token's own evidence added to the logits: log N(x_t | √ᾱ(2e_k − 1), 1 − ᾱ) up to a
    # constant, 2√ᾱ/(1 − ᾱ)·x_t[k], exact for each species k, so the network learns only what the crystal's
    # context adds (its logits are a prior) and its x̂0 is never worse than the noisy one-hot's own argmax
    species_output: str = "eps"

    def __post_init__(self):
        if self.species_output not in ("eps", "softmax", "posterior"):
            raise ValueError("objective 'ddpm': species_output must be 'eps', 'softmax' or 'posterior', "
                             f"got {self.species_output!r}")
        if self.denoiser not in ("transformer", "cspnet", "hybrid"):
            raise ValueError("objective 'ddpm': denoiser must be 'transformer', 'cspnet' or 'hybrid', "
                             f"got {self.denoiser!r}")
        if self.denoiser != "transformer" and self.pair_frequencies < 1:
            raise ValueError(f"objective 'ddpm': denoiser {self.denoiser!r} reads the pairs' Fourier features: "
                             f"set pair_frequencies ≥ 1 (DiffCSP uses 10), got {self.pair_frequencies}")
        if self.coordinates not in ("gaussian", "wrapped"):
            raise ValueError(f"objective 'ddpm': coordinates must be 'gaussian' or 'wrapped', got {self.coordinates!r}")
        if self.coordinate_head not in ("linear", "pair"):
            raise ValueError(f"objective 'ddpm': coordinate_head must be 'linear' or 'pair', got {self.coordinate_head!r}")
        if self.corrector_lr < 0:
            raise ValueError(f"objective 'ddpm': corrector_lr must be ≥ 0, got {self.corrector_lr}")
        if not 0 < self.sigma_begin < self.sigma_end:
            raise ValueError(f"objective 'ddpm': need 0 < sigma_begin < sigma_end, got {self.sigma_begin}, {self.sigma_end}")
        if self.part_weights is not None:
            weights = tuple(float(w) for w in self.part_weights)
            if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"objective 'ddpm': part_weights must be three non-negative numbers "
                    f"[coordinates, species, lattice] with a positive sum, got {self.part_weights!r}"
                )
            object.__setattr__(self, "part_weights", weights)


def cosine_alphas_cumprod(steps: int, s: float) -> torch.Tensor:
    """ᾱ_t for t = 1..T of the cosine schedule, with β_t clipped to 0.999. [T] float64"""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def wrapped_sigmas(steps: int, begin: float, end: float) -> torch.Tensor:
    """σ_t for t = 1..T of the wrapped-normal coordinate noise, geometric from begin to end. [T] float64"""
    return torch.exp(torch.linspace(math.log(begin), math.log(end), steps, dtype=torch.float64))


def wrapped_normal_neg_score(delta: torch.Tensor, sigma: torch.Tensor, images: int = 3) -> torch.Tensor:
    """−∂/∂x log p(x) of the wrapped normal of period 1 and width σ at the displacement `delta` from its
    centre: Σ_k (δ+k)/σ² · w_k with w_k ∝ exp(−(δ+k)²/2σ²), k = −images..images (σ ≤ 0.5 needs ±3).
    delta and sigma broadcast; computed as a softmax over the images, so it is stable at small σ."""
    k = torch.arange(-images, images + 1, device=delta.device, dtype=delta.dtype)
    shifted = delta.unsqueeze(-1) + k  # [..., 2·images + 1]
    sigma = sigma.unsqueeze(-1)
    weights = torch.softmax(-shifted**2 / (2 * sigma**2), dim=-1)
    return (weights * shifted).sum(-1) / sigma.squeeze(-1) ** 2


def wrapped_score_norms(sigmas: torch.Tensor, samples: int = 20_000, seed: int = 0) -> torch.Tensor:
    """E[(−score)²] of each σ's wrapped normal over its own samples (DiffCSP's λ_t⁻¹), by a seeded
    Monte Carlo over one coordinate. [T] float64"""
    z = torch.randn(samples, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    delta = torch.remainder(z * sigmas + 0.5, 1.0) - 0.5  # [samples, T], displacement wrapped to [−½, ½)
    return (wrapped_normal_neg_score(delta, sigmas.expand_as(delta)) ** 2).mean(0)


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(-1) * freqs  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def biased_layer(layer: nn.TransformerEncoderLayer, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A pre-norm `TransformerEncoderLayer` with a per-head additive attention bias [B, H, L, L],
    written out with the layer's own weights: its eval fast path returns NaN for a per-head float
    mask (seen with torch 2.13), so the layer is not called directly."""
    attn = layer.self_attn
    batch, length, width = h.shape
    heads = attn.num_heads
    q, k, v = nn.functional.linear(layer.norm1(h), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (y.view(batch, length, heads, width // heads).transpose(1, 2) for y in (q, k, v))
    a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                   dropout_p=attn.dropout if layer.training else 0.0)
    h = h + layer.dropout1(attn.out_proj(a.transpose(1, 2).reshape(batch, length, width)))
    return h + layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(h))))))


class PairCoordinateHead(nn.Module):
    """Per-atom coordinate output from every pair: Σ_j mask_j · c(h_i, h_j)_k · sin(2πk·Δfrac_ij,a) / n,
    k = 1..K, for each axis a. sin is odd and periodic, so the term is a displacement on the torus that
    vanishes when atoms coincide; c is a small MLP of the two atoms' states, zero at initialisation."""

    FREQUENCIES = 4

    def __init__(self, width: int):
        super().__init__()
        self.left, self.right = nn.Linear(width, width), nn.Linear(width, width, bias=False)
        self.coefficients = nn.Linear(width, self.FREQUENCIES)
        nn.init.zeros_(self.coefficients.weight)
        nn.init.zeros_(self.coefficients.bias)

    def forward(self, h: torch.Tensor, frac: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pair = nn.functional.gelu(self.left(h).unsqueeze(2) + self.right(h).unsqueeze(1))  # [B, L, L, W]
        c = self.coefficients(pair) * mask[:, None, :, None].to(h.dtype)  # [B, L, L, K], padded j dropped
        k = torch.arange(1, self.FREQUENCIES + 1, device=h.device, dtype=h.dtype)
        delta = frac.unsqueeze(2) - frac.unsqueeze(1)  # [B, L, L, 3]: frac_i − frac_j
        waves = torch.sin(2 * math.pi * delta.unsqueeze(-1) * k)  # [B, L, L, 3, K]
        n = mask.sum(1).clamp(min=1).to(h.dtype).view(-1, 1, 1)
        return torch.einsum("bijk,bijak->bia", c, waves) / n  # [B, L, 3]


class CSPLayer(nn.Module):
    """One CSPNet message-passing layer (DiffCSP) over all ordered pairs of a crystal's atoms:
    m_ij = φ_e(LN(h)_i, LN(h)_j, e_ij), h_i ← h_i + φ_n(LN(h)_i, mean_{j≠i} m_ij), φ two SiLU layers.
    e_ij are the pair's features (the crystal's lattice and the Fourier features of Δfrac_ij). The
    first linear map of φ_e is split into its three blocks, so h is projected once per atom, not per pair;
    the pairs are a list (receiver, sender) over the flattened atoms, so padding costs nothing."""

    def __init__(self, width: int, edge_features: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.sender, self.receiver = nn.Linear(width, width), nn.Linear(width, width, bias=False)
        self.edge_in = nn.Linear(edge_features, width, bias=False)
        self.edge_out = nn.Linear(width, width)
        self.node = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())

    def forward(self, h: torch.Tensor, edges: torch.Tensor, receiver: torch.Tensor, sender: torch.Tensor,
                inverse_degree: torch.Tensor) -> torch.Tensor:
        """h [N, W] (flattened atoms, padding included); edges [E, F]; receiver, sender [E] indices into N;
        inverse_degree [N, 1]: 1 / the number of pairs each atom receives (0 for none)."""
        x = self.norm(h)
        pre = self.receiver(x)[receiver] + self.sender(x)[sender] + self.edge_in(edges)  # [E, W]
        messages = nn.functional.silu(self.edge_out(nn.functional.silu(pre)))
        mean = torch.zeros_like(x).index_add_(0, receiver, messages) * inverse_degree  # [N, W]
        return h + self.node(torch.cat([x, mean], dim=-1))


class Denoiser(nn.Module):
    """Pre-norm Transformer (or CSPNet) over padded tokens; time embedding added before every layer."""

    def __init__(self, cfg: DDPMConfig):
        super().__init__()
        self.width = cfg.width
        self.self_condition = cfg.self_condition
        # wrapped coordinates are read as sin/cos(2π·frac): the input is then periodic, 3 more features
        self.periodic_input = cfg.coordinates == "wrapped"
        # CSPNet's atoms read no absolute position (DiffCSP): coordinates enter only as the pairs' Δfrac,
        # so the denoiser is invariant to translating the crystal, as the data's distribution is
        self.graph = cfg.denoiser in ("cspnet", "hybrid")
        features = TOKEN - 3 if self.graph else TOKEN + 3 if self.periodic_input else TOKEN
        self.embed = nn.Linear(2 * features if cfg.self_condition else features, cfg.width)
        self.time = nn.Linear(cfg.width, cfg.width)  # sinusoid(t) → width
        if self.graph:  # edge features: the crystal's 6 lattice numbers and 6K Fourier features of Δfrac
            self.layers = nn.ModuleList(CSPLayer(cfg.width, 6 + 6 * cfg.pair_frequencies) for _ in range(cfg.layers))
        else:
            self.layers = self._attention_layers(cfg)
        # hybrid: a Transformer layer after every second CSPNet layer, the last included (it reads no
        # position, so the denoiser stays translation-invariant); keyed by the CSPNet layer it follows
        self.attention = None
        if cfg.denoiser == "hybrid":
            self.attention = nn.ModuleDict({str(i): layer for i, layer in zip(
                range(cfg.layers - 1, -1, -2), self._attention_layers(cfg, (cfg.layers + 1) // 2))})
        self.norm = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, TOKEN)
        self.coordinate_head = PairCoordinateHead(cfg.width) if cfg.coordinate_head == "pair" else None
        self.pair_frequencies = cfg.pair_frequencies
        if cfg.pair_frequencies and not self.graph:
            features = 3 * 2 * cfg.pair_frequencies
            self.pair_bias = nn.ModuleList(nn.Linear(features, cfg.heads) for _ in range(cfg.layers))
            for linear in self.pair_bias:  # start as the geometry-blind denoiser
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)

    @staticmethod
    def _attention_layers(cfg: DDPMConfig, count: int | None = None) -> nn.ModuleList:
        return nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.width, cfg.heads, 4 * cfg.width, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(cfg.layers if count is None else count)
        )

    def input_features(self, x: torch.Tensor) -> torch.Tensor:
        """The token as the first layer reads it: unchanged, with frac as sin/cos(2π·frac), or (CSPNet)
        without the coordinates."""
        if self.graph:
            return x[..., 3:]
        if not self.periodic_input:
            return x
        angles = math.pi * (x[..., :3] + 1)  # 2π·frac
        return torch.cat([angles.sin(), angles.cos(), x[..., 3:]], dim=-1)

    def pair_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, L, 6K] sin/cos(2πk·(frac_i − frac_j)) of the tokens' (noisy) fractional coordinates."""
        frac = (x[..., :3] + 1) / 2  # [B, L, 3]
        delta = frac.unsqueeze(2) - frac.unsqueeze(1)  # [B, L, L, 3]
        k = torch.arange(1, self.pair_frequencies + 1, device=x.device, dtype=x.dtype)
        angles = 2 * math.pi * delta.unsqueeze(-1) * k  # [B, L, L, 3, K]
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)

    def _message_passing(self, h, temb, x, mask):
        """The CSPNet layers over every ordered pair (i ≠ j) of each crystal's real atoms. [B, L, W]"""
        batch, length, width = h.shape
        crystal, i, j = (mask.unsqueeze(2) & mask.unsqueeze(1)
                         & ~torch.eye(length, dtype=torch.bool, device=h.device)).nonzero(as_tuple=True)
        receiver, sender = crystal * length + i, crystal * length + j  # [E] into the flattened atoms
        real = mask.to(h.dtype)
        # each pair sees its crystal's lattice (the noisy tokens' mean over its atoms) and Fourier Δfrac
        lattice = (x[..., 3 + MAX_Z :] * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
        frac = ((x[..., :3] + 1) / 2).reshape(batch * length, 3)
        k = torch.arange(1, self.pair_frequencies + 1, device=x.device, dtype=x.dtype)
        angles = 2 * math.pi * (frac[receiver] - frac[sender]).unsqueeze(-1) * k  # [E, 3, K]
        edges = torch.cat([lattice[crystal], angles.sin().flatten(1), angles.cos().flatten(1)], dim=-1)
        degree = torch.zeros(batch * length, 1, dtype=h.dtype, device=h.device)
        degree.index_add_(0, receiver, torch.ones(receiver.shape[0], 1, dtype=h.dtype, device=h.device))
        inverse_degree = torch.where(degree > 0, 1 / degree.clamp(min=1), torch.zeros_like(degree))
        h = h.reshape(batch * length, width)
        temb = temb.expand(batch, length, width).reshape(batch * length, width)
        for index, layer in enumerate(self.layers):
            h = layer(h + temb, edges, receiver, sender, inverse_degree)
            if self.attention is not None and str(index) in self.attention:
                padded = self.attention[str(index)](h.view(batch, length, width), src_key_padding_mask=~mask)
                h = padded.reshape(batch * length, width)
        return h.view(batch, length, width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                x0_estimate: torch.Tensor | None = None) -> torch.Tensor:
        """x0_estimate: [B, L, TOKEN] the previous x̂0 (self-conditioning only; None: zeros)."""
        temb = self.time(sinusoid(t, self.width).to(x.dtype)).unsqueeze(1)  # [B, 1, W]
        pairs = self.pair_features(x) if self.pair_frequencies and not self.graph else None
        features = self.input_features(x)
        if self.self_condition:
            estimate = torch.zeros_like(features) if x0_estimate is None else self.input_features(x0_estimate)
            features = torch.cat([features, estimate], dim=-1)
        h = self.embed(features)  # [B, L, W]
        if self.graph:
            h = self._message_passing(h, temb, x, mask)
        elif pairs is None:
            for layer in self.layers:
                h = layer(h + temb, src_key_padding_mask=~mask)
        else:
            # padding as an additive mask, so it combines with the float pair bias (−inf on padded keys)
            padding = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill(~mask, -math.inf)
            for layer, pair_bias in zip(self.layers, self.pair_bias):
                bias = pair_bias(pairs).permute(0, 3, 1, 2) + padding[:, None, None, :]  # [B, H, L, L]
                h = biased_layer(layer, h + temb, bias)
        h = self.norm(h)
        out = self.out(h)  # [B, L, TOKEN] predicted noise (wrapped coordinates: −score)
        if self.coordinate_head is not None:
            coords = out[..., :3] + self.coordinate_head(h, (x[..., :3] + 1) / 2, mask)
            out = torch.cat([coords, out[..., 3:]], dim=-1)
        return out


class DDPMObjective(Objective):
    encoder = None  # a generator: nothing here is a crystal encoder

    def __init__(self, config: DDPMConfig, init_source=None):
        super().__init__()
        init_state = None
        if config.init_from is not None:
            from dataclasses import replace

            source = require_init_source(config.init_from, init_source, "ddpm")
            if not isinstance(source, DDPMObjective):
                raise ValueError(f"ddpm.init_from: {config.init_from} holds a {type(source).__name__}, not a ddpm release")
            config = replace(source.config, init_from=config.init_from)
            init_state = source.state_dict()
        self.config = config
        self.denoiser = Denoiser(config)
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(config.steps, config.cosine_s).float())
        if config.coordinates == "wrapped":  # recomputed from the config, so not in the state dict
            sigmas = wrapped_sigmas(config.steps, config.sigma_begin, config.sigma_end)
            self.register_buffer("coord_sigmas", sigmas.float(), persistent=False)
            self.register_buffer("coord_score_norms", wrapped_score_norms(sigmas).float(), persistent=False)
        # how many training crystals had n atoms (index n); sampling draws from it
        self.register_buffer("atom_counts", torch.zeros(config.max_atoms + 1))
        # how many training atoms had atomic number Z (index Z − 1); sampling allows only Z seen
        self.register_buffer("species_counts", torch.zeros(MAX_Z))
        # normal equations of volume ≈ Σ_atoms v_Z over the training crystals (a per-element volume
        # model, least squares accumulated while training): Σ cᵀc [MAX_Z, MAX_Z] and Σ cᵀV [MAX_Z],
        # c the crystal's element counts; sampling may rescale a cell to the volume it predicts
        self.register_buffer("volume_gram", torch.zeros(MAX_Z, MAX_Z, dtype=torch.float64))
        self.register_buffer("volume_rhs", torch.zeros(MAX_Z, dtype=torch.float64))
        if init_state is not None:
            self.load_state_dict(init_state, strict=True)

    # training statistics, not weights: counts and sums that fp16 (max 65,504, integers exact to
    # 2,048) would overflow or round, so a dtype cast of the module (DeepSpeed's fp16 mode calls
    # .half()) leaves them in the dtype they were made in; device moves still apply
    STATISTICS = ("atom_counts", "species_counts", "volume_gram", "volume_rhs")

    def _apply(self, fn, recurse=True):
        before = {name: getattr(self, name) for name in self.STATISTICS}
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            moved = getattr(self, name)
            if moved.dtype != tensor.dtype:  # a cast: keep the original values, on the new device
                self._buffers[name] = tensor.to(moved.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # releases written before the species histogram existed: load them with an empty one
        # (sampling then allows every Z ≤ max_z)
        state_dict.setdefault(prefix + "species_counts", torch.zeros(MAX_Z))
        state_dict.setdefault(prefix + "volume_gram", torch.zeros(MAX_Z, MAX_Z, dtype=torch.float64))
        state_dict.setdefault(prefix + "volume_rhs", torch.zeros(MAX_Z, dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def allowed_species(self, species=None, max_z: int | None = SAMPLE_MAX_Z) -> torch.Tensor:
        """[MAX_Z] bool mask (index Z − 1) of the species sampling may produce.

        species: None or "trained" (the Z the training crystals contain; every Z when the
        histogram is empty, as in a release older than it), "all", or an iterable of atomic numbers
        or element symbols. max_z: also drop Z above it (default 94, CHGNet); None keeps all."""
        z = torch.arange(1, MAX_Z + 1)
        if species is None or species == "trained":
            seen = self.species_counts.cpu() > 0
            mask = seen if bool(seen.any()) else torch.ones(MAX_Z, dtype=torch.bool)
        elif species == "all":
            mask = torch.ones(MAX_Z, dtype=torch.bool)
        else:
            wanted = {_atomic_number(s) for s in species}
            mask = torch.isin(z, torch.tensor(sorted(wanted)))
        if max_z is not None:
            mask = mask & (z <= max_z)
        if not bool(mask.any()):
            raise ValueError(f"no species left to sample (species={species!r}, max_z={max_z})")
        return mask

    def export_config(self) -> dict:
        """The config to save with a checkpoint: sizes inlined, init_from dropped."""
        from dataclasses import asdict

        return {"name": "ddpm", **asdict(self.config), "init_from": None}

    def batch_views(self) -> dict:
        return {"graph": None, "tokens": False, "pdd_k": None}

    # ------------------------------------------------------------------ tokens ↔ crystals
    @staticmethod
    def encode_tokens(batch) -> torch.Tensor:
        """[N, TOKEN] normalised per-atom tokens of a batch."""
        from pretrain.objectives.geometry import polar6

        s6 = polar6(batch.lattice)  # [B, 6]
        diag = _DIAG.to(s6.device)
        s6 = torch.where(diag, (s6 - 6.0) / 3.0, s6 / 2.0)
        onehot = torch.nn.functional.one_hot(batch.atomic_numbers - 1, MAX_Z).to(s6.dtype)
        return torch.cat([2 * batch.frac_coords - 1, 2 * onehot - 1, s6[batch.batch_index]], dim=-1)

    @staticmethod
    def decode_tokens(x: torch.Tensor, mask: torch.Tensor,
                      species: torch.Tensor | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """[B, L, TOKEN] tokens → list of (atomic numbers, frac coords, lattice) per crystal.
        species: optional [MAX_Z] bool mask; the argmax then runs over those species only."""
        out = []
        diag = _DIAG.to(x.device)
        for tokens, real in zip(x, mask):
            tokens = tokens[real].double()  # [n, TOKEN]
            frac = torch.remainder((tokens[:, :3] + 1) / 2, 1.0)
            logits = tokens[:, 3 : 3 + MAX_Z]  # [n, MAX_Z]
            if species is not None:
                logits = logits.masked_fill(~species.to(logits.device), -math.inf)
            z = logits.argmax(-1) + 1
            s6 = tokens[:, 3 + MAX_Z :].mean(0)
            s6 = torch.where(diag, s6 * 3.0 + 6.0, s6 * 2.0)
            s = torch.zeros(3, 3, dtype=torch.float64)
            s[_TRIU[0], _TRIU[1]] = s6
            s = s + s.T - torch.diag(torch.diagonal(s))
            w, v = torch.linalg.eigh(s)
            s = (v * w.clamp(min=1.0)) @ v.T
            out.append((z.numpy(), frac.numpy(), s.numpy()))
        return out

    # ------------------------------------------------------------------ training
    def loss(self, batch, norm: LossNorm | None = None):
        norm = norm or LossNorm.of(batch)
        if self.training:
            counts = batch.num_atoms.clamp(max=self.config.max_atoms)
            self.atom_counts += torch.bincount(counts, minlength=self.config.max_atoms + 1).to(self.atom_counts)
            self.species_counts += torch.bincount(batch.atomic_numbers - 1, minlength=MAX_Z).to(self.species_counts)
            self._accumulate_volumes(batch)
        x0, mask = pad_atoms(self.encode_tokens(batch), batch.batch_index, batch.num_atoms)  # [B, L, TOKEN]
        t = torch.randint(0, self.config.steps, (batch.num_crystals,), device=x0.device)  # [B] (0-based step)
        abar = self.alphas_cumprod[t].to(x0.dtype).view(-1, 1, 1)
        noise = torch.randn_like(x0)
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        if self.config.coordinates == "wrapped":  # coordinates: wrapped normal, target the normalised −score
            xt, noise = self._wrap_coordinates(x0, xt, noise, t)
        estimate = None
        if self.config.self_condition and bool(torch.rand(()) < 0.5):
            with torch.no_grad():
                first, _ = self.predict(xt, t, mask)
                estimate = self.estimate_x0(xt, first, t)
        eps, logits = self.predict(xt, t, mask, estimate)
        cross_entropy = None
        if logits is not None:  # [B, L]: the species part of the loss
            cross_entropy = nn.functional.cross_entropy(
                logits.transpose(1, 2), x0[..., TOKEN_PARTS["species"]].argmax(-1), reduction="none")
        per_atom = self._weighted_mse(eps, noise, cross_entropy)[mask]  # [N]
        loss = per_atom.sum() / norm.atoms
        metrics = {"loss/ddpm_eps_mse": float(per_atom.mean().detach()) if per_atom.numel() else 0.0}
        with torch.no_grad():  # each part's own ε-MSE, so runs with different part_weights compare
            sq = ((eps - noise) ** 2)[mask]  # [N, TOKEN]
            for part, dims in TOKEN_PARTS.items():
                metrics[f"loss/ddpm_eps_mse_{part}"] = float(sq[:, dims].mean()) if sq.numel() else 0.0
            if cross_entropy is not None:
                metrics["loss/ddpm_species_ce"] = float(cross_entropy[mask].mean()) if sq.numel() else 0.0
        return loss, metrics

    def predict(self, xt: torch.Tensor, t, mask: torch.Tensor, x0_estimate: torch.Tensor | None = None):
        """The denoiser's output in ε form (wrapped coordinates: the normalised −score), and the species logits
        it came from (species_output 'softmax' or 'posterior'; None for 'eps'). t: [B] tensor of steps."""
        out = self.denoiser(xt, t, mask, x0_estimate)
        if self.config.species_output == "eps":
            return out, None
        species = TOKEN_PARTS["species"]
        logits = out[..., species]
        abar = self.alphas_cumprod[t].to(xt.dtype).view(-1, 1, 1)
        if self.config.species_output == "posterior":  # + the token's own Gaussian log-likelihood of each species
            logits = logits + 2 * abar.sqrt() / (1 - abar) * xt[..., species]
        # the ε that makes x0_from_eps return x̂0 = 2·softmax − 1 (exactly, up to rounding)
        eps_species = (xt[..., species] - abar.sqrt() * (2 * logits.softmax(-1) - 1)) / (1 - abar).sqrt()
        return torch.cat([out[..., : species.start], eps_species, out[..., species.stop :]], dim=-1), logits

    @staticmethod
    def x0_from_eps(xt: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """x̂0 from a predicted noise, clamped to [−3, 3] (tokens of real crystals lie in about [−2, 2])."""
        return ((xt - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-3, 3)

    def _wrap_coordinates(self, x0, xt, noise, t):
        """xt and the target with the coordinate part replaced: frac_t = (frac_0 + σ_t·z) mod 1, and the
        wrapped normal's −score at σ_t·z divided by its root-mean-square at σ_t (DiffCSP's target)."""
        sigma = self.coord_sigmas[t].to(x0.dtype).view(-1, 1, 1)  # [B, 1, 1]
        z = torch.randn_like(x0[..., :3])
        frac_t = torch.remainder((x0[..., :3] + 1) / 2 + sigma * z, 1.0)
        displacement = torch.remainder(sigma * z + 0.5, 1.0) - 0.5  # the same point of the torus, near 0
        target = wrapped_normal_neg_score(displacement, sigma.expand_as(z))
        target = target / self.coord_score_norms[t].to(x0.dtype).sqrt().view(-1, 1, 1)
        return (torch.cat([2 * frac_t - 1, xt[..., 3:]], dim=-1),
                torch.cat([target, noise[..., 3:]], dim=-1))

    def coordinate_score(self, out: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The score ∂/∂frac log p_t of the wrapped coordinates from the denoiser's output."""
        scale = self.coord_score_norms[t].to(out.dtype).sqrt()
        return -out[..., :3] * (scale.view(-1, 1, 1) if scale.dim() else scale)

    def estimate_x0(self, xt: torch.Tensor, out: torch.Tensor, t) -> torch.Tensor:
        """x̂0 from the denoiser's output at step t ([B] tensor or int): ε-inversion for the DDPM parts;
        for wrapped coordinates Tweedie's estimate frac_t + σ_t²·score, wrapped back into the cell."""
        steps = t if torch.is_tensor(t) else torch.tensor(t)
        abar = self.alphas_cumprod[steps].to(xt.dtype)
        abar = abar.view(-1, 1, 1) if abar.dim() else abar
        x0 = self.x0_from_eps(xt, out, abar)
        if self.config.coordinates != "wrapped":
            return x0
        sigma = self.coord_sigmas[steps].to(xt.dtype)
        sigma = sigma.view(-1, 1, 1) if sigma.dim() else sigma
        frac = torch.remainder((xt[..., :3] + 1) / 2 + sigma**2 * self.coordinate_score(out, steps), 1.0)
        return torch.cat([2 * frac - 1, x0[..., 3:]], dim=-1)

    def _accumulate_volumes(self, batch) -> None:
        counts = torch.zeros(batch.num_crystals, MAX_Z, dtype=torch.float64, device=self.volume_rhs.device)
        counts.index_put_((batch.batch_index.to(counts.device), (batch.atomic_numbers - 1).to(counts.device)),
                          torch.ones(batch.atomic_numbers.shape[0], dtype=torch.float64, device=counts.device),
                          accumulate=True)
        volumes = torch.linalg.det(batch.lattice.double()).abs().to(counts.device)  # [B] Å³
        self.volume_gram += counts.T @ counts
        self.volume_rhs += counts.T @ volumes

    def element_volumes(self) -> torch.Tensor | None:
        """[MAX_Z] least-squares volume per atom of each element (Å³) from the training crystals,
        or None when the objective never saw any (a release older than the volume model).
        Elements never seen get the mean of the seen ones; ridge 1e-6 keeps the solve defined."""
        gram = self.volume_gram.double().cpu()
        seen = torch.diagonal(gram) > 0
        if not bool(seen.any()):
            return None
        g = gram[seen][:, seen]
        ridge = 1e-6 * torch.diagonal(g).mean()
        v_seen = torch.linalg.solve(g + ridge * torch.eye(g.shape[0], dtype=g.dtype), self.volume_rhs.double().cpu()[seen])
        v_seen = v_seen.clamp(min=1.0)  # no element occupies less than 1 Å³ (a floor for rare, ill-fit ones)
        volumes = torch.full((MAX_Z,), float(v_seen.mean()), dtype=torch.float64)
        volumes[seen] = v_seen
        return volumes

    def _weighted_mse(self, eps: torch.Tensor, noise: torch.Tensor,
                      species_cross_entropy: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] per-token loss: the part_weights blend of each part's mean ε-MSE (no part_weights: weights
        3, 100, 6, the plain mean over all dimensions); species_cross_entropy [B, L] replaces the species' term."""
        sq = (eps - noise) ** 2
        weights = self.config.part_weights or tuple(float(d.stop - d.start) for d in TOKEN_PARTS.values())
        terms = {part: sq[..., dims].mean(-1) for part, dims in TOKEN_PARTS.items()}
        if species_cross_entropy is not None:
            terms["species"] = species_cross_entropy
        return sum(w * term for w, term in zip(weights, terms.values())) / sum(weights)

    # ------------------------------------------------------------------ sampling
    def draw_num_atoms(self, n: int, generator: torch.Generator) -> torch.Tensor:
        counts = self.atom_counts.double().cpu()
        if counts.sum() <= 0:
            raise RuntimeError(
                "this generator has no atom-count histogram (it was never trained): train it first with "
                "`crystalfm pretrain train` and an objective named 'ddpm'"
            )
        return torch.multinomial(counts / counts.sum(), n, replacement=True, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, steps: int | None = None, batch_size: int = 256, source: str = "ddpm",
               species=None, max_z: int | None = SAMPLE_MAX_Z, volume: str = "generated",
               corrector_lr: float | None = None, species_temperature: float = 1.0) -> list[CrystalRecord]:
        """n crystals by ancestral sampling (reproducible from `seed`). `steps` < T strides the chain.
        species / max_z: which species may appear (see `allowed_species`; default: those trained on, Z ≤ 94).
        volume: "generated" keeps the denoised cell; "composition" scales it (shape and fractional
        coordinates kept) to the volume the training set's per-element volume model predicts for
        the sampled composition (`element_volumes`). corrector_lr: wrapped coordinates only, the Langevin
        corrector's step size (None: the config's). species_temperature: scales the species part's posterior
        noise at each step (1: ancestral sampling; 0: the species follow the deterministic mean, as DDIM's η = 0),
        a sampling temperature for the composition only; coordinates and lattice are sampled unchanged."""
        if species_temperature < 0:
            raise ValueError(f"species_temperature must be ≥ 0, got {species_temperature}")
        if volume not in ("generated", "composition"):
            raise ValueError(f"volume must be 'generated' or 'composition', got {volume!r}")
        element_volumes = self.element_volumes() if volume == "composition" else None
        if volume == "composition" and element_volumes is None:
            raise ValueError(
                "volume='composition' needs the per-element volume model, which this generator lacks "
                "(it was trained before the model existed): sample with volume='generated', or train it again"
            )
        wrapped = self.config.coordinates == "wrapped"
        corrector_lr = self.config.corrector_lr if corrector_lr is None else float(corrector_lr)
        if corrector_lr < 0 or (corrector_lr > 0 and not wrapped):
            raise ValueError(
                f"corrector_lr={corrector_lr}: the Langevin corrector needs a step ≥ 0 and a generator trained with "
                f"coordinates: wrapped (this one uses {self.config.coordinates!r}); leave it unset or 0"
            )
        was_training = self.training
        self.eval()
        generator = torch.Generator().manual_seed(seed)
        device = self.alphas_cumprod.device
        allowed = self.allowed_species(species, max_z).to(device)  # [MAX_Z]
        banned = torch.cat([torch.zeros(3, dtype=torch.bool, device=device), ~allowed,
                            torch.zeros(6, dtype=torch.bool, device=device)])  # [TOKEN]
        noise_scale = torch.ones(TOKEN, device=device)  # per token dimension: the species part at its temperature
        noise_scale[TOKEN_PARTS["species"]] = float(species_temperature)
        num_atoms = self.draw_num_atoms(n, generator).clamp(min=1)
        records: list[CrystalRecord] = []
        schedule = self._schedule(steps or self.config.steps)
        for start in range(0, n, batch_size):
            sizes = num_atoms[start : start + batch_size]
            mask = torch.arange(int(sizes.max())).unsqueeze(0) < sizes.unsqueeze(1)  # [B, L]
            x = torch.randn(*mask.shape, TOKEN, generator=generator).to(device)
            if wrapped:  # the wrapped normal at σ_end ≈ 0.5 is close to uniform on the torus
                x[..., :3] = 2 * torch.rand(*mask.shape, 3, generator=generator).to(device) - 1
            mask = mask.to(device)
            x0 = None  # the previous step's x̂0 (read by a self-conditioned denoiser)
            for t, t_prev in schedule:
                steps_t = torch.full((x.shape[0],), t, device=device)
                if wrapped and corrector_lr > 0:  # one Langevin step on the coordinates at σ_t
                    out, _ = self.predict(x, steps_t, mask, x0)
                    x = self._langevin_coordinates(x, out, t, corrector_lr, generator)
                abar = self.alphas_cumprod[t]
                abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones((), device=device)
                eps, _ = self.predict(x, steps_t, mask, x0)
                x0 = self.estimate_x0(x, eps, t)
                x0 = x0.masked_fill(banned, -1.0)  # a disallowed species' one-hot entry is −1 in all data
                # posterior q(x_{t_prev} | x_t, x0) for a (possibly strided) chain
                alpha = abar / abar_prev
                mean = (abar_prev.sqrt() * (1 - alpha) * x0 + alpha.sqrt() * (1 - abar_prev) * x) / (1 - abar)
                if t_prev >= 0:
                    var = (1 - abar_prev) / (1 - abar) * (1 - alpha)
                    step = mean + var.sqrt() * noise_scale * torch.randn(x.shape, generator=generator).to(device)
                else:
                    step = mean
                if wrapped:  # the coordinates take the reverse step of the VE SDE on the torus instead
                    step[..., :3] = self._predict_coordinates(x, eps, t, t_prev, generator)
                x = step
            for i, (z, frac, lattice) in enumerate(self.decode_tokens(x.cpu(), mask.cpu(), allowed.cpu())):
                if element_volumes is not None:
                    target = float(element_volumes[torch.as_tensor(z) - 1].sum())
                    lattice = lattice * (target / abs(np.linalg.det(lattice))) ** (1 / 3)
                records.append(CrystalRecord(f"{source}:{seed}-{start + i}", source, z, frac, lattice))
        self.train(was_training)
        return records

    def _predict_coordinates(self, x, out, t: int, t_prev: int, generator) -> torch.Tensor:
        """Wrapped coordinates one reverse step from σ_t to σ_{t_prev} (0 after the last step), as
        2·frac − 1: frac + (σ_t² − σ_prev²)·score + √(σ_prev²(σ_t² − σ_prev²)/σ_t²)·z, mod 1 (DiffCSP)."""
        sigma = self.coord_sigmas[t]
        sigma_prev = self.coord_sigmas[t_prev] if t_prev >= 0 else torch.zeros((), device=sigma.device)
        step = sigma**2 - sigma_prev**2
        std = (sigma_prev**2 * step / sigma**2).sqrt()
        frac = (x[..., :3] + 1) / 2 + step * self.coordinate_score(out, t)
        frac = frac + std * torch.randn(frac.shape, generator=generator).to(frac.device)
        return 2 * torch.remainder(frac, 1.0) - 1

    def _langevin_coordinates(self, x, out, t: int, lr: float, generator) -> torch.Tensor:
        """x with one Langevin step on its wrapped coordinates at σ_t: step size lr·(σ_t/σ_begin)²."""
        step = lr * (self.coord_sigmas[t] / self.config.sigma_begin) ** 2
        frac = (x[..., :3] + 1) / 2 + step * self.coordinate_score(out, t)
        frac = frac + (2 * step).sqrt() * torch.randn(frac.shape, generator=generator).to(frac.device)
        return torch.cat([2 * torch.remainder(frac, 1.0) - 1, x[..., 3:]], dim=-1)

    def _schedule(self, steps: int) -> list[tuple[int, int]]:
        ts = np.unique(np.linspace(0, self.config.steps - 1, steps).round().astype(int))[::-1]
        return [(int(t), int(ts[i + 1]) if i + 1 < len(ts) else -1) for i, t in enumerate(ts)]


def _atomic_number(species) -> int:
    """An atomic number from an int or an element symbol ('Fe')."""
    from data_pipeline.record import element_symbol

    if isinstance(species, (int, np.integer)) or (isinstance(species, str) and species.isdigit()):
        z = int(species)
    else:
        symbols = {element_symbol(k): k for k in range(1, MAX_Z + 1)}
        if species not in symbols:
            raise ValueError(f"unknown element {species!r}")
        z = symbols[species]
    if not 1 <= z <= MAX_Z:
        raise ValueError(f"atomic number {z} is outside 1..{MAX_Z}")
    return z


def build(config: dict, init_source=None) -> DDPMObjective:
    return DDPMObjective(parse_config(DDPMConfig, config, "objective 'ddpm'"), init_source)
