"""Pixel likelihoods p(x_t | decoder output), both discretised to the 256 levels of 8-bit images.

Data live in [-1, 1]; level l in {0..255} is the value -1 + 2 l / 255, so a bin has width 2/255 and the
edge bins extend to -inf and +inf. Both likelihoods therefore give a proper probability mass function
over the 256^3 values of a pixel and their bits/dim are directly comparable.

- ``"mdl"``: a discretised mixture of logistics with PixelCNN++ channel coupling (Salimans et al. 2017):
  per pixel M components, each with means, log-scales and coupling coefficients c, where the green mean
  is shifted by c_0 x_red and the blue mean by c_1 x_red + c_2 x_green.
- ``"gaussian"``: a Gaussian per channel with the decoder's mean and a learned per-channel scale,
  integrated over the same bins.

Shapes: params [N, P, H, W] (P = ``num_params``), images [N, 3, H, W] in [-1, 1]; log-likelihoods are in
nats, summed over pixels and channels ([N]) or per pixel ([N, H, W]).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LIKELIHOODS",
    "DiscretizedGaussian",
    "DiscretizedLogisticMixture",
    "build_likelihood",
    "quantize",
]

_HALF_BIN = 1.0 / 255.0          # half the bin width 2/255
_LOG_BIN = math.log(2.0 / 255.0)  # log bin width, for the density fallback
_EDGE = 0.999                     # x below -_EDGE is the lowest level, above +_EDGE the highest
_SQRT_HALF = math.sqrt(0.5)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_TAIL = 6.0                       # DiscretizedGaussian: bins whose near side lies beyond 6 scales take log_ndtr
_TAIL_LOG_MASS = math.log(0.5 * math.erfc(_TAIL * math.sqrt(0.5)))  # log Phi(-_TAIL): below it, a bin's erfc mass is inexact


def quantize(x: Tensor) -> Tensor:
    """Round values in [-1, 1] to the nearest of the 256 levels (no gradient)."""
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def _log1mexp(x: Tensor) -> Tensor:
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _exact_log_mass(hi: Tensor, lo: Tensor, hi_only: Tensor, lo_only: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) of a Gaussian bin in standard units (hi >= lo, hi + lo <= 0: the bin reflected
    to the lower tail), or log Phi(hi) where ``hi_only``, log(1 - Phi(lo)) where ``lo_only`` (edge bins);
    any shape, all four alike. Accurate in the far tails (two log_ndtr passes)."""
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    interior = log_hi + _log1mexp(log_lo - log_hi)
    return torch.where(hi_only, log_hi, torch.where(lo_only, _log1mexp(log_lo), interior))


def _reflected_bins(upper: Tensor, lower: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A Gaussian bin [lower, upper] in standard units (any shape, x the levels [-1, 1] of the same shape)
    reflected to the lower tail: (hi, lo, hi_only, lo_only), hi >= lo and hi + lo <= 0, where log p is
    log(Phi(hi) - Phi(lo)), or log Phi(hi) where ``hi_only`` and log(1 - Phi(lo)) where ``lo_only`` (edge
    bins: the lowest level needs Phi(upper), which is Phi(hi) unflipped and 1 - Phi(lo) flipped; the highest
    needs Phi(-lower), Phi(hi) flipped and 1 - Phi(lo) unflipped)."""
    flip = (lower + upper) > 0
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    low_edge, high_edge = x < -_EDGE, x > _EDGE
    hi_only = (low_edge & ~flip) | (high_edge & flip)
    lo_only = (low_edge | high_edge) & ~hi_only
    return hi, lo, hi_only, lo_only


class _GaussianBinLogMass(torch.autograd.Function):
    """log p(x) of DiscretizedGaussian on the CPU, with a hand-written backward.

    Forward: the bin masses from erfc (ten times cheaper than log_ndtr on the CPU, and exact to float
    precision while Phi(hi) is not tiny: after the reflection hi is the bin's far side from the tail); only
    the rare bins whose mass is below Phi(-_TAIL) (every bin with hi < -_TAIL, more than 6 scales off the
    mean) take log_ndtr, on those elements alone; edge bins are fixed by index. About 20 elementwise passes
    over [N, 3, H, W], most in place (the version before took about 35; benchmarks/cpu_kernels.py).
    Backward: d log P / d mu = -(phi(u) - phi(l)) / (s P) and d log P / d log s = -(u phi(u) - l phi(l)) / P,
    with phi(v) / P = exp(log phi(v) - log P) (stable in the tails, where log P is exact); phi(u) = 0 at the
    highest level (u = +inf) and phi(l) = 0 at the lowest. Autograd through the forward's dozen elementwise
    passes over [N, 3, H, W] had cost as much again as the forward (benchmarks/cpu_kernels.py).
    Inputs: params and x [N, 3, H, W], log_s [1, 3, 1, 1]; output [N, 3, H, W] nats."""

    @staticmethod
    def forward(ctx, params: Tensor, x: Tensor, log_s: Tensor) -> Tensor:
        inv_s = torch.exp(-log_s)                                          # [1, 3, 1, 1]
        d = (x - params).contiguous()        # the in-place writes below index the flat storage
        upper = torch.addcmul(_HALF_BIN * inv_s, d, inv_s)                 # (x - mu + h) / s
        lower = torch.addcmul(-_HALF_BIN * inv_s, d, inv_s)                # (x - mu - h) / s
        # The bin reflected to the lower tail: hi = min(upper, -lower), lo = hi - 2h / s (the same bin as
        # _reflected_bins). e_* = erfc(-v / sqrt 2) = 2 Phi(v), computed in place.
        e_lo = torch.minimum(upper, lower.neg()).mul_(-_SQRT_HALF)
        e_hi = torch.erfc(e_lo)
        e_lo.add_((2.0 * _HALF_BIN * _SQRT_HALF) * inv_s).erfc_()
        # Edge bins (the lowest and highest levels) reach to -inf or +inf: Phi = 1 at the infinite hi
        # (``lo_only``), Phi = 0 at the infinite lo (``hi_only``). Rare in frames, so fixed by index.
        bottom = (x < -_EDGE).flatten().nonzero().squeeze(1)
        top = (x > _EDGE).flatten().nonzero().squeeze(1)
        for edge, is_top in ((bottom, False), (top, True)):
            if edge.numel():
                flip = (upper.flatten()[edge] + lower.flatten()[edge]) > 0
                lo_only = flip != is_top        # bottom & flipped, or top & not flipped
                e_hi.view(-1)[edge[lo_only]] = 2.0
                e_lo.view(-1)[edge[~lo_only]] = 0.0
        out = e_hi.sub_(e_lo).mul_(0.5).clamp_min_(1e-30).log_()
        # Bins whose near side lies more than _TAIL scales off the mean: log_ndtr on those alone (e_hi was
        # 2 Phi(hi) < 2 Phi(-_TAIL) there; lo_only bins were set to 2 and never qualify).
        index = (out < _TAIL_LOG_MASS).flatten().nonzero().squeeze(1)
        if index.numel():
            bins = _reflected_bins(upper.flatten()[index], lower.flatten()[index], x.flatten()[index])
            out.view(-1)[index] = _exact_log_mass(*bins)
        ctx.save_for_backward(upper, lower, out, inv_s, bottom, top)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        upper, lower, out, inv_s, bottom, top = ctx.saved_tensors
        # phi(v) / P = exp(-v^2 / 2 - log sqrt(2 pi) - log P) for both ends of the bin; 0 for the infinite
        # end of an edge bin (upper at the highest level, lower at the lowest).
        shift = out + _LOG_SQRT_2PI
        ratio_u = torch.addcmul(shift, upper, upper, value=0.5).neg_().exp_()
        ratio_l = torch.addcmul(shift, lower, lower, value=0.5).neg_().exp_()
        del shift
        ratio_u.view(-1)[top] = 0.0
        ratio_l.view(-1)[bottom] = 0.0
        grad_mu = (ratio_l - ratio_u).mul_(grad).mul_(inv_s)
        grad_log_s = None
        if ctx.needs_input_grad[2]:
            grad_log_s = ratio_l.mul_(lower).addcmul_(upper, ratio_u, value=-1.0).mul_(grad).sum((0, 2, 3), keepdim=True)
        grad_x = -grad_mu if ctx.needs_input_grad[1] else None
        return (grad_mu if ctx.needs_input_grad[0] else None), grad_x, grad_log_s


class DiscretizedLogisticMixture(nn.Module):
    """PixelCNN++ discretised logistic mixture over RGB with M components; no parameters of its own."""

    def __init__(self, num_mixtures: int = 10) -> None:
        super().__init__()
        if num_mixtures < 1:
            raise ValueError(f"num_mixtures={num_mixtures} is invalid: expected a positive integer")
        self.num_mixtures = num_mixtures

    @property
    def num_params(self) -> int:
        return 10 * self.num_mixtures  # logits M + (means, log-scales, coefficients) 3 x 3M

    def initial_bias(self) -> Tensor:
        """Bias for the decoder's output layer [P]: log-scales start at -2 (s ~ 0.14 on [-1, 1]) instead
        of 0 (s = 1, a density flatter than uniform over the 256 levels), the rest at 0."""
        m = self.num_mixtures
        bias = torch.zeros(self.num_params)
        bias[m + 3 * m: m + 6 * m] = -2.0
        return bias

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, p, h, w = params.shape
        m = self.num_mixtures
        if p != self.num_params:
            raise ValueError(f"expected {self.num_params} parameter channels for {m} mixtures, got {p}")
        logits = params[:, :m]                                        # [N, M, H, W]
        rest = params[:, m:].reshape(n, 3, 3, m, h, w)                # [N, (mean, log_s, coeff), C, M, H, W]
        means, log_scales = rest[:, 0], rest[:, 1].clamp(min=-7.0)    # [N, 3, M, H, W]
        coeffs = torch.tanh(rest[:, 2])
        return logits, means, log_scales, coeffs

    @staticmethod
    def _coupled_means(means: Tensor, coeffs: Tensor, x: Tensor) -> Tensor:
        """Channel-coupled means given conditioning values x [N, 3, 1, H, W] (or per-component)."""
        r = means[:, 0]
        g = means[:, 1] + coeffs[:, 0] * x[:, 0]
        b = means[:, 2] + coeffs[:, 1] * x[:, 0] + coeffs[:, 2] * x[:, 1]
        return torch.stack([r, g, b], dim=1)

    def channel_log_probs(self, params: Tensor, x: Tensor) -> Tensor:
        """Per component and channel, the conditional log p_m(x_c | x_<c) of each channel's bin:
        params [N, 10M, H, W], x [N, 3, H, W] in [-1, 1] -> [N, 3, M, H, W] nats."""
        _, means, log_scales, coeffs = self._split(params)
        xe = x.unsqueeze(2)                                           # [N, 3, 1, H, W]
        centered = xe - self._coupled_means(means, coeffs, xe)
        inv_s = torch.exp(-log_scales)
        plus_in = inv_s * (centered + _HALF_BIN)
        min_in = inv_s * (centered - _HALF_BIN)
        log_cdf_plus = plus_in - F.softplus(plus_in)                 # log sigmoid, lowest bin
        log_one_minus_cdf_min = -F.softplus(min_in)                  # log(1 - sigmoid), highest bin
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        mid_in = inv_s * centered
        log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in) + _LOG_BIN
        # Interior bins: log of the CDF difference, or the density x width when the difference underflows.
        interior = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
        return torch.where(xe < -_EDGE, log_cdf_plus, torch.where(xe > _EDGE, log_one_minus_cdf_min, interior))

    def log_prob_pixels(self, params: Tensor, x: Tensor) -> Tensor:
        """log p(x) per pixel: params [N, 10M, H, W], x [N, 3, H, W] in [-1, 1] -> [N, H, W] nats.
        log sum_m pi_m prod_c p_m(x_c | x_<c)."""
        log_probs = self.channel_log_probs(params, x).sum(1) + F.log_softmax(params[:, :self.num_mixtures], dim=1)
        return torch.logsumexp(log_probs, dim=1)

    def log_prob(self, params: Tensor, x: Tensor, detach_scale: bool = False) -> Tensor:
        """log p(x) per image: [N] nats. ``detach_scale`` has no effect: the mixture has no parameters of its
        own (its scales are decoder outputs)."""
        return self.log_prob_pixels(params, x).sum((-2, -1))

    def mean(self, params: Tensor) -> Tensor:
        """Differentiable mean image [N, 3, H, W] in [-1, 1]: each component's coupled logistic mean
        (the green/blue shifts use that component's own red/green means), mixed by the weights, clipped."""
        logits, means, _, coeffs = self._split(params)
        comp = self._coupled_means(means, coeffs, means)              # [N, 3, M, H, W]
        weights = F.softmax(logits, dim=1).unsqueeze(1)
        return (comp * weights).sum(2).clamp(-1.0, 1.0)

    @torch.no_grad()
    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A sample [N, 3, H, W] on the 256 levels."""
        logits, means, log_scales, coeffs = self._split(params)
        u = torch.rand(logits.shape, generator=generator, dtype=params.dtype, device=params.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-10)))
        onehot = F.one_hot((logits + gumbel).argmax(1), self.num_mixtures).permute(0, 3, 1, 2).to(params.dtype)
        pick = lambda t: (t * onehot.unsqueeze(1)).sum(2)
        mu, log_s, c = pick(means), pick(log_scales), pick(coeffs)
        u = torch.rand(mu.shape, generator=generator, dtype=params.dtype, device=params.device)
        u = u.clamp(1e-5, 1.0 - 1e-5)
        noise = torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))
        r = (mu[:, 0] + noise[:, 0]).clamp(-1, 1)
        g = (mu[:, 1] + c[:, 0] * r + noise[:, 1]).clamp(-1, 1)
        b = (mu[:, 2] + c[:, 1] * r + c[:, 2] * g + noise[:, 2]).clamp(-1, 1)
        return quantize(torch.stack([r, g, b], dim=1))


class DiscretizedGaussian(nn.Module):
    """Gaussian per channel with the decoder's mean and a learned per-channel log-scale, integrated
    over the 256 bins (edge bins to +-inf)."""

    def __init__(self, init_scale: float = 0.3, channels: int = 3) -> None:
        # 0.3 on [-1, 1]: wide enough that an untrained decoder costs ~9 bits/dim, not tens (tails).
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((channels,), math.log(init_scale)))

    @property
    def num_params(self) -> int:
        return self.log_scale.numel()

    def initial_bias(self) -> Tensor:
        """Bias for the decoder's output layer [P]: means start at 0."""
        return torch.zeros(self.num_params)

    def _check(self, params: Tensor) -> None:
        if params.shape[1] != self.num_params:
            raise ValueError(f"expected {self.num_params} parameter channels (the means), got {params.shape[1]}")

    def channel_log_probs(self, params: Tensor, x: Tensor, exact: bool = False,
                          detach_scale: bool = False) -> Tensor:
        """log p(x_c) of each channel's bin: params [N, 3, H, W] (means), x [N, 3, H, W] -> [N, 3, H, W].

        ``exact``: log_ndtr on every element (what runs off the CPU) instead of the CPU's erfc path; the
        two agree to float32 precision (tests/test_likelihoods.py). ``detach_scale``: the learned scale is
        read without a gradient (the loss trains the means only)."""
        self._check(params)
        log_s = self.log_scale.clamp(min=-7.0).view(1, -1, 1, 1)
        if detach_scale:
            log_s = log_s.detach()
        if not exact and x.device.type == "cpu":
            return _GaussianBinLogMass.apply(params, x, log_s)
        inv_s = torch.exp(-log_s)
        upper = inv_s * (x - params + _HALF_BIN)
        lower = inv_s * (x - params - _HALF_BIN)
        return _exact_log_mass(*_reflected_bins(upper, lower, x))

    def log_prob_pixels(self, params: Tensor, x: Tensor, detach_scale: bool = False) -> Tensor:
        """params [N, 3, H, W] (means), x [N, 3, H, W] in [-1, 1] -> [N, H, W] nats (channels independent)."""
        return self.channel_log_probs(params, x, detach_scale=detach_scale).sum(1)

    def log_prob(self, params: Tensor, x: Tensor, detach_scale: bool = False) -> Tensor:
        """params [N, 3, H, W] (means), x [N, 3, H, W] in [-1, 1] -> [N] nats per frame; ``detach_scale``
        as in ``channel_log_probs``."""
        return self.log_prob_pixels(params, x, detach_scale).sum((-2, -1))

    def mean(self, params: Tensor) -> Tensor:
        """The mean image [N, 3, H, W], clipped to [-1, 1] (differentiable inside)."""
        self._check(params)
        return params.clamp(-1.0, 1.0)

    @torch.no_grad()
    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._check(params)
        eps = torch.randn(params.shape, generator=generator, dtype=params.dtype, device=params.device)
        return quantize(params + torch.exp(self.log_scale).view(1, -1, 1, 1) * eps)


# name -> factory(num_mixtures); the Gaussian has a single component and ignores the count.
LIKELIHOODS: dict[str, Callable[[int], nn.Module]] = {
    "mdl": lambda num_mixtures: DiscretizedLogisticMixture(num_mixtures),
    "gaussian": lambda num_mixtures: DiscretizedGaussian(),
}


def build_likelihood(name: str, num_mixtures: int = 10) -> nn.Module:
    """The likelihood registered under ``name`` ("mdl" or "gaussian")."""
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[name](num_mixtures)
