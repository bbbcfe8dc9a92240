"""The attention schema (MODEL.md section 2.4): where the model looks, bottom-up and top-down.

Bottom-up (posterior, a function of x_t)
    A small convolutional feature pyramid maps each frame to an R x R grid of features, computed once for
    all B*T frames (``encode_features``; MODEL.md section 6), or, cheaper, 1x1 projections of the world
    model's own encoder maps (``encode_encoder_maps``, config ``attention_features="encoder"``). Per step,
    slot attention (Locatello et al., 2020, "Object-Centric Learning with Slot Attention", Alg. 1: softmax
    over *slots*, weighted-mean update, GRU, residual MLP) runs ``iterations`` rounds with S slots. The
    initial slots are not sampled: they come from an MLP on [h_t; c_t], so the posterior is a deterministic
    function of its inputs and the recurrent state tells the slots what to look for. The slot maps m_k are
    the last round's attention (softmax over slots, so they sum to 1 over k at every position). Fusion
    weights w = softmax_k(head([slot_k; h_t])) give A_t = sum_k w_k m_k, renormalised to a distribution over
    the R*R positions.
    The attention state s_t = MLP([mean_k slot_k; centre of mass of A_t]) feeds the LSTM.

Top-down (prior, a function of the past only)
    p(A_t | A_{t-1}, h_t, z_{t-1}): convolutions over A_{t-1} (a 1-channel R x R image, rescaled so the
    uniform map is 1 everywhere, with two coordinate channels so that the convs know where they are),
    FiLM-modulated by an embedding of [h_t; z_{t-1}] broadcast over positions, give logits over R*R.
    A motion head predicts the displacement (dx, dy) of the centre of mass from A_{t-1} to A_t.

Coordinates
    Positions are cell centres in normalised image coordinates: column i of R maps to x = (2i + 1)/R - 1,
    row j to y = (2j + 1)/R - 1 (the ``align_corners=False`` convention of ``grid_sample``), so a centre
    of mass lies in (-1, 1). ``center`` and ``motion`` are ordered (x, y) = (horizontal, vertical).

Losses (all per example, shape [B]; the caller averages and weights them once)
    ``attention_kl``   KL(Cat(A_t) || Cat(softmax(prior_logits))) in nats, zeros in A_t allowed (xlogy).
    ``diversity``      mean over slot pairs k != l of <p_k, p_l>^2 with p_k the L2-normalised slot map;
                       0 for disjoint maps, 1 for identical ones.
    ``dynamics_loss``  SmoothL1(predicted motion, detached centre_t - centre_{t-1}), mean over (x, y).
    ``slot_reconstruction_loss``  (when built with ``slot_reconstruction=True``) the objective that makes
                       the slots explain the frame, as in the slot-attention autoencoder of Locatello et
                       al.: a spatial-broadcast MLP decodes every slot into an R x R colour image and an
                       alpha logit per position; the images are blended with the softmax of the alphas over
                       slots and compared (mean squared error, [-1, 1] scale) with the frame average-pooled
                       to R x R. The target is pixels, not learned features, so it cannot collapse.

Notes for callers
    * Because the slot maps partition unity, A_t is exactly uniform when the fusion weights are; it sharpens
      as the fusion head learns to prefer slots (a few dozen steps on toy scenes, see the tests).
    * Every computation is row-wise (GroupNorm / LayerNorm only), so ``prior_step`` may be called once over
      B*T rows after the recurrent loop when A_{t-1} is the posterior map (teacher forcing); only
      imagination needs it inside the loop.
    * ``upsample_map`` gives the decoder a density (uniform map -> 1) by default; see its docstring.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentionSchema", "EncoderMapFeatures", "SlotAttention", "center_of_mass", "coordinate_grid",
           "upsample_map"]


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


def coordinate_grid(resolution: int, device=None, dtype=None) -> Tensor:
    """Cell-centre coordinates of an R x R grid in [-1, 1]: [R*R, 2] as (x, y), row-major positions."""
    centres = _cell_centres(resolution, device, dtype if dtype is not None else torch.float32)
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def center_of_mass(attention_map: Tensor) -> Tensor:
    """Centre of mass of non-negative maps [B, R, R] -> [B, 2] as (x, y) in normalised coordinates.

    The map is renormalised by its total mass first, so any non-negative map with positive mass works.
    """
    if attention_map.dim() != 3 or attention_map.shape[-1] != attention_map.shape[-2]:
        raise ValueError(f"center_of_mass expects a map [B, R, R], got shape {tuple(attention_map.shape)}")
    b, r, _ = attention_map.shape
    mass = attention_map.sum((-2, -1)).clamp_min(1e-12).unsqueeze(-1)                 # [B, 1]
    # The marginals over rows and columns against the cell centres: the grid of coordinate_grid, without
    # building an [R*R, 2] grid on every call (once per imagined step).
    marginals = torch.stack([attention_map.sum(-2), attention_map.sum(-1)], dim=1)      # [B, 2, R]: x, y
    return (marginals @ _cell_centres(r, attention_map.device, attention_map.dtype)) / mass


@functools.lru_cache(maxsize=16)
def _cell_centres(resolution: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The cell-centre coordinates of one axis of an R x R grid in [-1, 1]: [R] (read-only, cached)."""
    return (2.0 * torch.arange(resolution, device=device, dtype=dtype) + 1.0) / resolution - 1.0


_UPSAMPLE_MODES = ("density", "distribution")


def upsample_map(attention_map: Tensor, size: int, mode: str = "density") -> Tensor:
    """Bilinearly upsample attention maps [B, R, R] to [B, 1, size, size] for decoder conditioning.

    ``mode="density"`` (default): the map relative to the uniform one, i.e. R*R*A upsampled, so a uniform
    map is 1 everywhere and the result is a spatial modulation with mean 1 (bilinear interpolation with
    ``align_corners=False`` preserves the mean when size is a multiple of R).
    ``mode="distribution"``: the upsampled map renormalised to sum to 1 over the size x size positions.
    """
    if attention_map.dim() != 3 or attention_map.shape[-1] != attention_map.shape[-2]:
        raise ValueError(f"upsample_map expects a map [B, R, R], got shape {tuple(attention_map.shape)}")
    if mode not in _UPSAMPLE_MODES:
        raise ValueError(f"upsample_map mode={mode!r} is invalid: expected one of {_UPSAMPLE_MODES}")
    r = attention_map.shape[-1]
    up = F.interpolate((attention_map * (r * r)).unsqueeze(1), size=(size, size), mode="bilinear",
                       align_corners=False)
    if mode == "distribution":
        up = up / up.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return up


class _MLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


class FeaturePyramid(nn.Module):
    """Frames [N, 3, S, S] -> features [N, R*R, F].

    A stride-2 conv stem, then stride-2 conv stages down to R x R. Every level from S/2 down to R is
    projected to F channels (1x1) and average-pooled to R x R; the sum (a top-down-free FPN fusion) mixes
    fine detail with coarse context. A learned linear map of the 4-d position code (x, y, 1-x, 1-y) is added
    (Locatello et al.'s soft position embedding), then LayerNorm and a small MLP.
    """

    def __init__(self, image_size: int, resolution: int, out_dim: int, channels: int):
        super().__init__()
        ratio = image_size // resolution
        if image_size % resolution != 0 or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(f"attention resolution={resolution} must divide image_size={image_size} by a "
                             "power of two >= 2 (e.g. 8 or 16 for 64 x 64 frames)")
        self.resolution = resolution
        n_down = int(math.log2(ratio))
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), _group_norm(channels),
                                  nn.SiLU())
        self.stages = nn.ModuleList()
        widths = [channels]
        for i in range(n_down - 1):
            c_in, c_out = widths[-1], min(channels * 2 ** (i + 1), 4 * channels)
            self.stages.append(nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), _group_norm(c_out), nn.SiLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), _group_norm(c_out), nn.SiLU()))
            widths.append(c_out)
        self.laterals = nn.ModuleList(nn.Conv2d(w, out_dim, 1) for w in widths)
        self.position = nn.Linear(4, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.mlp = _MLP(out_dim, out_dim, out_dim)
        grid = coordinate_grid(resolution)
        self.register_buffer("position_code", torch.cat([grid, -grid], dim=-1) * 0.5 + 0.5, persistent=False)

    def forward(self, frames: Tensor) -> Tensor:
        x = self.stem(frames)
        fused = F.adaptive_avg_pool2d(self.laterals[0](x), self.resolution)
        for stage, lateral in zip(self.stages, self.laterals[1:]):
            x = stage(x)
            fused = fused + F.adaptive_avg_pool2d(lateral(x), self.resolution)
        feats = fused.flatten(2).transpose(1, 2) + self.position(self.position_code)
        return self.mlp(self.norm(feats))


class EncoderMapFeatures(nn.Module):
    """The world model's encoder maps [[N, C_i, r_i, r_i], ...] -> features [N, R*R, F].

    The cheap alternative to ``FeaturePyramid`` (``feature_source="encoder"``): no convolution over the
    frame, only a 1x1 projection of each encoder stage to F channels, resized to R x R (area pooling down,
    nearest-neighbour up), summed, plus the same soft position embedding, LayerNorm and MLP. The caller
    passes the maps detached, so the attention task trains these projections and never the encoder; the
    encoder's features are those the ELBO shaped (they carry the pose the decoder needs).
    """

    def __init__(self, widths: tuple[int, ...], resolution: int, out_dim: int):
        super().__init__()
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"encoder map widths={widths!r} are invalid: expected positive channel counts")
        self.widths, self.resolution = tuple(widths), resolution
        self.laterals = nn.ModuleList(nn.Conv2d(w, out_dim, 1) for w in self.widths)
        self.position = nn.Linear(4, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.mlp = _MLP(out_dim, out_dim, out_dim)
        grid = coordinate_grid(resolution)
        self.register_buffer("position_code", torch.cat([grid, -grid], dim=-1) * 0.5 + 0.5, persistent=False)

    def forward(self, maps: list[Tensor]) -> Tensor:
        r = self.resolution
        fused = 0.0
        for m, lateral in zip(maps, self.laterals):
            # A 1x1 convolution commutes with area pooling, so a larger map is pooled first: the same
            # features for a quarter of the convolution's work, and no pooling backward when the map is
            # detached. A smaller map is projected first (fewer positions) and then repeated.
            if m.shape[-1] > r:
                y = lateral(F.adaptive_avg_pool2d(m, r))
            else:
                y = lateral(m)
                if y.shape[-1] < r:
                    y = F.interpolate(y, size=(r, r), mode="nearest")
            fused = fused + y
        feats = fused.flatten(2).transpose(1, 2) + self.position(self.position_code)
        return self.mlp(self.norm(feats))


class SlotAttention(nn.Module):
    """Slot attention (Locatello et al. 2020, Algorithm 1) from given initial slots.

    ``forward(inputs [B, N, F], slots [B, S, F]) -> (slots [B, S, F], attn [B, S, N])`` where ``attn`` is
    the last round's attention, a softmax over the S slots (columns sum to 1). ``center_keys``: subtract
    from every key its mean over the N positions, so the logits only see what differs between positions
    (a departure from Locatello et al.; docs/MODEL_CHANGES.md 23).
    """

    def __init__(self, dim: int, iterations: int, hidden: int | None = None, eps: float = 1e-8,
                 center_keys: bool = False):
        super().__init__()
        if iterations < 1:
            raise ValueError(f"slot attention iterations={iterations} is invalid: expected at least 1")
        self.iterations = iterations
        self.eps = eps
        self.center_keys = center_keys
        self.scale = dim ** -0.5
        self.norm_inputs = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = _MLP(dim, hidden or 2 * dim, dim)

    def forward(self, inputs: Tensor, slots: Tensor):
        b, s, d = slots.shape
        x = self.norm_inputs(inputs)
        k, v = self.to_k(x), self.to_v(x)
        if self.center_keys:
            # Keys relative to their mean over positions: a slot's logits then sum to 0 over positions, so
            # no slot can win every position through the component all positions share.
            k = k - k.mean(dim=1, keepdim=True)
        attn = None
        for _ in range(self.iterations):
            previous = slots
            q = self.to_q(self.norm_slots(slots))
            logits = torch.einsum("bsd,bnd->bsn", q, k) * self.scale
            attn = logits.softmax(dim=1)  # competition between slots for each input position
            weights = (attn + self.eps) / (attn + self.eps).sum(dim=-1, keepdim=True)  # weighted mean
            updates = torch.einsum("bsn,bnd->bsd", weights, v)
            slots = self.gru(updates.reshape(b * s, d), previous.reshape(b * s, d)).reshape(b, s, d)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn


class AttentionSchema(nn.Module):
    """Bottom-up slot-attention posterior and top-down prior over R x R attention maps.

    Args:
        hidden_dim: H, size of the LSTM state h_t.
        context_dim: C, size of the Perceiver context c_t.
        latent_dim: D, size of z_t.
        attention_dim: size of the attention state s_t.
        resolution: R, side of the attention maps (R x R); ``image_size / R`` must be a power of two >= 2.
        num_slots: S.
        slot_dim: F, width of features and slots.
        iterations: slot-attention rounds (3 in Locatello et al.).
        image_size: side of the input frames (64).
        feature_channels: base width of the feature pyramid (default ``slot_dim``).
        prior_channels: width of the prior's convolutions (default ``slot_dim``).
        max_motion: bound of the predicted displacement per axis (normalised units; 2 spans the image).
        slot_reconstruction: build the slot decoder of ``slot_reconstruction_loss`` (config:
            ``lambda_slot_recon > 0``).
        encoder_widths: channel counts of the world model's encoder maps. Given, the posterior reads
            those maps (``encode_encoder_maps``, an ``EncoderMapFeatures``) instead of running its own
            feature pyramid over the frame (config: ``attention_features="encoder"``).
        center_keys: centre slot attention's keys over positions (config ``slot_center_keys``).
    """

    def __init__(self, hidden_dim: int, context_dim: int, latent_dim: int, attention_dim: int,
                 resolution: int = 16, num_slots: int = 4, slot_dim: int = 64, iterations: int = 3,
                 image_size: int = 64, feature_channels: int | None = None,
                 prior_channels: int | None = None, max_motion: float = 2.0,
                 slot_reconstruction: bool = False, encoder_widths: tuple[int, ...] | None = None,
                 center_keys: bool = False):
        super().__init__()
        sizes = {"hidden_dim": hidden_dim, "context_dim": context_dim, "latent_dim": latent_dim,
                 "attention_dim": attention_dim, "num_slots": num_slots, "slot_dim": slot_dim}
        for name, value in sizes.items():
            if value < (0 if name == "context_dim" else 1):  # context_dim 0: no Perceiver, learned seeds
                raise ValueError(f"AttentionSchema {name}={value} is invalid: expected a positive integer")
        self.hidden_dim, self.context_dim, self.latent_dim = hidden_dim, context_dim, latent_dim
        self.attention_dim, self.resolution, self.num_slots = attention_dim, resolution, num_slots
        self.slot_dim, self.image_size, self.max_motion = slot_dim, image_size, max_motion
        self.num_positions = resolution * resolution

        # Bottom-up posterior.
        if encoder_widths is None:
            self.features = FeaturePyramid(image_size, resolution, slot_dim, feature_channels or slot_dim)
        else:
            self.features = EncoderMapFeatures(tuple(encoder_widths), resolution, slot_dim)
        self.reads_encoder_maps = encoder_widths is not None
        # The posterior reads the frame and c_t only (not h_t), so it runs batched over all B*T frames
        # before the recurrent loop (docs/MODEL_CHANGES.md); MODEL.md seeded the slots from [h_t; c_t].
        self.slot_seed = nn.Sequential(nn.Linear(context_dim, 2 * slot_dim), nn.SiLU(),
                                       nn.Linear(2 * slot_dim, num_slots * slot_dim))
        # A learned per-slot offset breaks the symmetry between slots that random initial slots break in
        # Locatello et al.; the seed MLP then moves the slots with the recurrent state.
        self.slot_embedding = nn.Parameter(torch.randn(num_slots, slot_dim))
        self.slot_attention = SlotAttention(slot_dim, iterations, center_keys=center_keys)
        self.fusion_head = _MLP(slot_dim, slot_dim, 1)
        self.state_head = nn.Sequential(nn.Linear(slot_dim + 2, 2 * attention_dim), nn.SiLU(),
                                        nn.Linear(2 * attention_dim, attention_dim))
        # Spatial-broadcast slot decoder: W [slot_k; pos_p] = W_s slot_k + W_p pos_p, so the first layer
        # runs once per slot and once per position, and only the sum is broadcast to S x R*R rows.
        if slot_reconstruction:
            self.slot_decoder_slot = nn.Linear(slot_dim, 2 * slot_dim)
            self.slot_decoder_position = nn.Linear(4, 2 * slot_dim, bias=False)
            self.slot_decoder_out = nn.Sequential(nn.SiLU(), nn.Linear(2 * slot_dim, 2 * slot_dim), nn.SiLU(),
                                                  nn.Linear(2 * slot_dim, 4))
        else:
            self.slot_decoder_slot = self.slot_decoder_position = self.slot_decoder_out = None

        # Top-down prior.
        pc = prior_channels or slot_dim
        self.prior_in = nn.Conv2d(3, pc, 3, padding=1)
        self.prior_film = _MLP(hidden_dim + latent_dim, pc, 2 * pc)
        self.prior_body = nn.Sequential(nn.SiLU(), nn.Conv2d(pc, pc, 3, padding=1), _group_norm(pc),
                                        nn.SiLU(),
                                        nn.Conv2d(pc, pc, 3, padding=1), nn.SiLU())
        self.prior_logits = nn.Conv2d(pc, 1, 1)
        self.motion_head = _MLP(pc + hidden_dim + latent_dim + 2, pc, 2)
        grid = coordinate_grid(resolution)
        self.register_buffer("grid", grid, persistent=False)                      # [R*R, 2]
        self.register_buffer("grid_image", grid.t().reshape(1, 2, resolution, resolution), persistent=False)

    @classmethod
    def from_config(cls, config, **overrides) -> AttentionSchema:
        """Build from an ``AIMEConfig`` (hidden/context/latent/attention dims, attention_resolution,
        num_slots, slot_dim, slot_iterations, image_size, lambda_slot_recon > 0); keyword overrides win."""
        kwargs = {"hidden_dim": config.hidden_dim, "context_dim": config.context_dim,
                  "latent_dim": config.latent_dim, "attention_dim": config.attention_dim,
                  "resolution": config.attention_resolution, "num_slots": config.num_slots,
                  "slot_dim": config.slot_dim, "iterations": config.slot_iterations,
                  "image_size": config.image_size,
                  "slot_reconstruction": config.lambda_slot_recon > 0,
                  "center_keys": config.slot_center_keys}
        if getattr(config, "attention_features", "frames") == "encoder" and "encoder_widths" not in overrides:
            raise ValueError("attention_features='encoder' needs encoder_widths=(the encoder's stage widths)")
        return cls(**{**kwargs, **overrides})

    # ------------------------------------------------------------------------------------------------
    def initial_map(self, batch_size: int) -> Tensor:
        """The uniform map [B, R, R] (each entry 1/R^2), the A_0 the prior sees at t = 1."""
        r = self.resolution
        return self.grid.new_full((batch_size, r, r), 1.0 / self.num_positions)

    def encode_features(self, frames: Tensor) -> Tensor:
        """Feature pyramid, batched over frames: [N, 3, 64, 64] in [-1, 1] -> [N, R*R, slot_dim]."""
        if self.reads_encoder_maps:
            raise ValueError("this attention schema reads the encoder's maps (attention_features='encoder'); "
                             "call encode_encoder_maps(maps)")
        s = self.image_size
        if frames.dim() != 4 or tuple(frames.shape[1:]) != (3, s, s):
            raise ValueError(f"encode_features expects frames [N, 3, {s}, {s}], "
                             f"got shape {tuple(frames.shape)}")
        if not frames.is_floating_point():
            raise ValueError(f"encode_features expects float frames in [-1, 1], got dtype {frames.dtype}")
        return self.features(frames)

    def encode_encoder_maps(self, maps: list[Tensor]) -> Tensor:
        """Features from the encoder's stage maps [[N, C_i, r_i, r_i], ...] (widths ``encoder_widths``)
        -> [N, R*R, slot_dim]; gradients flow into the maps unless the caller detaches them."""
        if not self.reads_encoder_maps:
            raise ValueError("this attention schema runs its own feature pyramid over frames; call "
                             "encode_features(frames)")
        widths = tuple(int(m.shape[1]) for m in maps)
        if widths != self.features.widths or any(m.dim() != 4 for m in maps):
            raise ValueError(f"encode_encoder_maps expects {len(self.features.widths)} maps [N, C_i, r, r] "
                             f"with C_i = {self.features.widths}, got shapes {[tuple(m.shape) for m in maps]}")
        return self.features(maps)

    def encode_sequence(self, frames: Tensor) -> Tensor:
        """Convenience: [B, T, 3, 64, 64] -> [B, T, R*R, slot_dim] with one batched pyramid pass."""
        if frames.dim() != 5:
            raise ValueError(f"encode_sequence expects frames [B, T, 3, H, W], "
                             f"got shape {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        feats = self.encode_features(frames.reshape(b * t, *frames.shape[2:]))
        return feats.reshape(b, t, self.num_positions, -1)

    # ------------------------------------------------------------------------------------------------
    def posterior_step(self, feats: Tensor, c: Tensor) -> dict[str, Tensor]:
        """Bottom-up attention of N frames at once (any N: B at one step, or B*T for a whole window).

        Args:
            feats: [N, R*R, slot_dim] from ``encode_features``.  c: [N, C] context c_t of each frame.
        Returns dict:
            map [N, R, R] (A_t, >= 0, sums to 1 over positions), slot_maps [N, S, R, R] (sum to 1 over S),
            slot_features [N, S, slot_dim], fusion_weights [N, S], center [N, 2] (x, y) in (-1, 1),
            state [N, attention_dim] (s_t).
        """
        b = self._check_batch(feats, (self.num_positions, self.slot_dim), "feats", "[N, R*R, slot_dim]")
        self._check_vector(c, b, self.context_dim, "c")
        s, r = self.num_slots, self.resolution
        slots = self.slot_seed(c).reshape(b, s, self.slot_dim) + self.slot_embedding
        slots, attn = self.slot_attention(feats, slots)
        weights = self.fusion_head(slots).squeeze(-1).softmax(dim=-1)
        fused = torch.einsum("bs,bsn->bn", weights, attn)
        fused = fused / fused.sum(dim=-1, keepdim=True)
        center = fused @ self.grid
        state = self.state_head(torch.cat([slots.mean(dim=1), center], dim=-1))
        return {"map": fused.reshape(b, r, r), "slot_maps": attn.reshape(b, s, r, r), "slot_features": slots,
                "fusion_weights": weights, "center": center, "state": state}

    def prior_step(self, prev_map: Tensor, h: Tensor, z_prev: Tensor, motion: bool = True) -> dict[str, Tensor]:
        """Top-down prediction p(A_t | A_{t-1}, h_t, z_{t-1}).

        Args:
            prev_map: [B, R, R] A_{t-1} (``initial_map`` at t = 1).  h: [B, H] h_t.  z_prev: [B, D] z_{t-1}.
            motion: also predict the motion of the centre of mass (the dynamics loss needs it; an open-loop
                rollout does not, and skips the motion head).
        Returns dict:
            logits [B, R*R], map [B, R, R] (softmax of logits), and with ``motion``: motion [B, 2] predicted
            (dx, dy) of the centre of mass from A_{t-1} to A_t, prev_center [B, 2] the centre of mass of A_{t-1}.
        """
        r = self.resolution
        if prev_map.dim() != 3 or tuple(prev_map.shape[1:]) != (r, r):
            raise ValueError(f"prior_step expects prev_map [B, {r}, {r}], got shape {tuple(prev_map.shape)}")
        b = prev_map.shape[0]
        self._check_vector(h, b, self.hidden_dim, "h")
        self._check_vector(z_prev, b, self.latent_dim, "z_prev")
        # R*R*A: the uniform map becomes all ones, whatever R is.
        image = torch.cat([prev_map.unsqueeze(1) * self.num_positions,
                           self.grid_image.expand(b, -1, -1, -1)], dim=1)
        if image.device.type == "cpu" and not torch.is_grad_enabled() and image.dtype == torch.float32:
            # Imagination (batch 1 per step, no gradient): oneDNN's channels-last kernels took about half the
            # time of the default path for these small convolutions; the values are the same.
            image = image.contiguous(memory_format=torch.channels_last)
        cond = torch.cat([h, z_prev], dim=-1)
        gamma, beta = self.prior_film(cond).chunk(2, dim=-1)
        x = self.prior_in(image) * (1.0 + gamma[..., None, None]) + beta[..., None, None]
        x = self.prior_body(x)
        logits = self.prior_logits(x).reshape(b, r * r)
        if not motion:
            return {"logits": logits, "map": logits.softmax(dim=-1).reshape(b, r, r)}
        prev_center = center_of_mass(prev_map)
        motion = self.motion_head(torch.cat([x.mean(dim=(-2, -1)), cond, prev_center], dim=-1))
        motion = self.max_motion * torch.tanh(motion / self.max_motion)
        return {"logits": logits, "map": logits.softmax(dim=-1).reshape(b, r, r), "motion": motion,
                "prev_center": prev_center}

    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def attention_kl(post_map: Tensor, prior_logits: Tensor) -> Tensor:
        """KL(Cat(A_t) || Cat(softmax(prior_logits))) per example, in nats: [B, R, R] or [B, R*R] -> [B]."""
        b = post_map.shape[0]
        p = post_map.reshape(b, -1)
        if prior_logits.dim() != 2 or prior_logits.shape != p.shape:
            raise ValueError(f"attention_kl expects prior_logits [B, R*R] = {tuple(p.shape)}, "
                             f"got {tuple(prior_logits.shape)}")
        return (torch.xlogy(p, p) - p * prior_logits.log_softmax(dim=-1)).sum(dim=-1)

    @staticmethod
    def diversity(slot_maps: Tensor) -> Tensor:
        """Mean over slot pairs k != l of <p_k, p_l>^2, p_k the L2-normalised flattened map.

        Shapes: [B, S, R, R] -> [B].

        0 when the slots attend to disjoint positions, 1 when they are identical; 0 for a single slot.
        """
        if slot_maps.dim() != 4:
            raise ValueError(f"diversity expects slot_maps [B, S, R, R], got shape {tuple(slot_maps.shape)}")
        b, s = slot_maps.shape[:2]
        if s < 2:
            return slot_maps.new_zeros(b)
        p = F.normalize(slot_maps.reshape(b, s, -1), dim=-1)
        gram = p @ p.transpose(1, 2)
        off_diagonal = gram.pow(2).sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).pow(2).sum(dim=-1)
        return off_diagonal / (s * (s - 1))

    @staticmethod
    def dynamics_loss(motion: Tensor, center_prev: Tensor, center: Tensor, beta: float = 0.1) -> Tensor:
        """SmoothL1(motion, detach(center - center_prev)), mean over (x, y): [B, 2] x3 -> [B].

        ``beta`` is the SmoothL1 transition point in normalised units (0.1 = 5 % of the image side), small
        because typical per-step displacements are small.
        """
        same = motion.shape == center_prev.shape == center.shape
        if not same or motion.dim() != 2 or motion.shape[-1] != 2:
            raise ValueError("dynamics_loss expects motion, center_prev and center all [B, 2], got "
                             f"{tuple(motion.shape)}, {tuple(center_prev.shape)}, {tuple(center.shape)}")
        target = (center - center_prev).detach()
        return F.smooth_l1_loss(motion, target, reduction="none", beta=beta).mean(dim=-1)

    def decode_slots(self, slot_features: Tensor) -> tuple[Tensor, Tensor]:
        """Slot features [N, S, slot_dim] -> (blended image [N, 3, R, R], alpha masks [N, S, R, R] that sum
        to 1 over S). Needs ``slot_reconstruction=True``."""
        if self.slot_decoder_out is None:
            raise ValueError("this AttentionSchema has no slot decoder: build it with slot_reconstruction=True "
                             "(config lambda_slot_recon > 0)")
        n, s, _ = slot_features.shape
        r = self.resolution
        position = self.slot_decoder_position(self.features.position_code)               # [R*R, 2F]
        hidden = self.slot_decoder_slot(slot_features).unsqueeze(2) + position           # [N, S, R*R, 2F]
        out = self.slot_decoder_out(hidden)                                              # [N, S, R*R, 4]
        alpha = out[..., 3].softmax(dim=1)                                               # [N, S, R*R]
        image = torch.einsum("bsn,bsnc->bcn", alpha, torch.tanh(out[..., :3]))
        return image.reshape(n, 3, r, r), alpha.reshape(n, s, r, r)

    def slot_reconstruction_loss(self, frames: Tensor, slot_features: Tensor) -> Tensor:
        """Mean squared error ([-1, 1] scale, mean over 3 x R x R) between ``decode_slots(slot_features)`` and
        the frames [N, 3, S, S] average-pooled to R x R: [N]. Trains the slots and the feature pyramid to
        divide the frame between them."""
        target = F.adaptive_avg_pool2d(frames.float(), self.resolution)
        image, _ = self.decode_slots(slot_features)
        return (image.float() - target).pow(2).mean(dim=(1, 2, 3))

    center_of_mass = staticmethod(center_of_mass)
    upsample_map = staticmethod(upsample_map)

    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_batch(x: Tensor, tail: tuple, name: str, expected: str) -> int:
        if x.dim() != 1 + len(tail) or tuple(x.shape[1:]) != tuple(tail):
            raise ValueError(f"{name} must be {expected} = [B, {', '.join(map(str, tail))}], "
                             f"got shape {tuple(x.shape)}")
        return x.shape[0]

    @staticmethod
    def _check_vector(x: Tensor, batch: int, dim: int, name: str) -> None:
        if x.dim() != 2 or tuple(x.shape) != (batch, dim):
            raise ValueError(f"{name} must be [B, {dim}] with B = {batch}, got shape {tuple(x.shape)}")
