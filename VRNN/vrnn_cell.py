"""The recurrent part of the AIME world model: the only part that loops over time (MODEL.md §6).

The state follows the recurrent state-space model of PlaNet and DreamerV3 rather than MODEL.md §2.5:
the observation reaches the recurrent state only through z (docs/MODEL_CHANGES.md). One step t, with the
time convention of MODEL.md §1:

    posterior    q(z_t | f_t, h_t, c_t, s_t) = N(mu, diag sigma^2)     (PosteriorHead; in the loop)
    advance      h_{t+1} = LSTM([z_t; a_t], h_t)                        (temporal_dynamics.LSTMLayer)
    prior        p(z_t | h_t)                                             (DPGMMPrior; batched after the loop)
    attn prior   p(A_t | A_{t-1}, h_t, z_{t-1})                          (AttentionSchema.prior_step; batched)

f_t (encoder), c_t (Perceiver context) and s_t (attention state) are functions of the frames alone, so they
are computed for all B*T frames before the loop; the prior terms depend on h_t only, so they are computed
for all B*T steps after it. The loop itself is one small MLP, one reparameterised draw and one LSTM step.

h_1 is the LSTM's learned initial state (layer-normed like every other output); z_0 is zero and A_0 the
uniform map. Rows flagged ``reset`` (episode starts) get that initial state back before the step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from temporal_dynamics import LSTMLayer
from VRNN.attention_schema import AttentionSchema
from VRNN.dpgmm_prior import DPGMMPrior, bounded_logvar

__all__ = ["PosteriorHead", "RecurrentState", "VRNNCell"]


@dataclass
class RecurrentState:
    """What step t may depend on. h [B, H] (= h_t), lstm (h, c) [L, B, H], z_prev [B, D] (z_{t-1}),
    map_prev [B, R, R] (A_{t-1}), center_prev [B, 2] (centre of mass of A_{t-1})."""

    h: Tensor
    lstm: tuple[Tensor, Tensor]
    z_prev: Tensor
    map_prev: Tensor
    center_prev: Tensor


class PosteriorHead(nn.Module):
    """q(z_t | x_t, h_t, c_t, s_t): a two-layer SiLU MLP on [f_t; h_t; c_t; s_t] -> (mu [B, D],
    log sigma^2 [B, D]), the log-variance bounded into [-8, 4] like the prior's components."""

    def __init__(self, input_dim: int, latent_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.SiLU(), nn.Linear(hidden_dim, 2 * latent_dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = self.net(x).float().chunk(2, dim=-1)  # float32 under autocast: the KL needs it
        return mean, bounded_logvar(raw)


class VRNNCell(nn.Module):
    """Posterior head, LSTM, DPGMM prior and (optionally) the attention schema.

    Sizes: feature F (encoder), H hidden, C context (0 without the Perceiver), D latent, A action,
    attention state size (0 without the attention schema: ``attention=None``). ``side_inputs`` False: the
    posterior reads [f_t; h_t] only (the RSSM posterior) and ``posterior_step`` takes a side of 0 columns.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, context_dim: int, latent_dim: int, action_dim: int,
                 attention: AttentionSchema | None, prior: DPGMMPrior, lstm_layers: int = 1,
                 attention_resolution: int = 16, side_inputs: bool = True) -> None:
        super().__init__()
        self.hidden_dim, self.context_dim, self.latent_dim = hidden_dim, context_dim, latent_dim
        self.attention_resolution = attention.resolution if attention is not None else attention_resolution
        state_dim = attention.attention_dim if attention is not None else 0
        side_dim = context_dim + state_dim if side_inputs else 0
        self.prior = prior
        self.posterior = PosteriorHead(feature_dim + hidden_dim + side_dim, latent_dim, hidden_dim)
        self.attention = attention
        self.lstm = LSTMLayer(latent_dim + action_dim, hidden_dim, num_layers=lstm_layers, layer_norm=True)

    # ----------------------------------------------------------------------------------------------
    def _output(self, lstm_h: Tensor) -> Tensor:
        top = lstm_h[-1]
        return self.lstm.norm(top) if self.lstm.norm is not None else top

    def uniform_map(self, batch_size: int) -> Tensor:
        """The uniform attention map [B, R, R] (A_0)."""
        r = self.attention_resolution
        return self.lstm.h0.new_full((batch_size, r, r), 1.0 / (r * r))

    def initial_state(self, batch_size: int) -> RecurrentState:
        """h_1 (learned), z_0 = 0, A_0 uniform."""
        lstm = self.lstm.initial_state(batch_size)
        zeros = lstm[0].new_zeros
        return RecurrentState(h=self._output(lstm[0]), lstm=lstm, z_prev=zeros(batch_size, self.latent_dim),
                              map_prev=self.uniform_map(batch_size), center_prev=zeros(batch_size, 2))

    def reset(self, state: RecurrentState, mask: Tensor | None) -> RecurrentState:
        """Rows where mask [B] (bool) is True start a new episode: back to the initial state."""
        if mask is None:
            return state
        init = self.initial_state(mask.shape[0])
        pick = lambda new, old: torch.where(mask.view(-1, *([1] * (old.dim() - 1))), new, old)
        pick_lstm = lambda new, old: torch.where(mask.view(1, -1, 1), new, old)
        return RecurrentState(h=pick(init.h, state.h),
                              lstm=(pick_lstm(init.lstm[0], state.lstm[0]), pick_lstm(init.lstm[1], state.lstm[1])),
                              z_prev=pick(init.z_prev, state.z_prev), map_prev=pick(init.map_prev, state.map_prev),
                              center_prev=pick(init.center_prev, state.center_prev))

    # ----------------------------------------------------------------------------------------------
    def posterior_step(self, state: RecurrentState, feature: Tensor, side: Tensor) -> tuple[Tensor, Tensor]:
        """q(z_t | f_t, h_t, c_t, s_t): feature f_t [B, F], side = [c_t; s_t] [B, C + S_att] (may have no
        columns) and h_t from ``state`` -> (mean, logvar) [B, D]."""
        return self.posterior(torch.cat([feature, state.h, side], dim=-1))

    def advance(self, state: RecurrentState, z: Tensor, action: Tensor) -> RecurrentState:
        """h_{t+1} = LSTM([z_t; a_t], h_t); the new state carries z_t as z_prev."""
        out, lstm = self.lstm.step(torch.cat([z, action], dim=-1), state.lstm)
        return replace(state, h=out, lstm=lstm, z_prev=z)

    def attention_prior_step(self, state: RecurrentState, detach_attention_inputs: bool = False,
                             ) -> dict[str, Tensor] | None:
        """The attention prior p(A_t | A_{t-1}, h_t, z_{t-1}) of one step: logits [B, R*R] and map [B, R, R]
        (``None`` without attention). ``detach_attention_inputs``: it reads h_t and z_{t-1} detached (as in
        training). The motion head is skipped (nothing in a rollout scores it)."""
        if self.attention is None:
            return None
        read = (lambda v: v.detach()) if detach_attention_inputs else (lambda v: v)
        return self.attention.prior_step(state.map_prev, read(state.h), read(state.z_prev), motion=False)
