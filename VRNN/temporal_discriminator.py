"""Temporal discriminator D(x_{1:T}, z_{1:T}) and its losses (MODEL.md section 2.7).

Architecture
    Tokens: a Conv3d over [B, 3, T, H, W] with kernel (kt, p, p) and stride (1, p, p), padded in time at
    the front only (kt - 1 zero frames), so token t sees frames t-kt+1..t: 64 x 64 frames become
    (64/p)^2 = N patch tokens per frame (p = 8 gives 8 x 8). Learned spatial position embeddings and
    sinusoidal time embeddings are added (sinusoids, so no maximum length is baked in).
    Blocks (``num_layers``), each factorised (as in TimeSformer's "divided space-time attention",
    Bertasius et al. 2021), never attending over the flattened T*N sequence:
        FiLM(z_t) on a LayerNorm -> spatial self-attention within each frame (over its N tokens)
        LayerNorm -> causal attention across time for each patch position (t sees <= t)
        FiLM(z_t) on a LayerNorm -> MLP
    FiLM: x -> LN(x) * (1 + gamma(z_t)) + beta(z_t), per frame (the adaLN form used by DiT), so the
    discriminator judges frames *given* the latent that generated them.
    Heads: frame_scores[b, t] = linear(mean over the N tokens of frame t); sequence_score[b] = another
    linear head on the pooled tokens of the last step, which by causality has seen the whole window.
    ``features`` lists the token tensors [B, T, N, C] after the embedding and after every block, for
    feature matching. Every frame score at t depends on x_{<=t} and z_{<=t} only.

Losses (registries keyed by ``AIMEConfig.disc_loss``)
    Scores of both heads are used, frame and sequence terms averaged with weight 1/2 each.
    hinge:   L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))],   L_G = -E[D(fake)]  (Lim & Ye 2017).
    wgan-gp: L_D = E[D(fake)] - E[D(real)] (+ gp_weight * ``gradient_penalty``),  L_G = -E[D(fake)]
             (Gulrajani et al. 2017; the penalty is on the frames of random interpolates).
    feature matching: mean over layers of mean |f(real).detach() - f(fake)| (Salimans et al. 2016; L1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from perceiver_io.encoder import attend

__all__ = [
    "DISCRIMINATOR_LOSSES",
    "GENERATOR_LOSSES",
    "TemporalDiscriminator",
    "discriminator_loss",
    "feature_matching_loss",
    "generator_loss",
    "gradient_penalty",
]


def _maybe_sn(module: nn.Module, enabled: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(module) if enabled else module


def _sinusoid(length: int, dim: int, device, dtype) -> Tensor:
    """[length, dim] sinusoidal position code (Vaswani et al. 2017); odd dims padded with a zero column."""
    half = dim // 2
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    steps = torch.arange(half, device=device, dtype=torch.float32)
    freq = torch.exp(-math.log(10000.0) * steps / max(half, 1))
    code = torch.cat([torch.sin(position * freq), torch.cos(position * freq)], dim=-1)
    if code.shape[-1] < dim:
        code = F.pad(code, (0, dim - code.shape[-1]))
    return code.to(dtype)


class _Attention(nn.Module):
    """Multi-head self-attention on [B', L, C] with optional causal mask (own projections, so spectral norm
    can wrap them)."""

    def __init__(self, dim: int, heads: int, spectral_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = _maybe_sn(nn.Linear(dim, 3 * dim), spectral_norm)
        self.out = _maybe_sn(nn.Linear(dim, dim), spectral_norm)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v, causal)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class _FiLMNorm(nn.Module):
    """LayerNorm whose scale and shift come from z_t: [B, T, N, C], z [B, T, D] -> [B, T, N, C]."""

    def __init__(self, dim: int, latent_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.film = nn.Linear(latent_dim, 2 * dim)
        # Zero init: the block starts as a plain LayerNorm and learns how much z should modulate it.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        gamma, beta = self.film(z).unsqueeze(2).chunk(2, dim=-1)
        return self.norm(x) * (1.0 + gamma) + beta


class _FactorisedBlock(nn.Module):
    def __init__(self, dim: int, heads: int, latent_dim: int, spectral_norm: bool, mlp_ratio: int = 4):
        super().__init__()
        self.norm_space = _FiLMNorm(dim, latent_dim)
        self.space = _Attention(dim, heads, spectral_norm)
        self.norm_time = nn.LayerNorm(dim)
        self.time = _Attention(dim, heads, spectral_norm)
        self.norm_mlp = _FiLMNorm(dim, latent_dim)
        self.mlp = nn.Sequential(_maybe_sn(nn.Linear(dim, mlp_ratio * dim), spectral_norm), nn.GELU(),
                                 _maybe_sn(nn.Linear(mlp_ratio * dim, dim), spectral_norm))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        b, t, n, c = x.shape
        x = x + self.space(self.norm_space(x, z).reshape(b * t, n, c), causal=False).reshape(b, t, n, c)
        y = self.norm_time(x).permute(0, 2, 1, 3).reshape(b * n, t, c)
        x = x + self.time(y, causal=True).reshape(b, n, t, c).permute(0, 2, 1, 3)
        return x + self.mlp(self.norm_mlp(x, z))


class TemporalDiscriminator(nn.Module):
    """Time-causal, latent-conditioned video discriminator.

    Args:
        latent_dim: D, size of z_t.
        channels: C, token width (must be divisible by ``num_heads``).
        num_layers: factorised space/time blocks.
        num_heads: attention heads.
        image_size: frame side (64).
        patch_size: p, spatial patch side; image_size must be divisible by it (8 -> 8 x 8 tokens at 64).
        temporal_kernel: kt, frames each token's convolution sees (t-kt+1..t).
        spectral_norm: wrap convolutions and linear layers of the trunk and heads in spectral norm.
    """

    def __init__(self, latent_dim: int, channels: int = 64, num_layers: int = 4, num_heads: int = 4,
                 image_size: int = 64, patch_size: int = 8, temporal_kernel: int = 3,
                 spectral_norm: bool = False):
        super().__init__()
        if channels < 1 or num_heads < 1 or channels % num_heads:
            raise ValueError(f"TemporalDiscriminator channels={channels} must be a positive multiple of "
                             f"num_heads={num_heads}")
        if num_layers < 0:
            raise ValueError(f"TemporalDiscriminator num_layers={num_layers} is invalid: expected >= 0")
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"TemporalDiscriminator patch_size={patch_size} must divide "
                             f"image_size={image_size}")
        if temporal_kernel < 1:
            raise ValueError(f"TemporalDiscriminator temporal_kernel={temporal_kernel} must be >= 1")
        self.latent_dim, self.channels, self.image_size = latent_dim, channels, image_size
        self.patch_size, self.temporal_kernel = patch_size, temporal_kernel
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = _maybe_sn(nn.Conv3d(3, channels, (temporal_kernel, patch_size, patch_size),
                                               stride=(1, patch_size, patch_size)), spectral_norm)
        self.spatial_position = nn.Parameter(torch.randn(self.num_patches, channels) * 0.02)
        self.embed_film = _FiLMNorm(channels, latent_dim)
        self.blocks = nn.ModuleList(_FactorisedBlock(channels, num_heads, latent_dim, spectral_norm)
                                    for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(channels)
        self.frame_head = _maybe_sn(nn.Linear(channels, 1), spectral_norm)
        self.sequence_head = _maybe_sn(nn.Linear(channels, 1), spectral_norm)

    @classmethod
    def from_config(cls, config, **overrides) -> TemporalDiscriminator:
        """Build from an ``AIMEConfig`` (latent_dim, disc_channels, img_disc_layers, disc_num_heads,
        image_size); keyword overrides (e.g. ``spectral_norm=True``) win."""
        kwargs = {"latent_dim": config.latent_dim, "channels": config.disc_channels,
                  "num_layers": config.img_disc_layers, "num_heads": config.disc_num_heads,
                  "image_size": config.image_size}
        return cls(**{**kwargs, **overrides})

    def forward(self, x: Tensor, z: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """Score a window.

        Args:
            x: [B, T, 3, H, W] frames in [-1, 1] (H = W = image_size).
            z: [B, T, D] latents, z[:, t] paired with x[:, t].
        Returns dict:
            frame_scores [B, T] (unbounded scores; higher = more real), sequence_score [B],
            features: list of num_layers + 1 tensors [B, T, N, C].
        """
        s = self.image_size
        if x.dim() != 5 or tuple(x.shape[2:]) != (3, s, s):
            raise ValueError(f"TemporalDiscriminator expects x [B, T, 3, {s}, {s}], "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"TemporalDiscriminator expects float frames in [-1, 1], got dtype {x.dtype}")
        b, t = x.shape[:2]
        if z.dim() != 3 or tuple(z.shape) != (b, t, self.latent_dim):
            raise ValueError(f"TemporalDiscriminator expects z [B, T, D] = [{b}, {t}, {self.latent_dim}], "
                             f"got shape {tuple(z.shape)}")
        video = F.pad(x.transpose(1, 2), (0, 0, 0, 0, self.temporal_kernel - 1, 0))  # front padding in time
        tokens = self.patch_embed(video).flatten(3).permute(0, 2, 3, 1)            # [B, T, N, C]
        time_code = _sinusoid(t, self.channels, x.device, tokens.dtype)
        tokens = tokens + self.spatial_position + time_code[None, :, None, :]
        tokens = self.embed_film(tokens, z)
        features = [tokens]
        for block in self.blocks:
            tokens = block(tokens, z)
            features.append(tokens)
        pooled = self.norm_out(tokens).mean(dim=2)                                  # [B, T, C]
        return {"frame_scores": self.frame_head(pooled).squeeze(-1),
                "sequence_score": self.sequence_head(pooled[:, -1]).squeeze(-1),
                "features": features}


# ----------------------------------------------------------------------------------------------------
def _both_heads(out: dict, fn: Callable[[Tensor], Tensor]) -> Tensor:
    return 0.5 * (fn(out["frame_scores"]).mean() + fn(out["sequence_score"]).mean())


def _hinge_d(real_out: dict, fake_out: dict) -> Tensor:
    return _both_heads(real_out, lambda s: F.relu(1.0 - s)) + _both_heads(fake_out, lambda s: F.relu(1.0 + s))


def _wgan_d(real_out: dict, fake_out: dict) -> Tensor:
    return _both_heads(fake_out, lambda s: s) - _both_heads(real_out, lambda s: s)


def _negative_score(fake_out: dict) -> Tensor:
    return -_both_heads(fake_out, lambda s: s)


DISCRIMINATOR_LOSSES: dict[str, Callable[[dict, dict], Tensor]] = {"hinge": _hinge_d, "wgan-gp": _wgan_d}
GENERATOR_LOSSES: dict[str, Callable[[dict], Tensor]] = {"hinge": _negative_score, "wgan-gp": _negative_score}


def _lookup(registry: dict, kind: str):
    if kind not in registry:
        raise ValueError(f"unknown discriminator loss kind={kind!r}; expected one of {sorted(registry)}")
    return registry[kind]


def discriminator_loss(real_out: dict, fake_out: dict, kind: str = "hinge") -> Tensor:
    """Scalar discriminator loss from two ``forward`` outputs (fake scored on detached generations).

    For ``"wgan-gp"`` add ``gp_weight * gradient_penalty(...)`` separately (it needs the discriminator)."""
    return _lookup(DISCRIMINATOR_LOSSES, kind)(real_out, fake_out)


def generator_loss(fake_out: dict, kind: str = "hinge") -> Tensor:
    """Scalar adversarial loss of the generator, -E[D(fake)] on both heads (hinge and WGAN alike)."""
    return _lookup(GENERATOR_LOSSES, kind)(fake_out)


def feature_matching_loss(real_feats: Sequence[Tensor], fake_feats: Sequence[Tensor]) -> Tensor:
    """Mean over layers of mean |real - fake| (L1); real features are detached. Returns a scalar."""
    if len(real_feats) != len(fake_feats) or len(real_feats) == 0:
        raise ValueError(f"feature_matching_loss expects two equally long non-empty feature lists, got "
                         f"{len(real_feats)} and {len(fake_feats)}")
    terms = []
    for i, (real, fake) in enumerate(zip(real_feats, fake_feats)):
        if real.shape != fake.shape:
            raise ValueError(f"feature_matching_loss layer {i}: real {tuple(real.shape)} "
                             f"!= fake {tuple(fake.shape)}")
        terms.append((real.detach() - fake).abs().mean())
    return torch.stack(terms).mean()


def gradient_penalty(discriminator: TemporalDiscriminator, real: Tensor, fake: Tensor, z: Tensor,
                     z_fake: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """WGAN-GP penalty E[(||grad_x D(x_hat, z_hat)||_2 - 1)^2] (Gulrajani et al. 2017), a scalar.

    x_hat = e * real + (1 - e) * fake with e ~ U(0, 1) per sequence; the norm is over all frames of the
    sequence, of the critic's per-sequence value 0.5 * (mean_t frame_scores + sequence_score) (the same
    combination the WGAN loss uses). ``z`` conditions both (the model pairs a real window and its
    reconstruction with the same latents); when ``z_fake`` is given, z is interpolated with the same e.
    The graph is kept (create_graph) so the penalty trains the discriminator.
    Shapes: real, fake [B, T, 3, H, W]; z, z_fake [B, T, D].
    """
    if real.shape != fake.shape:
        raise ValueError(f"gradient_penalty expects real and fake of equal shape, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    b = real.shape[0]
    # Drawn where the generator lives (or on the data's device), then moved: one code path for CPU and CUDA.
    e = torch.rand(b, generator=generator, device=generator.device if generator is not None else real.device)
    e = e.to(device=real.device, dtype=real.dtype)
    e_x = e.view(b, *([1] * (real.dim() - 1)))
    x_hat = (e_x * real.detach() + (1.0 - e_x) * fake.detach()).requires_grad_(True)
    if z_fake is not None:
        e_z = e.view(b, *([1] * (z.dim() - 1)))
        z = e_z * z + (1.0 - e_z) * z_fake
    # Fused attention kernels (flash / memory-efficient) have no double backward; the math one does.
    with sdpa_kernel(SDPBackend.MATH):
        out = discriminator(x_hat, z.detach())
    critic = 0.5 * (out["frame_scores"].mean(dim=1) + out["sequence_score"])
    (grad,) = torch.autograd.grad(critic.sum(), x_hat, create_graph=True)
    return (grad.reshape(b, -1).norm(dim=-1) - 1.0).pow(2).mean()
