"""Discretised pixel likelihoods: proper distributions over the 256 levels, means, samples, registry."""

from __future__ import annotations

import math

import pytest
import torch

from VRNN.likelihoods import (
    DiscretizedGaussian,
    DiscretizedLogisticMixture,
    build_likelihood,
    quantize,
)

LEVELS = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0


def _sweep(channel: int, fixed: torch.Tensor) -> torch.Tensor:
    """x [K, 3, 1, 256]: row k holds the conditioning values fixed[k] with ``channel`` swept over the levels."""
    x = fixed[:, :, None, None].repeat(1, 1, 1, 256)
    x[:, channel, 0, :] = LEVELS
    return x


def test_logistic_conditionals_sum_to_one_and_compose_the_joint():
    """sum over levels of p_m(x_c | x_<c) = 1 for every component, channel and conditioning value (edge
    bins included, sharp and wide scales, strong coupling); with log_prob_pixels = log sum_m pi_m prod_c
    p_m(x_c | x_<c) this makes the joint over 256^3 values sum to 1."""
    torch.manual_seed(0)
    lik = DiscretizedLogisticMixture(3)
    params = torch.randn(1, lik.num_params, 1, 1)
    params[:, 12:21] = torch.tensor([-6.0, 0.5, -2.5] * 3).view(1, 9, 1, 1)  # log-scales per (c, m)
    params[:, 21:30] = torch.randn(1, 9, 1, 1) * 3                          # strong coupling
    fixed = torch.cat([LEVELS[[0, 255, 100, 17]], torch.rand(4) * 2 - 1]).view(8, 1).repeat(1, 3)
    fixed[:, 1] = fixed[torch.randperm(8), 0]
    for channel in range(3):
        x = _sweep(channel, fixed)
        cond = lik.channel_log_probs(params.expand(8, -1, 1, 256), x)[:, channel]  # [8, M, 1, 256]
        mass = cond.exp().sum(-1)
        assert torch.allclose(mass, torch.ones_like(mass), atol=1e-4), mass
    x = torch.rand(2, 3, 5, 5) * 2 - 1
    p = torch.randn(2, lik.num_params, 5, 5)
    joint = torch.logsumexp(lik.channel_log_probs(p, x).sum(1) + torch.log_softmax(p[:, :3], 1), 1)
    assert torch.allclose(lik.log_prob_pixels(p, x), joint)


def test_logistic_joint_mass_is_one_by_brute_force():
    """The full 256^3 sum for one pixel, with one component and coupling (16.7 M evaluations, no grad)."""
    torch.manual_seed(1)
    lik = DiscretizedLogisticMixture(1)
    params = torch.randn(1, 10, 1, 1) * 0.5
    r, g = torch.meshgrid(LEVELS, LEVELS, indexing="ij")
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        prm = params.expand(16, -1, 256, 256)
        for blue in LEVELS.view(16, 16):
            x = torch.stack([r.expand(16, -1, -1), g.expand(16, -1, -1), blue.view(16, 1, 1).expand(-1, 256, 256)], 1)
            total += lik.log_prob_pixels(prm, x).exp().double().sum()
    assert float(total) == pytest.approx(1.0, abs=1e-3)


def test_gaussian_channel_masses_sum_to_one():
    lik = DiscretizedGaussian()
    with torch.no_grad():
        lik.log_scale.copy_(torch.log(torch.tensor([0.002, 0.3, 3.0])))
    means = torch.tensor([-1.2, -0.7, 0.0, 0.31, 0.999, 1.5]).view(6, 1).repeat(1, 3)
    x = torch.zeros(6, 3, 1, 256) + LEVELS
    with torch.no_grad():
        mass = lik.channel_log_probs(means[:, :, None, None].expand(-1, -1, 1, 256), x).exp().sum(-1)
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-4), mass


def test_bits_are_comparable_between_likelihoods_and_sharp_fits_are_near_zero():
    x = quantize(torch.rand(2, 3, 8, 8) * 2 - 1)
    gauss = DiscretizedGaussian(init_scale=1e-3)
    lp = gauss.log_prob(x, x) / x[0].numel()  # mean exactly on the data, scale far below a bin: p -> 1
    assert bool((lp > -1e-3).all())
    mdl = DiscretizedLogisticMixture(1)
    params = torch.zeros(2, 10, 8, 8)
    params[:, 1:4] = x
    params[:, 4:7] = -8.0
    assert bool((mdl.log_prob(params, x) / x[0].numel() > -0.05).all())
    # A flat density over [-1, 1] costs about 8 bits per dimension in both.
    wide = DiscretizedGaussian(init_scale=10.0)
    bits = -wide.log_prob(torch.zeros(2, 3, 8, 8), x) / (3 * 64 * math.log(2))
    assert bool(((bits > 7.5) & (bits < 12)).all())


def test_mean_image_and_sample():
    torch.manual_seed(0)
    lik = DiscretizedLogisticMixture(2)
    params = torch.randn(3, lik.num_params, 4, 4, requires_grad=True)
    mean = lik.mean(params)
    assert mean.shape == (3, 3, 4, 4) and bool((mean.abs() <= 1).all())
    mean.sum().backward()
    assert params.grad is not None and params.grad.abs().sum() > 0
    g = torch.Generator().manual_seed(0)
    s = lik.sample(params.detach(), generator=g)
    assert s.shape == (3, 3, 4, 4)
    assert torch.allclose(s, quantize(s))  # on the 256 levels
    # Sample mean approaches the mean image for mid-range means with small scales.
    p = torch.zeros(1, 10, 1, 1)
    p[:, 1:4] = torch.tensor([0.2, -0.3, 0.1]).view(1, 3, 1, 1)
    p[:, 4:7] = -3.0
    draws = torch.stack([lik_.sample(p, generator=g) for lik_ in [DiscretizedLogisticMixture(1)] * 2000])
    assert torch.allclose(draws.mean(0), DiscretizedLogisticMixture(1).mean(p), atol=0.01)


def test_channel_coupling_uses_red_for_green():
    lik = DiscretizedLogisticMixture(1)
    params = torch.zeros(1, 10, 1, 1)
    params[:, 4:7] = -5.0                 # sharp
    params[:, 7] = 10.0                   # tanh -> c_0 ~ 1: green mean = mu_g + x_red
    x_good = torch.tensor([0.5, 0.5, 0.0]).view(1, 3, 1, 1)
    x_bad = torch.tensor([0.5, 0.0, 0.0]).view(1, 3, 1, 1)
    assert float(lik.log_prob(params, quantize(x_good))) > float(lik.log_prob(params, quantize(x_bad))) + 5


def test_gaussian_scale_is_learned_and_registry_errors():
    lik = build_likelihood("gaussian")
    x = quantize(torch.rand(2, 3, 4, 4) * 2 - 1)
    (-lik.log_prob(torch.zeros(2, 3, 4, 4), x).sum()).backward()
    assert lik.log_scale.grad is not None and lik.log_scale.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown likelihood"):
        build_likelihood("laplace")
    with pytest.raises(ValueError, match="parameter channels"):
        DiscretizedLogisticMixture(2).log_prob(torch.zeros(1, 7, 2, 2), torch.zeros(1, 3, 2, 2))


def test_gaussian_gradients_are_finite_at_the_edge_bins():
    """Means beyond the edges with sharp and wide scales: finite log-probabilities and gradients for the
    lowest and highest levels (the edge terms reuse the interior's two log_ndtr evaluations)."""
    lik = DiscretizedGaussian()
    x = torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0]).view(1, 1, 1, 5).repeat(1, 3, 1, 1)
    for scale in (1e-3, 0.01, 0.3, 3.0):
        with torch.no_grad():
            lik.log_scale.fill_(math.log(scale))
        means = torch.tensor([-1.07, 1.07, 0.9, -0.9, 0.5]).view(1, 1, 1, 5).repeat(1, 3, 1, 1).requires_grad_()
        lp = lik.channel_log_probs(means, x)
        lp.sum().backward()
        assert bool(torch.isfinite(lp).all()) and bool(torch.isfinite(means.grad).all()), scale
        if scale <= 0.01:   # a sharp mean beyond the lowest level puts nearly all its mass in the lowest bin
            assert float(lp[0, 0, 0, 0]) > -1e-3


def _reference_gaussian_log_mass(means: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log of the Gaussian mass of each level's bin in float64: log(Phi(u) - Phi(l)) by log_ndtr and a
    log-difference (edge bins to +-inf), for the fast path of DiscretizedGaussian to be checked against."""
    m, v, s = means.double(), x.double(), scale.double().view(1, -1, 1, 1)
    u, l = (v - m + 1 / 255) / s, (v - m - 1 / 255) / s
    upper = torch.where(v > 0.999, torch.full_like(u, math.inf), u)
    lower = torch.where(v < -0.999, torch.full_like(l, -math.inf), l)
    # Phi(upper) - Phi(lower) = Phi(-lower) - Phi(-upper): take the side where both are small (tails).
    flip = (upper + lower) > 0
    a, b = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return log_a + torch.log1p(-torch.exp(log_b - log_a))


@pytest.mark.parametrize("scale", [1e-3, 0.02, 0.06, 0.3, 3.0])
def test_gaussian_cpu_fast_path_matches_the_exact_mass(scale):
    """On the CPU the bin masses come from erfc, with log_ndtr only on the bins more than six scales off the
    mean: values and gradients equal a float64 log_ndtr reference over all levels, residuals from 0 to 40
    scales (the tail path) and both edge bins."""
    g = torch.Generator().manual_seed(0)
    x = quantize(torch.rand(4, 3, 16, 32, generator=g) * 2 - 1)
    x[:, :, 0] = -1.0
    x[:, :, 1] = 1.0                                                    # rows of edge bins
    offsets = scale * torch.linspace(-40, 40, 32).view(1, 1, 1, 32)      # residuals from 0 to 40 scales
    means = (x + offsets).clamp(-1.3, 1.3).requires_grad_()
    lik = DiscretizedGaussian()
    with torch.no_grad():
        lik.log_scale.fill_(math.log(scale))
    lp = lik.channel_log_probs(means, x)
    ref = _reference_gaussian_log_mass(means.detach(), x, lik.log_scale.exp().detach().expand(3))
    assert bool(torch.isfinite(lp).all())
    assert torch.allclose(lp.double(), ref, rtol=1e-4, atol=2e-5), float((lp.double() - ref).abs().max())
    (grad,) = torch.autograd.grad(lp.sum(), means)
    means64 = means.detach().double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(
        _reference_gaussian_log_mass(means64, x, lik.log_scale.exp().detach().expand(3)).sum(), means64)
    assert torch.allclose(grad.double(), grad_ref, rtol=1e-3, atol=1e-3 / scale), float((grad - grad_ref).abs().max())


def test_gaussian_cpu_backward_matches_numerical_gradients():
    """The hand-written backward of the CPU path (gradients for the means and the log-scale, the edge bins and
    the log_ndtr tail included) against finite differences of its own forward, in float64."""
    from VRNN.likelihoods import _GaussianBinLogMass
    g = torch.Generator().manual_seed(3)
    x = quantize(torch.rand(2, 3, 2, 8, generator=g, dtype=torch.float64) * 2 - 1)
    x[0, :, 0, :2] = -1.0
    x[1, :, 1, :2] = 1.0
    log_s = torch.tensor([math.log(0.02), math.log(0.1), math.log(0.5)], dtype=torch.float64).view(1, 3, 1, 1)
    offsets = torch.linspace(-9, 9, 8, dtype=torch.float64).view(1, 1, 1, 8) * log_s.exp()   # to 9 scales off
    means = (x + offsets).requires_grad_()
    assert torch.autograd.gradcheck(_GaussianBinLogMass.apply, (means, x, log_s.requires_grad_()), atol=1e-5)


def test_gaussian_log_scale_gradient_matches_the_exact_path():
    """d log p / d log_scale of the CPU path equals autograd through the log_ndtr path (exact=True)."""
    g = torch.Generator().manual_seed(4)
    x = quantize(torch.rand(3, 3, 8, 8, generator=g) * 2 - 1)
    means = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1.1, 1.1)
    lik = DiscretizedGaussian()
    grads = []
    for exact in (False, True):
        lik.zero_grad()
        lik.channel_log_probs(means, x, exact=exact).sum().backward()
        grads.append(lik.log_scale.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-2), grads


def test_gaussian_cpu_path_is_the_same_for_channels_last_inputs():
    """The CPU path writes its edge and tail corrections into flat storage: means and frames in channels-last
    memory give the same values and gradients as contiguous ones (edge bins and far residuals included)."""
    g = torch.Generator().manual_seed(5)
    x = quantize(torch.rand(2, 3, 8, 8, generator=g) * 2 - 1)
    x[:, :, 0] = -1.0
    x[:, :, 1] = 1.0
    means = x + 0.02 * torch.linspace(-20, 20, 8).view(1, 1, 1, 8)
    lik = DiscretizedGaussian()
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        m = means.contiguous(memory_format=fmt).requires_grad_()
        lp = lik.channel_log_probs(m, x.contiguous(memory_format=fmt))
        (grad,) = torch.autograd.grad(lp.sum(), m)
        results.append((lp.detach().contiguous(), grad.contiguous()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
