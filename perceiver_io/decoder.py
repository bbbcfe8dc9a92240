"""Perceiver IO next-frame token decoder (MODEL.md §2.1).

One output query per token position of x_{t+1} (h*w = 256 queries at 64x64 with x4 tokens). A query is
built from the position encoding of its grid cell, plus a projection of c_t (so that every query knows
the temporal context), plus, when `query_from_current_tokens` is on, a `query_kernel_size` x
`query_kernel_size` convolution of x_t's token embeddings around the same cell (a local copy prior: in
video most tokens persist or move by a few cells from one frame to the next, so the decoder learns what
changes and where from, rather than redrawing the frame from a global summary). The queries cross-attend to
[c_t ; the frame latents of x_t] (Jaegle et al. 2022, Perceiver IO) and a linear head gives logits over the K codebook entries.
With `copy_prior`, a learned gain is added to the logit of x_t's own code at each cell (a copy
mechanism, as in pointer-generator networks; See et al. 2017), so that "unchanged" is the default answer
from the first step and stays right when the EMA codebook renames codes.

All inputs of step t are functions of x_1..x_t (c_t is causal, the latents and tokens are per-frame), so
the logits for x_{t+1} never see x_{t+1}.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from perceiver_io.config import PerceiverIOConfig
from perceiver_io.encoder import CrossAttentionBlock, build_position_encoding

__all__ = ["NextFrameTokenDecoder"]


class NextFrameTokenDecoder(nn.Module):
    """(c_t [N,C], frame latents [N,L,E], token embeddings of x_t [N,h*w,E], code indices of x_t
    [N,h*w] int64) -> logits for the codes of x_{t+1} [N,h*w,K].

    N is any batch of frames (the model passes B*(T-1) or B*T at once); E = `latent_channels`,
    K = `num_codes`. ``tokens`` may be None when `query_from_current_tokens` is off, ``indices`` when
    `copy_prior` is off.
    """

    def __init__(self, config: PerceiverIOConfig) -> None:
        super().__init__()
        e = config.latent_channels
        self.use_current_tokens = config.query_from_current_tokens
        self.query_position = build_position_encoding(config, e)
        self.context_to_query = nn.Linear(config.context_dim, e)
        self.context_token = nn.Linear(config.context_dim, e)
        self.tokens_per_side = config.tokens_per_side
        k = config.query_kernel_size
        self.current_proj = nn.Conv2d(e, e, k, padding=k // 2) if self.use_current_tokens else None
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(e, e, config.num_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.num_decoder_layers)
        )
        self.head = nn.Sequential(nn.LayerNorm(e), nn.Linear(e, config.num_codes))
        # Copy gain: added to the logit of x_t's own code at every cell. It works on indices, so the
        # "nothing moved here" prediction needs no per-code learning and survives codebook reassignments.
        init = math.log(config.num_codes) if config.copy_logit_init is None else config.copy_logit_init
        self.copy_gain = nn.Parameter(torch.tensor(float(init))) if config.copy_prior else None

    def forward(self, context: Tensor, latents: Tensor, tokens: Tensor | None = None,
                indices: Tensor | None = None) -> Tensor:
        n = context.shape[0]
        queries = self.query_position()[None] + self.context_to_query(context)[:, None]   # [N,hw,E]
        if self.current_proj is not None:
            if tokens is None:
                raise ValueError("this decoder was configured with query_from_current_tokens=True: "
                                 "pass the token embeddings of x_t [N,h*w,E]")
            side = self.tokens_per_side
            grid = tokens.transpose(1, 2).reshape(n, -1, side, side)                        # [N,E,h,w]
            queries = queries + self.current_proj(grid).flatten(2).transpose(1, 2)         # [N,hw,E]
        kv = torch.cat([self.context_token(context)[:, None], latents], dim=1)              # [N,L+1,E]
        assert queries.shape[0] == n and kv.shape[0] == n
        for block in self.blocks:
            queries = block(queries, kv)
        logits = self.head(queries)                                                        # [N,hw,K]
        if self.copy_gain is not None:
            if indices is None:
                raise ValueError("this decoder was configured with copy_prior=True: pass the code indices "
                                 "of x_t [N,h*w]")
            bonus = self.copy_gain.to(logits.dtype).expand(indices.shape)[..., None]        # [N,hw,1]
            logits = logits.scatter_add(-1, indices.reshape(n, -1, 1), bonus)
        return logits
