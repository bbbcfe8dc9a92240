"""The per-step recurrent cell of the AIME world model: the only part that loops over time (MODEL.md §6).

One step t, with the time convention of MODEL.md §1 (``RecurrentState`` holds what step t may use):

    prior        p(z_t | u_t),  u_t = [h_t; c_{t-1}]               (DPGMMPrior)
    attn prior   p(A_t | A_{t-1}, h_t, z_{t-1})                     (AttentionSchema.prior_step)
    posterior    q(z_t | f_t, h_t, c_t) = N(mu, diag sigma^2)        (PosteriorHead)
    attn post.   A_t, slot maps, s_t from (features of x_t, h_t, c_t) (AttentionSchema.posterior_step)
    advance      h_{t+1} = LSTM([z_t; a_t; c_t; s_t], h_t)            (temporal_dynamics.LSTMLayer)

h_1 is the LSTM's learned initial state (layer-normed like every other output); c_0, z_0 are zeros and
A_0 is the uniform map. Rows flagged ``reset`` (episode starts) get that initial state back before the
step, so nothing of the previous episode reaches step t through h, z, c or A.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from temporal_dynamics import LSTMLayer
from VRNN.attention_schema import AttentionSchema
from VRNN.dpgmm_prior import DPGMMPrior, PriorParams, bounded_logvar

__all__ = ["PosteriorHead", "RecurrentState", "VRNNCell"]


@dataclass
class RecurrentState:
    """What step t may depend on. h [B, H] (= h_t), lstm (h, c) [L, B, H], z_prev [B, D] (z_{t-1}),
    c_prev [B, C] (c_{t-1}), map_prev [B, R, R] (A_{t-1}), center_prev [B, 2] (centre of mass of A_{t-1})."""

    h: Tensor
    lstm: tuple[Tensor, Tensor]
    z_prev: Tensor
    c_prev: Tensor
    map_prev: Tensor
    center_prev: Tensor


class PosteriorHead(nn.Module):
    """q(z_t | x_t, h_t, c_t): a two-layer SiLU MLP on [f_t; h_t; c_t] -> (mu [B, D], log sigma^2 [B, D]),
    the log-variance bounded into [-8, 4] like the prior's components."""

    def __init__(self, input_dim: int, latent_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.SiLU(), nn.Linear(hidden_dim, 2 * latent_dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = self.net(x).float().chunk(2, dim=-1)  # float32 under autocast: the KL needs it
        return mean, bounded_logvar(raw)


class VRNNCell(nn.Module):
    """Prior, posterior, attention schema and LSTM, wired per MODEL.md §1.

    Sizes: feature F (encoder), H hidden, C context, D latent, A action, attention state size.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, context_dim: int, latent_dim: int, action_dim: int,
                 attention: AttentionSchema, prior: DPGMMPrior, lstm_layers: int = 1) -> None:
        super().__init__()
        self.hidden_dim, self.context_dim, self.latent_dim = hidden_dim, context_dim, latent_dim
        self.prior = prior
        self.posterior = PosteriorHead(feature_dim + hidden_dim + context_dim, latent_dim, hidden_dim)
        self.attention = attention
        self.lstm = LSTMLayer(latent_dim + action_dim + context_dim + attention.attention_dim, hidden_dim,
                              num_layers=lstm_layers, layer_norm=True)

    # ----------------------------------------------------------------------------------------------
    def _output(self, lstm_h: Tensor) -> Tensor:
        top = lstm_h[-1]
        return self.lstm.norm(top) if self.lstm.norm is not None else top

    def initial_state(self, batch_size: int) -> RecurrentState:
        """h_1 (learned), z_0 = c_0 = 0, A_0 uniform."""
        lstm = self.lstm.initial_state(batch_size)
        att = self.attention.initial_map(batch_size)
        zeros = att.new_zeros
        return RecurrentState(h=self._output(lstm[0]), lstm=lstm, z_prev=zeros(batch_size, self.latent_dim),
                              c_prev=zeros(batch_size, self.context_dim), map_prev=att,
                              center_prev=zeros(batch_size, 2))

    def reset(self, state: RecurrentState, mask: Tensor | None) -> RecurrentState:
        """Rows where mask [B] (bool) is True start a new episode: back to the initial state."""
        if mask is None:
            return state
        init = self.initial_state(mask.shape[0])
        pick = lambda new, old: torch.where(mask.view(-1, *([1] * (old.dim() - 1))), new, old)
        pick_lstm = lambda new, old: torch.where(mask.view(1, -1, 1), new, old)
        return RecurrentState(h=pick(init.h, state.h),
                              lstm=(pick_lstm(init.lstm[0], state.lstm[0]), pick_lstm(init.lstm[1], state.lstm[1])),
                              z_prev=pick(init.z_prev, state.z_prev), c_prev=pick(init.c_prev, state.c_prev),
                              map_prev=pick(init.map_prev, state.map_prev),
                              center_prev=pick(init.center_prev, state.center_prev))

    # ----------------------------------------------------------------------------------------------
    def prior_step(self, state: RecurrentState) -> tuple[PriorParams, dict[str, Tensor]]:
        """Everything step t predicts before seeing x_t: the DPGMM prior and the attention prior."""
        params = self.prior(torch.cat([state.h, state.c_prev], dim=-1))
        att_prior = self.attention.prior_step(state.map_prev, state.h, state.z_prev)
        return params, att_prior

    def observe(self, state: RecurrentState, feature: Tensor, att_feats: Tensor, context: Tensor,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Step t with x_t observed.

        feature [B, F] (encoder f_t), att_feats [B, R*R, slot_dim] (attention features of x_t), context
        [B, C] (c_t). Returns the per-step terms ([B] unless noted): kl_z, kl_sticks, kl_alpha, entropy,
        k_eff, active, attention_kl, attention_dynamics, attention_diversity, and z [B, D], z_mean,
        z_logvar, pi [B, K], prior_map / map [B, R, R], slot_maps [B, S, R, R], center [B, 2], s [B, S_att],
        and the prior's parameters prior_means / prior_logvars [B, K, D], stick_a / stick_b [B, K-1],
        alpha_shape / alpha_rate [B].
        """
        params, att_prior = self.prior_step(state)
        mean, logvar = self.posterior(torch.cat([feature, state.h, context], dim=-1))
        terms = self.prior.step_terms(params, mean, logvar, generator)
        att_post = self.attention.posterior_step(att_feats, state.h, context)
        attention = self.attention
        out = dict(terms)
        out.update(z_mean=mean, z_logvar=logvar, prior_map=att_prior["map"], map=att_post["map"],
                   slot_maps=att_post["slot_maps"], center=att_post["center"], s=att_post["state"],
                   attention_kl=attention.attention_kl(att_post["map"], att_prior["logits"]),
                   attention_dynamics=attention.dynamics_loss(att_prior["motion"], state.center_prev,
                                                              att_post["center"]),
                   attention_diversity=attention.diversity(att_post["slot_maps"]),
                   prior_means=params.means, prior_logvars=params.logvars, stick_a=params.kuma_a,
                   stick_b=params.kuma_b, alpha_shape=params.alpha_shape, alpha_rate=params.alpha_rate)
        return out

    def advance(self, state: RecurrentState, z: Tensor, action: Tensor, context: Tensor, s: Tensor,
                attention_map: Tensor, center: Tensor) -> RecurrentState:
        """h_{t+1} = LSTM([z_t; a_t; c_t; s_t], h_t); the new state carries z_t, c_t, A_t for step t+1."""
        out, lstm = self.lstm.step(torch.cat([z, action, context, s], dim=-1), state.lstm)
        return replace(state, h=out, lstm=lstm, z_prev=z, c_prev=context, map_prev=attention_map,
                       center_prev=center)
