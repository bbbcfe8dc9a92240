"""Closed forms and samplers of the stick-breaking prior against numerical integration / Monte Carlo."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from VRNN.dpgmm_prior import DPGMMPrior, PriorParams, bounded_logvar, gaussian_log_prob
from VRNN.stick_breaking import (
    Kumaraswamy,
    expected_kl_kumaraswamy_beta,
    kl_gamma,
    kl_kumaraswamy_beta,
    stick_breaking_log_weights,
    stick_breaking_weights,
)

D64 = torch.float64


def _kl_kuma_beta_numeric(a: float, b: float, alpha: float, beta: float) -> float:
    """KL by trapezoidal integration on a fine grid (float64)."""
    x = torch.linspace(0, 1, 2_000_001, dtype=D64)[1:-1]
    q = Kumaraswamy(torch.tensor(a, dtype=D64), torch.tensor(b, dtype=D64))
    log_q = q.log_prob(x)
    log_p = ((alpha - 1) * torch.log(x) + (beta - 1) * torch.log1p(-x)
             - (math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)))
    return float(torch.trapezoid(log_q.exp() * (log_q - log_p), x))


@pytest.mark.parametrize("a,b,alpha", [(1.5, 2.0, 1.0), (2.0, 3.0, 3.0), (0.8, 1.2, 0.5), (3.0, 0.7, 4.0),
                                       (1.0, 1.0, 2.0)])
def test_kl_kumaraswamy_beta_matches_integration(a, b, alpha):
    numeric = _kl_kuma_beta_numeric(a, b, 1.0, alpha)
    ta, tb = torch.tensor(a, dtype=D64), torch.tensor(b, dtype=D64)
    # Enough Taylor terms for the series to converge: within 1 % of the integral.
    closed = float(kl_kumaraswamy_beta(ta, tb, 1.0, alpha, taylor_terms=2000))
    assert closed == pytest.approx(numeric, rel=0.01)


def test_kl_kumaraswamy_beta_default_terms_and_truncation_direction():
    ta, tb = torch.tensor(2.0, dtype=D64), torch.tensor(3.0, dtype=D64)
    numeric = _kl_kuma_beta_numeric(2.0, 3.0, 1.0, 3.0)
    # Fast-decaying series (b = 3): the default M = 10 is within 3 % (the documented truncation bias).
    assert float(kl_kumaraswamy_beta(ta, tb, 1.0, 3.0, taylor_terms=10)) == pytest.approx(numeric, rel=0.03)
    # beta = 1: the series drops out and any M is exact.
    exact = _kl_kuma_beta_numeric(2.0, 3.0, 1.0, 1.0)
    assert float(kl_kumaraswamy_beta(ta, tb, 1.0, 1.0, taylor_terms=1)) == pytest.approx(exact, rel=1e-4)
    # For beta > 1 the truncated series misses positive terms: the error shrinks monotonically with M.
    ta, tb = torch.tensor(1.0, dtype=D64), torch.tensor(1.0, dtype=D64)
    values = [float(kl_kumaraswamy_beta(ta, tb, 1.0, 2.0, taylor_terms=m)) for m in (5, 10, 100, 1000)]
    assert all(x < y for x, y in itertools.pairwise(values))
    assert values[-1] == pytest.approx(_kl_kuma_beta_numeric(1.0, 1.0, 1.0, 2.0), rel=0.01)


def test_kl_kumaraswamy_beta_is_zero_for_equal_distributions():
    # Kuma(1, b) is Beta(1, b).
    b = torch.tensor([1.0, 2.0, 3.0], dtype=D64)
    kl = kl_kumaraswamy_beta(torch.ones_like(b), b, 1.0, b, taylor_terms=5000)
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-3)


def test_expected_kl_over_gamma_matches_monte_carlo():
    a = torch.tensor([0.7, 1.5, 3.0], dtype=D64)
    b = torch.tensor([1.2, 2.0, 0.9], dtype=D64)
    shape, rate = torch.tensor(2.5, dtype=D64), torch.tensor(1.5, dtype=D64)
    torch.manual_seed(0)
    alpha = torch.distributions.Gamma(shape, rate).sample((200_000,))
    mc = kl_kumaraswamy_beta(a, b, 1.0, alpha[:, None], taylor_terms=10).mean(0)
    exact = expected_kl_kumaraswamy_beta(a, b, shape, rate, taylor_terms=10)
    assert torch.allclose(exact, mc, rtol=0.01)


@pytest.mark.parametrize("kq,rq,kp,rp", [(2.0, 3.0, 1.0, 1.0), (0.7, 0.4, 1.0, 1.0), (5.0, 2.0, 2.0, 0.5)])
def test_kl_gamma_matches_integration(kq, rq, kp, rp):
    x = torch.logspace(-12, 3, 2_000_001, dtype=D64)
    q = torch.distributions.Gamma(torch.tensor(kq, dtype=D64), torch.tensor(rq, dtype=D64))
    p = torch.distributions.Gamma(torch.tensor(kp, dtype=D64), torch.tensor(rp, dtype=D64))
    log_q, log_p = q.log_prob(x), p.log_prob(x)
    numeric = float(torch.trapezoid(log_q.exp() * (log_q - log_p), x))
    closed = float(kl_gamma(torch.tensor(kq, dtype=D64), torch.tensor(rq, dtype=D64), kp, rp))
    assert closed == pytest.approx(numeric, rel=0.01)
    assert closed == pytest.approx(float(torch.distributions.kl_divergence(q, p)), rel=1e-8)


def test_kumaraswamy_sampler_moments_and_gradients():
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([0.5, 1.0, 2.0, 5.0], dtype=D64, requires_grad=True)
    b = torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=D64, requires_grad=True)
    kuma = Kumaraswamy(a, b)
    v = kuma.rsample((200_000,), generator=g)
    assert bool(((v > 0) & (v < 1)).all())
    se = kuma.variance.sqrt() / math.sqrt(v.shape[0])
    assert bool(((v.mean(0) - kuma.mean).abs() < 4 * se).all())
    assert torch.allclose(v.var(0), kuma.variance, rtol=0.02)
    v.mean().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all() and (a.grad.abs() > 0).all()
    # Analytic mean against numerical integration of the density (bounded densities: a, b >= 1).
    a2, b2 = torch.tensor([1.0, 2.0, 5.0], dtype=D64), torch.tensor([1.0, 1.5, 2.0], dtype=D64)
    x = torch.linspace(0, 1, 200_001, dtype=D64)[1:-1]
    dens = Kumaraswamy(a2[:, None], b2[:, None]).log_prob(x).exp()
    assert torch.allclose(torch.trapezoid(dens * x, x), Kumaraswamy(a2, b2).mean, rtol=1e-3)


def test_log_space_sampler_keeps_extreme_sticks_finite():
    g = torch.Generator().manual_seed(1)
    kuma = Kumaraswamy(torch.tensor([0.05, 100.0]), torch.tensor([100.0, 0.05]))
    log_v, log_1mv = kuma.rsample_log((1000,), generator=g)
    assert torch.isfinite(log_v).all() and torch.isfinite(log_1mv).all()
    log_pi = stick_breaking_log_weights(log_v, log_1mv)
    assert torch.allclose(torch.logsumexp(log_pi, -1), torch.zeros(1000), atol=1e-4)


def test_stick_weights_positive_and_sum_to_one():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(64, 14, generator=g, dtype=D64)
    v[0] = 0.0
    v[1] = 1.0
    pi = stick_breaking_weights(v)
    assert pi.shape == (64, 15)
    assert bool((pi > 0).all())
    assert torch.allclose(pi.sum(-1), torch.ones(64, dtype=D64), atol=1e-6)
    # pi_k = v_k prod_{j<k} (1 - v_j)
    manual = v[2, 1] * (1 - v[2, 0])
    assert float(pi[2, 1]) == pytest.approx(float(manual), rel=1e-9)


def _head(k=5, d=3, inp=6, **kw) -> DPGMMPrior:
    torch.manual_seed(0)
    return DPGMMPrior(inp, d, k, hidden_dim=16, **kw)


def test_prior_head_shapes_bounds_and_diagnostics():
    prior = _head(kl_samples=4, alpha_samples=2)
    params = prior(torch.randn(7, 6) * 10)
    assert params.means.shape == (7, 5, 3) and params.kuma_a.shape == (7, 4)
    assert bool((params.logvars >= -8).all() and (params.logvars <= 4).all())
    assert bool((params.alpha_shape > 0).all() and (params.kuma_b > 0).all())
    terms = prior.step_terms(params, torch.randn(7, 3), torch.zeros(7, 3), torch.Generator().manual_seed(0))
    assert torch.allclose(terms["pi"].sum(-1), torch.ones(7), atol=1e-5)
    assert torch.allclose(terms["k_eff"], terms["entropy"].exp())
    assert bool((terms["k_eff"] >= 1 - 1e-5).all() and (terms["k_eff"] <= 5 + 1e-5).all())
    assert torch.equal(terms["active"], (terms["pi"] > 0.01).sum(-1).float())
    assert bool((terms["kl_alpha"] >= 0).all())
    assert bounded_logvar(torch.tensor([-1e4, 1e4])).tolist() == [-8.0, 4.0]


def test_kl_z_nonnegative_in_expectation_and_zero_for_matching_mixture():
    prior = _head(kl_samples=2000)
    params = prior(torch.randn(5, 6))
    g = torch.Generator().manual_seed(0)
    log_pi = prior.log_weights(params, generator=g)
    kl, kl_dyn, kl_rep, z = prior.kl_z(torch.randn(5, 3), torch.randn(5, 3).clamp(-2, 1), log_pi, params, g)
    assert bool((kl > 0).all()) and z.shape == (5, 3)
    # The balanced halves have the estimate's value; each carries the gradient of one side only.
    torch.testing.assert_close(kl_dyn.detach(), kl)
    torch.testing.assert_close(kl_rep.detach(), kl)
    # Every component equal to q: the mixture is q, so every Monte Carlo term is exactly 0.
    mean, logvar = torch.randn(5, 3), torch.zeros(5, 3) - 1.0
    same = PriorParams(params.alpha_shape, params.alpha_rate, params.kuma_a, params.kuma_b,
                       mean[:, None].expand(5, 5, 3), logvar[:, None].expand(5, 5, 3))
    kl0 = prior.kl_z(mean, logvar, log_pi, same, g)[0]
    assert torch.allclose(kl0, torch.zeros(5), atol=1e-4)


def test_mixture_log_prob_matches_direct_sum():
    prior = _head()
    params = prior(torch.randn(4, 6))
    log_pi = prior.log_weights(params, sample=False)
    z = torch.randn(3, 4, 3)
    direct = torch.log((log_pi.exp()[None] * gaussian_log_prob(z[:, :, None], params.means, params.logvars).exp()
                        ).sum(-1))
    assert torch.allclose(prior.mixture_log_prob(z, log_pi, params.means, params.logvars), direct, atol=1e-5)


def test_exact_and_sampled_alpha_expectations_agree():
    sampled, exact = _head(alpha_samples=4000), _head(alpha_samples=0)
    params = sampled(torch.randn(3, 6))
    torch.manual_seed(0)
    assert torch.allclose(sampled.kl_sticks(params), exact.kl_sticks(params), rtol=0.02)


def test_sampler_temperature():
    prior = _head()
    params = prior(torch.randn(4, 6))
    z0, pi0 = prior.sample(params, temperature=0.0)
    k = pi0.argmax(-1)
    assert torch.allclose(z0, params.means[torch.arange(4), k])
    z1, _ = prior.sample(params, 1.0, torch.Generator().manual_seed(0))
    z2, _ = prior.sample(params, 1.0, torch.Generator().manual_seed(1))
    assert not torch.allclose(z1, z2)
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(params, -1.0)


def test_balanced_kl_halves_train_one_side_each():
    prior = _head(kl_samples=4)
    u = torch.randn(5, 6)
    mean = torch.randn(5, 3, requires_grad=True)
    logvar = torch.zeros(5, 3, requires_grad=True)
    params = prior(u)
    log_pi = prior.log_weights(params, generator=torch.Generator().manual_seed(0))
    _, kl_dyn, kl_rep, _ = prior.kl_z(mean, logvar, log_pi, params, torch.Generator().manual_seed(1))
    heads = [p for p in prior.parameters()]
    g_post = torch.autograd.grad(kl_dyn.sum(), [mean, logvar], allow_unused=True, retain_graph=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in g_post)       # dyn: the prior only
    g_prior = torch.autograd.grad(kl_rep.sum(), heads, allow_unused=True, retain_graph=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in g_prior)     # rep: the posterior only
    assert any(g is not None and float(g.abs().max()) > 0 for g in
               torch.autograd.grad(kl_dyn.sum(), heads, allow_unused=True, retain_graph=True))
    assert float(torch.autograd.grad(kl_rep.sum(), mean)[0].abs().max()) > 0
