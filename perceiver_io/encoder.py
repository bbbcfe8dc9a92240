"""Per-frame Perceiver encoder and the causal temporal transformer (MODEL.md §2.1).

Per frame (batched over N = B*T frames, no mixing across time): the h*w token embeddings (projected
quantised codes plus a 2-D position encoding) are read by `num_latents` learned latents through one
cross-attention (Jaegle et al. 2021, Perceiver), the latents are refined by self-attention, and a learned
query pools them into a frame embedding e_t in R^C. Across time, a pre-LN transformer with a causal mask
(position t attends to positions <= t) and a learned positional embedding turns e_1..e_T into c_1..c_T.
The temporal transformer is the only place where frames meet, so c_t depends on x_1..x_t only.

The attention blocks here are also used by the decoder (decoder.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perceiver_io.config import PerceiverIOConfig

__all__ = [
    "POSITION_ENCODING_REGISTRY",
    "Attention",
    "CausalTemporalTransformer",
    "CrossAttentionBlock",
    "FourierPositionEncoding",
    "FrameEncoder",
    "LearnedPositionEncoding",
    "SelfAttentionBlock",
    "attend",
    "attend_math",
]


class Attention(nn.Module):
    """Multi-head attention of queries [N,Q,E] over a context [N,S,E_kv] -> [N,Q,E].

    ``causal=True`` (self-attention only, Q == S) masks position q from keys s > q.
    """

    def __init__(self, dim: int, kv_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the attention width {dim}")
        self.num_heads, self.dropout = num_heads, dropout
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(kv_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, causal: bool = False) -> Tensor:
        n, q_len, dim = x.shape
        s_len = context.shape[1]
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.to_q(x).view(n, q_len, heads, head_dim).transpose(1, 2)            # [N,h,Q,d]
        kv = self.to_kv(context).view(n, s_len, 2, heads, head_dim)                 # [N,S,2,h,d]
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)                                  # 2 x [N,h,S,d]
        y = attend(q, k, v, causal, self.dropout if self.training else 0.0)             # [N,h,Q,d]
        return self.proj(y.transpose(1, 2).reshape(n, q_len, dim))                  # [N,Q,E]


def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d)) v: q [N,h,Q,d], k and v [N,h,S,d] -> [N,h,Q,d]; ``causal`` (Q == S) masks
    keys after the query's position; ``dropout_p`` drops attention weights.

    ``F.scaled_dot_product_attention``, except for bf16 / fp16 on the CPU (the cpu preset's autocast), where
    it is two matmuls and a float32 softmax: there PyTorch's CPU flash kernel took 2-5x as long for the
    Perceiver's few-key, short-head shapes, forward plus backward; in float32 it is as fast or faster than
    the matmuls (benchmarks/cpu_kernels.py)."""
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
    return attend_math(q, k, v, causal, dropout_p)


def attend_math(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """``attend`` as two matmuls and a float32 softmax, on any device and dtype (shapes as ``attend``)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)                         # [N,h,Q,S]
    if causal:
        blocked = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(blocked, float("-inf"))
    weights = scores.float().softmax(dim=-1).to(v.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v


class _MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: int, dropout: float) -> None:
        super().__init__(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim), nn.Dropout(dropout))


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention + MLP, both residual: (x [N,Q,E], context [N,S,E_kv]) -> [N,Q,E]."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(kv_dim)
        self.attn = Attention(dim, kv_dim, num_heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, mlp_ratio, dropout)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(context))
        return x + self.mlp(self.norm_mlp(x))


class SelfAttentionBlock(nn.Module):
    """Pre-LN transformer block: x [N,S,E] -> [N,S,E]; ``causal`` masks the future."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, dim, num_heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, mlp_ratio, dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm_attn(x)
        x = x + self.attn(h, h, causal=self.causal)
        return x + self.mlp(self.norm_mlp(x))


class FourierPositionEncoding(nn.Module):
    """Fixed 2-D Fourier features of the token grid, linearly projected: () -> [h*w, channels].

    Features per token: (y, x) in [-1, 1] and sin/cos(pi f y), sin/cos(pi f x) for `bands` frequencies f
    spaced linearly from 1 to the grid's Nyquist frequency side/2 (Perceiver IO's encoding).
    """

    def __init__(self, side: int, channels: int, bands: int) -> None:
        super().__init__()
        coords = torch.linspace(-1.0, 1.0, side)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")                      # [h,w] each
        pos = torch.stack([yy.flatten(), xx.flatten()], dim=-1)                     # [hw,2]
        freqs = torch.linspace(1.0, max(side / 2.0, 1.0), bands)                    # [F]
        angles = math.pi * pos[:, :, None] * freqs[None, None, :]                   # [hw,2,F]
        feats = torch.cat([pos, angles.sin().flatten(1), angles.cos().flatten(1)], dim=-1)  # [hw,2+4F]
        self.register_buffer("features", feats, persistent=False)
        self.proj = nn.Linear(feats.shape[1], channels)

    def forward(self) -> Tensor:
        return self.proj(self.features)


class LearnedPositionEncoding(nn.Module):
    """A learned embedding per token position: () -> [h*w, channels]."""

    def __init__(self, side: int, channels: int, bands: int = 0) -> None:
        super().__init__()
        self.table = nn.Parameter(0.02 * torch.randn(side * side, channels))

    def forward(self) -> Tensor:
        return self.table


# config.position_encoding -> class(side, channels, bands)
POSITION_ENCODING_REGISTRY: dict[str, type[nn.Module]] = {
    "fourier": FourierPositionEncoding,
    "learned": LearnedPositionEncoding,
}


def build_position_encoding(config: PerceiverIOConfig, channels: int) -> nn.Module:
    cls = POSITION_ENCODING_REGISTRY[config.position_encoding]
    return cls(config.tokens_per_side, channels, config.fourier_bands)


class FrameEncoder(nn.Module):
    """Per-frame Perceiver: code vectors [N,D,h,w] -> (e [N,C], latents [N,L,E], tokens [N,h*w,E]).

    ``tokens`` are the token embeddings (projected codes + position encoding) the latents read; ``latents``
    the L = `num_latents` frame latents after self-attention (the decoder reads them); ``e`` the pooled
    frame embedding. E = `latent_channels`, C = `context_dim`.
    """

    def __init__(self, config: PerceiverIOConfig) -> None:
        super().__init__()
        e, heads = config.latent_channels, config.num_heads
        self.token_proj = nn.Linear(config.code_dim, e)
        self.position = build_position_encoding(config, e)
        self.latents = nn.Parameter(0.02 * torch.randn(config.num_latents, e))
        self.cross = CrossAttentionBlock(e, e, heads, config.mlp_ratio, config.dropout)
        self.layers = nn.ModuleList(
            SelfAttentionBlock(e, heads, config.mlp_ratio, config.dropout) for _ in range(config.num_self_attn_layers)
        )
        self.pool_query = nn.Parameter(0.02 * torch.randn(1, e))
        self.pool_norm = nn.LayerNorm(e)
        self.pool = Attention(e, e, heads)
        self.out = nn.Sequential(nn.LayerNorm(e), nn.Linear(e, config.context_dim))

    def embed_tokens(self, codes: Tensor) -> Tensor:
        """Code vectors [N,D,h,w] -> token embeddings [N,h*w,E]."""
        tokens = codes.flatten(2).transpose(1, 2)                                   # [N,hw,D]
        return self.token_proj(tokens) + self.position()[None]                      # [N,hw,E]

    def forward(self, codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tokens = self.embed_tokens(codes)                                           # [N,hw,E]
        latents = self.latents[None].expand(tokens.shape[0], -1, -1)                # [N,L,E]
        latents = self.cross(latents, tokens)
        for layer in self.layers:
            latents = layer(latents)
        normed = self.pool_norm(latents)
        query = self.pool_query[None].expand(tokens.shape[0], -1, -1)               # [N,1,E]
        pooled = self.pool(query, normed).squeeze(1)                                # [N,E]
        return self.out(pooled), latents, tokens


class CausalTemporalTransformer(nn.Module):
    """Frame embeddings e [B,T,C] -> contexts c [B,T,C], c_t a function of e_1..e_t only.

    A learned positional embedding of `max_seq_len` rows is added; T > max_seq_len is a ValueError.
    """

    def __init__(self, config: PerceiverIOConfig) -> None:
        super().__init__()
        c = config.context_dim
        self.max_seq_len = config.max_seq_len
        self.position = nn.Parameter(0.02 * torch.randn(config.max_seq_len, c))
        self.layers = nn.ModuleList(
            SelfAttentionBlock(c, config.num_heads, config.mlp_ratio, config.dropout, causal=True)
            for _ in range(config.num_temporal_layers)
        )
        self.norm = nn.LayerNorm(c)

    def forward(self, e: Tensor) -> Tensor:
        t = e.shape[1]
        if t > self.max_seq_len:
            raise ValueError(f"sequence of {t} frames is longer than max_seq_len={self.max_seq_len}; "
                             "raise PerceiverIOConfig.max_seq_len (perceiver_max_seq_len)")
        x = e + self.position[:t][None]                                             # [B,T,C]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
