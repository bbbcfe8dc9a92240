"""Per-frame VQ tokenizer: conv encoder (x`downsample`), EMA vector quantiser, conv decoder (MODEL.md §2.1).

A 64x64 frame becomes a 16x16 grid of codebook indices. The quantiser is the EMA variant of VQ-VAE
(van den Oord et al. 2017, appendix; Razavi et al. 2019): the codebook is not trained by gradients but
by exponential moving averages of the encoder vectors assigned to each code, the encoder is pulled
towards its codes by the commitment loss, and gradients pass the quantisation by the straight-through
estimator. The first training update initialises the codebook from batch vectors by farthest-point sampling
(data-dependent initialisation, like k-means++ seeding). Codes whose EMA usage (vectors per batch) falls below
`dead_code_threshold` are restarted from batch vectors (Dhariwal et al. 2020, Jukebox), here the batch
vectors with the largest quantisation error, which is deterministic and puts new codes where the codebook
fits the data worst. The default threshold 0.1 with decay 0.99 restarts a code after ~230 updates without
use; Jukebox's 1.0 restarts after a single unused batch, which in our runs churned the rare codes and with
them the next-token targets.

The codebook changes ONLY when the quantiser is called with ``update=True``, which the model does only in
its loss passes (`CausalPerceiverIO.forward` / `compute_loss`) when the module is in training mode and
autograd is enabled. Evaluation (`.eval()`), diagnostics under `torch.no_grad()` and the feature paths
(`extract_context`, `predict_next_frames`, `generate`) never move it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perceiver_io.config import PerceiverIOConfig

__all__ = ["RECON_LOSS_FNS", "ConvDecoder", "ConvEncoder", "EMAVectorQuantizer", "FeatureEncoder", "VQTokenizer"]

# Batch vectors considered by the farthest-point codebook initialisation (bounds its cost at K x 4096).
_INIT_SAMPLE = 4096

# recon_loss name -> elementwise-mean loss on pixels in [-1, 1].
RECON_LOSS_FNS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "l1": F.l1_loss,
    "mse": F.mse_loss,
}


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides ``channels``."""
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, 3x3 conv, twice): [N,Ch,h,w] -> [N,Ch,h,w]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            _group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvEncoder(nn.Module):
    """Frames [N,3,H,W] in [-1,1] -> pre-quantisation vectors [N,D,H/s,W/s], s = `config.downsample`.

    Width starts at `tokenizer_channels` and doubles at each of the log2(s) stride-2 convolutions.
    """

    def __init__(self, config: PerceiverIOConfig) -> None:
        super().__init__()
        stages = int(math.log2(config.downsample))
        ch = config.tokenizer_channels
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, ch, 3, padding=1)]
        for i in range(stages):
            c_in, c_out = ch * 2**i, ch * 2 ** (i + 1)
            layers += [_group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
        top = ch * 2**stages
        layers += [ResBlock(top) for _ in range(config.num_res_blocks)]
        layers += [_group_norm(top), nn.SiLU(), nn.Conv2d(top, config.code_dim, 1)]
        self.net = nn.Sequential(*layers)
        self.out_channels = top

    def forward(self, frames: Tensor) -> Tensor:
        return self.net(frames)


class FeatureEncoder(nn.Module):
    """Feature maps [N,F,h,w] at token resolution (F = `config.feature_channels`) -> pre-quantisation
    vectors [N,D,h,w]: a 1x1 convolution to the tokenizer's top width, `config.feature_res_blocks`
    residual blocks, GroupNorm, SiLU and a 1x1 convolution to `code_dim`. The tokenizer encoder used
    when the caller already has a spatial feature map of the frame (no convolution at full resolution).
    """

    def __init__(self, config: PerceiverIOConfig) -> None:
        super().__init__()
        top = config.tokenizer_channels * config.downsample
        layers: list[nn.Module] = [nn.Conv2d(config.feature_channels, top, 1)]
        layers += [ResBlock(top) for _ in range(config.feature_res_blocks)]
        layers += [_group_norm(top), nn.SiLU(), nn.Conv2d(top, config.code_dim, 1)]
        self.net = nn.Sequential(*layers)
        self.out_channels = top

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class ConvDecoder(nn.Module):
    """Code vectors [N,D,h,w] -> frames [N,3,h*s,w*s] (unbounded; ~[-1,1] after training).

    Nearest-neighbour upsampling followed by a 3x3 conv at each stage (no transposed convolutions, which
    leave checkerboard artefacts; Odena et al. 2016).
    """

    def __init__(self, config: PerceiverIOConfig) -> None:
        super().__init__()
        stages = int(math.log2(config.downsample))
        ch = config.tokenizer_channels
        top = ch * 2**stages
        layers: list[nn.Module] = [nn.Conv2d(config.code_dim, top, 3, padding=1)]
        layers += [ResBlock(top) for _ in range(config.num_res_blocks)]
        for i in reversed(range(stages)):
            c_in, c_out = ch * 2 ** (i + 1), ch * 2**i
            layers += [_group_norm(c_in), nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(c_in, c_out, 3, padding=1)]
        layers += [_group_norm(ch), nn.SiLU(), nn.Conv2d(ch, config.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, codes: Tensor) -> Tensor:
        return self.net(codes)


class EMAVectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantisation with an EMA-updated codebook of K x D.

    Buffers: ``embedding`` [K,D] (the codebook), ``cluster_size`` [K] and ``embed_sum`` [K,D] (the EMA
    statistics: vectors per batch assigned to each code and their sum). They are buffers, not parameters:
    no optimiser touches them. ``reduce_hook`` (optional) maps the per-batch statistics (counts [K],
    sums [K,D]) before the EMA update, e.g. an all-reduce-mean under data parallelism.
    """

    def __init__(self, num_codes: int, code_dim: int, decay: float = 0.99, epsilon: float = 1e-5,
                 commitment_weight: float = 0.25, dead_code_threshold: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.num_codes, self.code_dim = num_codes, code_dim
        self.decay, self.epsilon = decay, epsilon
        self.commitment_weight = commitment_weight
        self.dead_code_threshold = dead_code_threshold
        self.reduce_hook: Callable[[Tensor], Tensor] | None = None
        embedding = torch.randn(num_codes, code_dim)
        self.register_buffer("embedding", embedding)
        # Usage starts at 1 per code, so the EMA statistics are consistent with the initial codebook and
        # a code unused in the first training batch is restarted from the data straight away.
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", embedding.clone())
        # False until the first update, which replaces the random codebook by batch vectors (a data-
        # dependent initialisation, as k-means seeding would do, so that codes start where the data is).
        self.register_buffer("initialized", torch.tensor(False))
        self.seed = seed

    def forward(self, z: Tensor, update: bool = False) -> dict[str, Tensor]:
        """Quantise ``z`` [N,D,h,w].

        Returns dict(``quantized`` [N,D,h,w], straight-through: its value is the codebook vectors, its
        gradient flows to ``z``; ``indices`` [N,h,w] int64; ``commitment`` scalar, already multiplied by
        ``commitment_weight``; ``perplexity`` scalar, exp(entropy) of this batch's code usage, no grad).
        When ``update`` is True the EMA statistics and codebook are updated from this batch (after the
        assignment, so the returned codes are those of the codebook before the update).
        """
        if z.dim() != 4 or z.shape[1] != self.code_dim:
            raise ValueError(f"expected z of shape [N,{self.code_dim},h,w], got {tuple(z.shape)}")
        n, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()                     # [M,D], M = N*h*w
        codebook = self.embedding.float()                                       # [K,D]
        # Squared distances |z|^2 - 2 z.e + |e|^2, in fp32 whatever the autocast dtype.
        with torch.autocast(device_type=z.device.type, enabled=False):
            dist = (flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ codebook.t()
                    + codebook.pow(2).sum(1)[None, :])                          # [M,K]
        min_dist, indices = dist.min(dim=1)                                     # [M], [M]
        quantized_flat = F.embedding(indices, codebook)                          # [M,D]
        counts = torch.bincount(indices, minlength=self.num_codes).float()       # [K]
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
        if update:
            self._ema_update(flat.detach(), indices, counts, min_dist.detach())
        quantized = quantized_flat.view(n, h, w, d).permute(0, 3, 1, 2).to(z.dtype)  # [N,D,h,w]
        commitment = self.commitment_weight * F.mse_loss(z, quantized.detach())
        quantized = z + (quantized - z).detach()                                # straight-through
        return {"quantized": quantized, "indices": indices.view(n, h, w), "commitment": commitment,
                "perplexity": perplexity.detach()}

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors of ``indices`` [N,h,w] (int64) as [N,D,h,w]."""
        if indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 3:
            raise ValueError(f"expected integer indices of shape [N,h,w], got {indices.dtype} {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(f"code indices must lie in [0, {self.num_codes}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return F.embedding(indices.long(), self.embedding).permute(0, 3, 1, 2)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, indices: Tensor, counts: Tensor, min_dist: Tensor) -> None:
        """EMA step of VQ-VAE appendix A.1 with Laplace-smoothed cluster sizes, then dead-code restarts."""
        if not bool(self.initialized):
            self._init_from_batch(flat)
            return
        sums = torch.zeros(self.num_codes, self.code_dim, device=flat.device, dtype=flat.dtype)
        sums.index_add_(0, indices, flat)                                       # [K,D]
        if self.reduce_hook is not None:
            counts, sums = self.reduce_hook(counts), self.reduce_hook(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.num_codes * self.epsilon) * total
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        if self.dead_code_threshold <= 0:
            return
        dead = torch.nonzero(self.cluster_size < self.dead_code_threshold).flatten()   # [n_dead]
        if dead.numel() == 0:
            return
        # Restart dead codes at the worst-quantised batch vectors (largest distance to their code).
        k = min(dead.numel(), flat.shape[0])
        worst = torch.topk(min_dist, k).indices                                  # [k]
        chosen = flat[worst[torch.arange(dead.numel(), device=flat.device) % k]]  # [n_dead,D]
        self.embedding[dead] = chosen.to(self.embedding.dtype)
        self.embed_sum[dead] = chosen.to(self.embed_sum.dtype)
        self.cluster_size[dead] = 1.0


    @torch.no_grad()
    def _init_from_batch(self, flat: Tensor) -> None:
        """Codebook <- K batch vectors of ``flat`` [M,D] chosen by farthest-point sampling.

        Farthest-point (k-means++-like, greedy) seeding spreads the initial codes over the data instead of
        stacking them on its mode: random picks in background-dominated video give many near-identical
        codes that the same tokens then flip between. Runs on at most `_INIT_SAMPLE` random vectors.
        """
        gen = torch.Generator().manual_seed(self.seed)
        sample = flat[torch.randperm(flat.shape[0], generator=gen)[:_INIT_SAMPLE].to(flat.device)]  # [S,D]
        chosen = torch.empty(self.num_codes, dtype=torch.long, device=flat.device)
        chosen[0] = 0
        nearest = (sample - sample[0]).pow(2).sum(1)                            # [S] distance to chosen set
        for k in range(1, self.num_codes):
            chosen[k] = torch.argmax(nearest)
            nearest = torch.minimum(nearest, (sample - sample[chosen[k]]).pow(2).sum(1))
        codes = sample[chosen].to(self.embedding.dtype)                         # [K,D]
        # Initial codes get a short grace period (usage 2x the threshold: ~70 unused updates at decay
        # 0.99), restarted ones a longer one (usage 1: ~230). The encoder moves most early on, so initial
        # codes that it leaves behind are recycled while the next-token predictor has learnt little.
        usage = 2.0 * self.dead_code_threshold if self.dead_code_threshold > 0 else 1.0
        self.embedding.copy_(codes)
        self.embed_sum.copy_(codes * usage)
        self.cluster_size.fill_(usage)
        self.initialized.fill_(True)


class VQTokenizer(nn.Module):
    """Frame tokenizer: `encode` frames to straight-through code vectors and indices, `decode` back.

    ``encode(frames [N,3,H,W], update=False)`` -> dict(quantized [N,D,h,w], indices [N,h,w],
    commitment, perplexity); with `config.feature_channels` > 0 ``encode`` takes feature maps
    [N,feature_channels,h,w] instead of frames (a `FeatureEncoder`); ``decode(codes [N,D,h,w]) -> [N,3,H,W]``;
    ``decode_indices(indices [N,h,w]) -> [N,3,H,W]``; ``recon_loss(recon, target)`` is the configured
    L1 / MSE mean over pixels in [-1,1].
    """

    def __init__(self, config: PerceiverIOConfig) -> None:
        super().__init__()
        self.encoder = FeatureEncoder(config) if config.feature_channels > 0 else ConvEncoder(config)
        self.quantizer = EMAVectorQuantizer(
            config.num_codes, config.code_dim, decay=config.ema_decay, epsilon=config.ema_epsilon,
            commitment_weight=config.commitment_weight, dead_code_threshold=config.dead_code_threshold,
            seed=config.codebook_seed,
        )
        self.decoder = ConvDecoder(config)
        self._recon_fn = RECON_LOSS_FNS[config.recon_loss]

    def encode(self, frames: Tensor, update: bool = False) -> dict[str, Tensor]:
        return self.quantizer(self.encoder(frames), update=update)

    def decode(self, codes: Tensor) -> Tensor:
        return self.decoder(codes)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.decoder(self.quantizer.lookup(indices))

    def recon_loss(self, recon: Tensor, target: Tensor) -> Tensor:
        return self._recon_fn(recon, target)
