"""PSNR / SSIM against scikit-image, their fixed points and monotonicity; the Fréchet distance."""

import itertools
import math

import numpy as np
import pytest
import torch

from VRNN.advanced_metrics import (
    frechet_distance,
    fvd,
    gaussian_window,
    psnr,
    psnr_per_image,
    ssim,
    ssim_per_image,
)

skm = pytest.importorskip("skimage.metrics")


def _pair(seed, shape, noise, lo=-1.0, hi=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=dtype) * (hi - lo) + lo
    y = (x + noise * (hi - lo) * torch.randn(shape, generator=g, dtype=dtype)).clamp(lo, hi)
    return x, y


@pytest.mark.parametrize("data_range,lo,hi", [(2.0, -1.0, 1.0), (1.0, 0.0, 1.0), (255.0, 0.0, 255.0)])
def test_matches_scikit_image(data_range, lo, hi):
    x, y = _pair(0, (4, 3, 24, 33), 0.1, lo, hi)
    p = psnr_per_image(x, y, data_range)
    s = ssim_per_image(x, y, data_range)
    assert p.shape == (4,) and s.shape == (4,)
    for i in range(4):
        ref_p = skm.peak_signal_noise_ratio(x[i].numpy(), y[i].numpy(), data_range=data_range)
        ref_s = skm.structural_similarity(
            x[i].numpy(), y[i].numpy(), channel_axis=0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=data_range)
        assert float(p[i]) == pytest.approx(ref_p, abs=1e-9)
        assert float(s[i]) == pytest.approx(ref_s, abs=1e-9)


def test_float32_close_to_reference_and_video_shape():
    x, y = _pair(1, (2, 3, 3, 64, 64), 0.05)
    s32 = ssim_per_image(x.float(), y.float())
    p32 = psnr_per_image(x.float(), y.float())
    assert s32.shape == (2, 3) and p32.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            ref = skm.structural_similarity(
                x[b, t].numpy(), y[b, t].numpy(), channel_axis=0, gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False, data_range=2.0)
            assert float(s32[b, t]) == pytest.approx(ref, abs=1e-5)
    # The mean variants are the means of the per-image values.
    assert float(ssim(x, y)) == pytest.approx(float(ssim_per_image(x, y).mean()))
    assert float(psnr(x, y)) == pytest.approx(float(psnr_per_image(x, y).mean()))


def test_identical_images():
    x, _ = _pair(2, (3, 3, 16, 16), 0.0)
    assert torch.isinf(psnr_per_image(x, x)).all()
    assert torch.allclose(ssim_per_image(x, x), torch.ones(3, dtype=x.dtype))


def test_monotonic_in_noise():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    n = torch.randn(x.shape, generator=g)
    ps, ss = [], []
    for sigma in (0.01, 0.05, 0.1, 0.3, 0.6):
        y = x + sigma * n
        ps.append(float(psnr(y, x)))
        ss.append(float(ssim(y, x)))
    assert all(a > b for a, b in itertools.pairwise(ps))
    assert all(a > b for a, b in itertools.pairwise(ss))


def test_known_psnr_value():
    x = torch.zeros(1, 3, 8, 8)
    y = torch.full((1, 3, 8, 8), 0.2)      # MSE 0.04, range 2 -> 10 log10(4 / 0.04) = 20 dB
    assert float(psnr(x, y, 2.0)) == pytest.approx(20.0, abs=1e-5)


def test_gaussian_window():
    w = gaussian_window()
    assert w.shape == (11,) and float(w.sum()) == pytest.approx(1.0)
    assert torch.allclose(w, w.flip(0))
    with pytest.raises(ValueError, match="odd"):
        gaussian_window(10)


def test_errors_name_the_problem():
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, torch.zeros(2, 3, 16, 15))
    with pytest.raises(ValueError, match="data_range"):
        ssim(x, x, data_range=0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[N,C,H,W\]"):
        psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_frechet_distance():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Same covariance, mean shifted by (1, 2, 2): the distance is |shift|^2 = 9 up to sampling noise.
    shift = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    assert frechet_distance(a, b + shift) == pytest.approx(9.0, abs=0.3)
    # Isotropic scales s_a, s_b in d dims: d (s_a - s_b)^2.
    assert frechet_distance(a, 3.0 * b) == pytest.approx(3 * (1 - 3) ** 2, rel=0.05)
    assert math.isfinite(frechet_distance(np.pi * a[:10], b[:10]))


def test_fvd_skips_without_weights(monkeypatch):
    monkeypatch.delenv("AIME_FVD_I3D", raising=False)
    v = torch.zeros(2, 4, 3, 16, 16)
    assert fvd(v, v) is None
