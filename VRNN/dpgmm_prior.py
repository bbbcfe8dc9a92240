"""The DPGMM prior head p(z_t | u_t): a truncated Dirichlet-process Gaussian mixture (MODEL.md section 2.3).

Given u_t = [h_t; c_{t-1}] the head outputs
- a Gamma posterior q(alpha | u_t) = Gamma(k, r) on the DP concentration (softplus heads, shape-rate),
- K-1 Kumaraswamy stick posteriors q(v_k | u_t) = Kuma(a_k, b_k) (softplus heads),
- K Gaussian components (mu_k, log sigma^2_k), the log-variance bounded smoothly into [-8, 4] by a
  scaled tanh so that no component can collapse to a spike or blow up.

The mixture weights are pi = stick_breaking(v) with v drawn by the reparameterised Kumaraswamy sampler,
so every KL term below is differentiable in all head outputs. Units: nats per frame, shape [B].

Choices where the spec is silent: the trunk is a two-layer SiLU MLP without normalisation (a
normalisation layer could erase the input scale the concentration depends on); softplus outputs get a
small floor (Kumaraswamy parameters >= 0.05, Gamma parameters >= 1e-3) and biases initialised so that
a = b = k = r = 1 at the start (uniform sticks, alpha ~ Exp(1), matching the default hyperprior).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from VRNN.stick_breaking import (
    Kumaraswamy,
    expected_kl_kumaraswamy_beta,
    kl_gamma,
    kl_kumaraswamy_beta,
    stick_breaking_log_weights,
)

__all__ = ["DPGMMPrior", "PriorParams", "bounded_logvar", "gaussian_log_prob"]

_LOG_2PI = math.log(2.0 * math.pi)
_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(x) = 1 at x = log(e - 1)


def bounded_logvar(x: Tensor, low: float = -8.0, high: float = 4.0) -> Tensor:
    """Smooth squash of an unbounded head output into [low, high] (scaled tanh)."""
    return low + 0.5 * (high - low) * (torch.tanh(x) + 1.0)


def gaussian_log_prob(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mean, diag exp(logvar)) summed over the last axis (D), in nats."""
    return -0.5 * (_LOG_2PI + logvar + (z - mean).pow(2) * torch.exp(-logvar)).sum(-1)


@dataclass
class PriorParams:
    """Outputs of the head for one step. Shapes: alpha_* [B], kuma_* [B,K-1], means/logvars [B,K,D]."""

    alpha_shape: Tensor
    alpha_rate: Tensor
    kuma_a: Tensor
    kuma_b: Tensor
    means: Tensor
    logvars: Tensor


class DPGMMPrior(nn.Module):
    """Prior head over z in R^D with K components, from an input u of size ``input_dim``."""

    def __init__(self, input_dim: int, latent_dim: int, max_components: int, hidden_dim: int | None = None,
                 alpha_a0: float = 1.0, alpha_b0: float = 1.0, taylor_terms: int = 10, kl_samples: int = 8,
                 alpha_samples: int = 4, random_stick_order: bool = False,
                 logvar_range: tuple[float, float] = (-8.0, 4.0)) -> None:
        super().__init__()
        if max_components < 1:
            raise ValueError(f"max_components={max_components} is invalid: expected at least 1 (1 = a single "
                             "Gaussian prior, no sticks)")
        hidden_dim = hidden_dim or max(64, input_dim)
        self.latent_dim, self.max_components = latent_dim, max_components
        self.alpha_a0, self.alpha_b0 = float(alpha_a0), float(alpha_b0)
        self.taylor_terms, self.kl_samples, self.alpha_samples = taylor_terms, kl_samples, alpha_samples
        self.random_stick_order = random_stick_order
        self.logvar_range = logvar_range
        self.trunk = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.SiLU(),
                                   nn.Linear(hidden_dim, hidden_dim), nn.SiLU())
        self.alpha_head = nn.Linear(hidden_dim, 2)
        self.stick_head = nn.Linear(hidden_dim, 2 * (max_components - 1))
        self.component_head = nn.Linear(hidden_dim, 2 * max_components * latent_dim)
        for head in (self.alpha_head, self.stick_head):
            nn.init.normal_(head.weight, std=0.01)
            nn.init.constant_(head.bias, _SOFTPLUS_ONE)
        # Spread the initial component means so the mixture is not K copies of one Gaussian.
        nn.init.normal_(self.component_head.bias, std=0.5)

    # ----------------------------------------------------------------------------------------------
    def forward(self, u: Tensor) -> PriorParams:
        """u [B, input_dim] -> PriorParams."""
        hid = self.trunk(u)
        # float32 from here on: lgamma/digamma and the log-space sampler are poor in bf16 (autocast).
        k_raw, r_raw = self.alpha_head(hid).float().unbind(-1)
        a_raw, b_raw = self.stick_head(hid).float().chunk(2, dim=-1)
        comp = self.component_head(hid).float().view(u.shape[0], 2, self.max_components, self.latent_dim)
        return PriorParams(
            alpha_shape=F.softplus(k_raw) + 1e-3, alpha_rate=F.softplus(r_raw) + 1e-3,
            kuma_a=(F.softplus(a_raw) + 0.05).clamp(max=100.0), kuma_b=(F.softplus(b_raw) + 0.05).clamp(max=100.0),
            means=comp[:, 0], logvars=bounded_logvar(comp[:, 1], *self.logvar_range),
        )

    # ----------------------------------------------------------------------------------------------
    def log_weights(self, params: PriorParams, sample: bool = True,
                    generator: torch.Generator | None = None) -> Tensor:
        """log pi [B, K] from sampled sticks (reparameterised) or, with ``sample=False``, from the
        Kumaraswamy means (deterministic, still a valid distribution)."""
        kuma = Kumaraswamy(params.kuma_a, params.kuma_b)
        if sample:
            log_v, log_1mv = kuma.rsample_log(generator=generator)
        else:
            v = kuma.mean.clamp(1e-6, 1.0 - 1e-6)
            log_v, log_1mv = torch.log(v), torch.log1p(-v)
        log_pi = stick_breaking_log_weights(log_v, log_1mv)
        if self.random_stick_order and self.training:
            # Optional: a random assignment of sticks to components, so no component is always first.
            perm = torch.randperm(self.max_components, generator=generator).to(log_pi.device)
            log_pi = log_pi[:, perm]
        return log_pi

    @staticmethod
    def mixture_log_prob(z: Tensor, log_pi: Tensor, means: Tensor, logvars: Tensor) -> Tensor:
        """log sum_k pi_k N(z; mu_k, sigma_k^2). z [..., B, D], log_pi [B, K], means/logvars [B, K, D]
        -> [..., B] nats (logsumexp over K)."""
        comp = gaussian_log_prob(z.unsqueeze(-2), means, logvars)  # [..., B, K]
        return torch.logsumexp(comp + log_pi, dim=-1)

    def kl_sticks(self, params: PriorParams) -> Tensor:
        """sum_{k<K} E_{q(alpha)} KL(Kuma(a_k, b_k) || Beta(1, alpha)) -> [B] nats.

        ``alpha_samples`` > 0: average over that many reparameterised Gamma draws (torch's implicit
        reparameterisation; it uses torch's global RNG). ``alpha_samples`` = 0: the exact expectation
        (the KL is affine in alpha and log alpha)."""
        a, b = params.kuma_a, params.kuma_b
        if self.alpha_samples <= 0:
            return expected_kl_kumaraswamy_beta(a, b, params.alpha_shape[:, None], params.alpha_rate[:, None],
                                                self.taylor_terms).sum(-1)
        gamma = torch.distributions.Gamma(params.alpha_shape, params.alpha_rate)
        alpha = gamma.rsample((self.alpha_samples,)).clamp(min=1e-4)  # [S, B]
        kl = kl_kumaraswamy_beta(a.unsqueeze(0), b.unsqueeze(0), 1.0, alpha.unsqueeze(-1), self.taylor_terms)
        return kl.sum(-1).mean(0)

    def kl_alpha(self, params: PriorParams) -> Tensor:
        """KL(Gamma(k, r) || Gamma(a0, b0)) -> [B] nats."""
        return kl_gamma(params.alpha_shape, params.alpha_rate, self.alpha_a0, self.alpha_b0)

    def kl_z(self, post_mean: Tensor, post_logvar: Tensor, log_pi: Tensor, params: PriorParams,
             generator: torch.Generator | None = None, first_noise: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Monte Carlo KL(q(z) || p(z)) with ``kl_samples`` reparameterised draws, and its two balanced halves.

        post_mean/post_logvar [N, D]; ``first_noise`` [N, D] (optional) is the standard-normal noise of the
        draw used downstream as z_t, so that the estimate includes it. Returns, each [N] nats except z:
        - ``kl``: the estimate (what bits/dim reports);
        - ``kl_dyn``: the same value with the posterior (draws and density) held fixed: its gradient trains
          only the prior (DreamerV3's dynamics loss);
        - ``kl_rep``: the same value with the prior held fixed: its gradient trains only the posterior
          (DreamerV3's representation loss). ``kl_dyn + kl_rep`` has the gradient of ``kl``;
        - ``z`` [N, D]: the first draw.
        """
        shape = (max(1, self.kl_samples),) + tuple(post_mean.shape)
        eps = torch.randn(shape, generator=generator, dtype=post_mean.dtype, device=post_mean.device)
        if first_noise is not None:
            eps = torch.cat([first_noise.unsqueeze(0).to(eps.dtype), eps[1:]], dim=0)
        z = post_mean + torch.exp(0.5 * post_logvar) * eps  # [S, N, D]
        log_q = gaussian_log_prob(z, post_mean, post_logvar)
        fixed_prior = self.mixture_log_prob(z, log_pi.detach(), params.means.detach(), params.logvars.detach())
        kl_rep = (log_q - fixed_prior).mean(0)
        z_fixed = z.detach()
        log_q_fixed = gaussian_log_prob(z_fixed, post_mean.detach(), post_logvar.detach())
        kl_dyn = (log_q_fixed - self.mixture_log_prob(z_fixed, log_pi, params.means, params.logvars)).mean(0)
        return kl_rep.detach(), kl_dyn, kl_rep, z[0]

    # ----------------------------------------------------------------------------------------------
    def step_terms(self, params: PriorParams, post_mean: Tensor, post_logvar: Tensor,
                   generator: torch.Generator | None = None, first_noise: Tensor | None = None) -> dict[str, Tensor]:
        """Every term of the prior for N steps at once (all [N] unless noted).

        Returns kl_z (the estimate, no gradient), kl_dyn / kl_rep (its balanced halves, see ``kl_z``),
        kl_sticks, kl_alpha, entropy (H(pi), nats), k_eff (exp H), active (count of pi_k > 0.01),
        pi [N, K], log_pi [N, K], z [N, D] (the first posterior draw).
        """
        log_pi = self.log_weights(params, sample=True, generator=generator)
        kl_z, kl_dyn, kl_rep, z = self.kl_z(post_mean, post_logvar, log_pi, params, generator, first_noise)
        pi = log_pi.exp()
        entropy = -(pi * log_pi).sum(-1)
        return {"kl_z": kl_z, "kl_dyn": kl_dyn, "kl_rep": kl_rep, "kl_sticks": self.kl_sticks(params),
                "kl_alpha": self.kl_alpha(params), "entropy": entropy, "k_eff": entropy.exp(),
                "active": (pi > 0.01).to(pi.dtype).sum(-1), "pi": pi, "log_pi": log_pi, "z": z}

    @torch.no_grad()
    def _component_choice(self, log_pi: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
        if temperature <= 0:
            return log_pi.argmax(-1)
        u = torch.rand(log_pi.shape, generator=generator, dtype=log_pi.dtype, device=log_pi.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-10)))
        return (log_pi / temperature + gumbel).argmax(-1)

    def sample(self, params: PriorParams, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw z [B, D] from the prior; also returns pi [B, K].

        ``temperature`` tau scales both the component choice (Cat(pi^(1/tau)), via Gumbel-max) and the
        spread (z = mu_k + tau sigma_k eps). tau = 0 takes the mean of the most probable component, with
        pi from the Kumaraswamy means; tau > 0 also samples the sticks.
        """
        if temperature < 0:
            raise ValueError(f"temperature={temperature} is invalid: expected >= 0")
        log_pi = self.log_weights(params, sample=temperature > 0, generator=generator)
        k = self._component_choice(log_pi, temperature, generator)
        idx = k[:, None, None].expand(-1, 1, self.latent_dim)
        mean = params.means.gather(1, idx).squeeze(1)
        if temperature <= 0:
            return mean, log_pi.exp()
        std = torch.exp(0.5 * params.logvars.gather(1, idx).squeeze(1))
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + temperature * std * eps, log_pi.exp()
