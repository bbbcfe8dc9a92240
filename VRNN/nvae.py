"""NVAE-style convolutional encoder and decoder (Vahdat & Kautz 2020, simplified), batched over frames.

Encoder: 64x64 RGB -> 4x4 map -> flat feature f_t, no skips into the decoder (skips would let the
reconstruction bypass z). Decoder: an MLP from [z_t; h_t] to a 4x4 map, upsampling residual blocks to
64x64, and the attention *prior* map FiLM-modulating every resolution; the output is the likelihood's
parameters [N, P, 64, 64].

Residual cells follow NVAE: GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> conv3x3 -> optional
squeeze-excitation, added to the input through a learnable scalar gate initialised at 0, so every cell
starts as the identity and the network trains stably at any depth. Because the cells start as the
identity, the main path (each strided or upsampling conv) is followed by GroupNorm and swish, so that
encoder and decoder are non-linear from the first step (with an affine main path they stayed nearly
linear for the first thousand steps; docs/MODEL_CHANGES.md). GroupNorm replaces NVAE's BatchNorm
so that a frame's output does not depend on the rest of the batch (frames are batched over B*T).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

__all__ = ["NVAEDecoder", "NVAEEncoder", "ResidualCell", "SqueezeExcitation"]


def _groups(channels: int) -> int:
    """Largest of 8, 4, 2, 1 that divides ``channels``."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def _has_cell(side: int, cell_max_side: int | None) -> bool:
    """Whether a stage whose maps are ``side`` x ``side`` gets a residual cell (None: every stage)."""
    return cell_max_side is None or side <= cell_max_side


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, sn: bool = False) -> nn.Module:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)
    return _spectral_norm(conv) if sn else conv


def _conv_transposed(cin: int, cout: int, sn: bool = False) -> nn.Module:
    """4x4 transposed convolution of stride 2: [N, cin, r, r] -> [N, cout, 2r, 2r]."""
    conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
    return _spectral_norm(conv) if sn else conv


class SqueezeExcitation(nn.Module):
    """Channel gating from globally pooled features (Hu et al. 2018), reduction 4 as in NVAE."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]


class ResidualCell(nn.Module):
    """x + gate * f(x), gate a learnable scalar initialised at 0. Shape-preserving: [N, C, r, r]."""

    def __init__(self, channels: int, use_se: bool = True, spectral_norm: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(), _conv(channels, channels, sn=spectral_norm),
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(), _conv(channels, channels, sn=spectral_norm),
            SqueezeExcitation(channels) if use_se else nn.Identity(),
        )
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gate * self.body(x)


class NVAEEncoder(nn.Module):
    """x [N, 3, S, S] in [-1, 1] (S = image_size) -> (f [N, F], feature maps).

    A space-to-depth stem (2x2 blocks -> 12 channels at S/2), then widths C, 2C, 4C, 4C at resolutions
    S/2 .. S/16 (C = ``channels``); a 1x1 projection to C channels at 4x4 gives F = 16 C. ``forward`` also
    returns the maps after each stage (for Gram anchoring)."""

    def __init__(self, channels: int = 64, image_size: int = 64, use_se: bool = True,
                 spectral_norm: bool = False, cell_max_side: int | None = None) -> None:
        super().__init__()
        n_down = round(math.log2(image_size // 4))
        if 4 * 2**n_down != image_size:
            raise ValueError(f"image_size={image_size} is invalid: expected 4 * 2^k")
        widths = [channels * min(2**i, 4) for i in range(n_down)]
        # Space-to-depth stem: 2x2 pixel blocks become 12 channels at S/2, so no convolution runs at full
        # resolution (the costliest memory traffic of the step; docs/MODEL_CHANGES.md).
        self.stem = nn.Sequential(nn.PixelUnshuffle(2), _conv(12, channels, sn=spectral_norm))
        stages, cin = [], channels
        for i, cout in enumerate(widths):
            side = image_size // 2 // 2**i
            # GroupNorm + swish on the main path: with the residual gates at 0 the network must still be
            # non-linear from the first step (docs/MODEL_CHANGES.md).
            cell = [ResidualCell(cout, use_se, spectral_norm)] if _has_cell(side, cell_max_side) else []
            stages.append(nn.Sequential(_conv(cin, cout, stride=1 if i == 0 else 2, sn=spectral_norm),
                                        nn.GroupNorm(_groups(cout), cout), nn.SiLU(), *cell))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(nn.GroupNorm(_groups(cin), cin), nn.SiLU(), nn.Conv2d(cin, channels, 1))
        self.feature_dim = channels * 16
        self.map_widths = tuple(widths)              # channels of the maps ``forward`` returns, stage by stage

    @classmethod
    def from_config(cls, config) -> NVAEEncoder:
        """The encoder of an ``AIMEConfig`` (encoder_channels, image_size, use_squeeze_excitation,
        use_spectral_norm, residual_cell_max_side)."""
        return cls(config.encoder_channels, config.image_size, config.use_squeeze_excitation,
                   config.use_spectral_norm, config.residual_cell_max_side)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x [N, 3, S, S] -> f [N, 16 C], maps [[N, C_i, r_i, r_i] for each stage]."""
        h = self.stem(x)
        maps = []
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return self.head(h).flatten(1), maps


class _AttentionFiLM(nn.Module):
    """FiLM from the attention map at one resolution: h * (1 + gamma(m)) + beta(m).

    The map (a distribution over R x R) is rescaled so a uniform map reads 1, compressed by log1p, and
    resized to the block's resolution (area pooling down, bilinear up)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2 * channels, 3, padding=1)
        nn.init.normal_(self.conv.weight, std=0.05)
        nn.init.zeros_(self.conv.bias)

    def forward(self, h: Tensor, att: Tensor) -> Tensor:
        r = h.shape[-1]
        m = att if att.shape[-1] == r else (
            F.adaptive_avg_pool2d(att, r) if att.shape[-1] > r
            else F.interpolate(att, size=(r, r), mode="bilinear", align_corners=False))
        if m.device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            film = _one_channel_conv3x3(m, self.conv.weight, self.conv.bias)
        else:
            film = self.conv(m)
        gamma, beta = film.chunk(2, dim=1)
        return h * (1.0 + gamma) + beta


def _one_channel_conv3x3(m: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``F.conv2d(m, weight, bias, padding=1)`` for one input channel as an im2col matmul: m [N, 1, r, r],
    weight [C, 1, 3, 3], bias [C] -> [N, C, r, r] (channels-last strides). In float32 on the CPU, oneDNN's
    kernel for a single input channel took 4-5x as long (imagination and evaluation decode through it;
    training under bf16 autocast keeps the convolution, which is faster there)."""
    n, _, r, _ = m.shape
    cols = F.unfold(m, 3, padding=1).transpose(1, 2)                                   # [N, r*r, 9]
    out = torch.addmm(bias, cols.reshape(n * r * r, 9), weight.reshape(weight.shape[0], 9).t())
    return out.view(n, r, r, -1).permute(0, 3, 1, 2)


class NVAEDecoder(nn.Module):
    """[z; h] [N, I] and the attention prior map [N, R, R] -> likelihood parameters [N, P, S, S].

    An MLP gives a 4C x 4 x 4 map (C = ``channels``); upsampling stages (nearest x2, conv3x3, GroupNorm, swish,
    FiLM by the attention map, a residual cell) reach S/2 with widths 4C, 2C, C; a sub-pixel convolution
    (conv3x3 to 4P channels, depth-to-space) gives the P parameter maps at S = image_size."""

    def __init__(self, input_dim: int, out_channels: int, channels: int = 64, image_size: int = 64,
                 use_se: bool = True, spectral_norm: bool = False, out_bias: Tensor | None = None,
                 cell_max_side: int | None = None, upsample: str = "nearest") -> None:
        super().__init__()
        if upsample not in ("nearest", "transposed"):
            raise ValueError(f"upsample={upsample!r} is invalid: expected 'nearest' or 'transposed'")
        n_up = round(math.log2(image_size // 4))
        top = 4 * channels
        self.top = top
        self.fc = nn.Sequential(nn.Linear(input_dim, 2 * top), nn.SiLU(), nn.Linear(2 * top, top * 16))
        self.cell0 = ResidualCell(top, use_se, spectral_norm) if _has_cell(4, cell_max_side) else nn.Identity()
        # Upsampling stages to S/2; the last step to full resolution is a sub-pixel convolution (ESPCN: one
        # conv at S/2 to 4P channels, then depth-to-space), so no convolution runs at S x S: at 64x64 the
        # last stage had cost half of the decoder's FLOPs (docs/MODEL_CHANGES.md). Each stage doubles the
        # side by nearest-neighbour upsampling and a 3x3 conv at the new side (NVAE), or by a 4x4 transposed
        # conv of stride 2 (DreamerV3), which does the same job with 16/36 of the multiply-adds.
        widths = [channels * max(1, 4 // 2**i) for i in range(n_up - 1)]  # 4C, 2C, C
        ups, films, cells, cin = [], [], [], top
        for i, cout in enumerate(widths):
            side = 8 * 2**i
            grow = (_conv(cin, cout, sn=spectral_norm) if upsample == "nearest"
                    else _conv_transposed(cin, cout, spectral_norm))
            ups.append(nn.Sequential(grow, nn.GroupNorm(_groups(cout), cout), nn.SiLU()))
            films.append(_AttentionFiLM(cout))
            cells.append(ResidualCell(cout, use_se, spectral_norm) if _has_cell(side, cell_max_side) else nn.Identity())
            cin = cout
        self.upsample = upsample
        self.ups, self.films, self.cells = nn.ModuleList(ups), nn.ModuleList(films), nn.ModuleList(cells)
        self.out = nn.Sequential(nn.GroupNorm(_groups(cin), cin), nn.SiLU(),
                                 nn.Conv2d(cin, 4 * out_channels, 3, padding=1), nn.PixelShuffle(2))
        if out_bias is not None:  # the likelihood's preferred starting point (e.g. sensible log-scales)
            with torch.no_grad():
                # depth-to-space takes conv channel 4c + k to output channel c
                self.out[-2].bias.copy_(out_bias.repeat_interleave(4))
                self.out[-2].weight.mul_(0.1)

    @classmethod
    def from_config(cls, config, input_dim: int, out_channels: int, out_bias: Tensor | None = None) -> NVAEDecoder:
        """The decoder of an ``AIMEConfig`` (decoder_channels, image_size, use_squeeze_excitation,
        use_spectral_norm, residual_cell_max_side, decoder_upsample) from ``input_dim`` inputs to
        ``out_channels`` parameter maps."""
        return cls(input_dim, out_channels, config.decoder_channels, config.image_size,
                   config.use_squeeze_excitation, config.use_spectral_norm, out_bias=out_bias,
                   cell_max_side=config.residual_cell_max_side, upsample=config.decoder_upsample)

    def forward(self, x: Tensor, attention_map: Tensor) -> Tensor:
        """x [N, I], attention_map [N, R, R] (sums to 1) -> params [N, P, S, S]."""
        res = attention_map.shape[-1]
        att = torch.log1p(attention_map.unsqueeze(1) * (res * res))  # uniform map -> log 2
        h = self.cell0(self.fc(x).view(-1, self.top, 4, 4))
        # Without autograd on a CPU (imagination, evaluation), oneDNN's channels-last kernels: 0.85 of the
        # decoder's time for 16 frames, the same values to 1e-7 (training measured slower channels-last).
        channels_last = h.device.type == "cpu" and not torch.is_grad_enabled() and h.dtype == torch.float32
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        for up, film, cell in zip(self.ups, self.films, self.cells):
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest") if self.upsample == "nearest" else h)
            h = cell(film(h, att))
        out = self.out(h)
        return out.contiguous() if channels_last else out
