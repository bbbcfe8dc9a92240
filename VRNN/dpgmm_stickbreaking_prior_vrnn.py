"""`DPGMMVariationalRecurrentAutoencoder`: the AIME world model (MODEL.md, the canonical implementation).

A variational RNN over 64x64 frames whose latent prior is a Dirichlet-process Gaussian mixture built by
Kumaraswamy stick-breaking, with a causal Perceiver IO context, an attention schema, an NVAE-style
encoder/decoder and a temporal discriminator. Time convention and causality follow MODEL.md §1 exactly;
the per-step cell is ``VRNN/vrnn_cell.py``.

Efficiency (MODEL.md §6): the encoder, the Perceiver, the attention feature pyramid, the decoder and the
discriminator each run once over all B*T frames; the Python loop over t only runs the LSTM step, the
prior/posterior heads and the attention schema's per-step heads.

Losses (MODEL.md §3): every per-frame quantity (nats per frame) is divided by 3*H*W before averaging over
B and T, so losses read as nats per pixel dimension; ``bits_per_dim`` is the negative ELBO
(recon + KL_z + KL_sticks + KL_alpha) / ln 2 on that scale. The cluster entropy H(pi_t) is a per-frame
quantity too and is divided the same way, so ``entropy_weight`` trades it against the KLs at equal scale.
The attention KL is a KL between R x R categoricals, a different space, and is kept in nats per frame (it
is its own task for RGB). ``parameter_groups`` gives the whole attention schema (feature pyramid, slot
attention, prior and heads) the x1.2 learning rate.

Randomness: the posterior draws, Kumaraswamy sticks and imagination noise come from the ``generator``
argument when given; the Gamma draws for KL_sticks (``alpha_samples`` > 0) use torch's global RNG, which
has no generator-taking reparameterised Gamma sampler (``alpha_samples=0`` uses the exact expectation).

Choices where the spec is silent: z_t fed downstream is the first of the ``kl_samples`` posterior draws
used for KL_z; the discriminator conditions on z detached (the latent is the label of the frame, not
something the generator should optimise to fool the critic) and its real-window features for feature
matching are computed without a graph (they are targets); the Perceiver context is not reset at episode
starts inside a window (``is_first`` resets h, z, c_{t-1} and A_{t-1}).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perceiver_io import CausalPerceiverIO, PerceiverIOConfig
from VRNN.aime_config import AIMEConfig
from VRNN.attention_schema import AttentionSchema
from VRNN.dpgmm_prior import DPGMMPrior
from VRNN.likelihoods import build_likelihood
from VRNN.nvae import NVAEDecoder, NVAEEncoder
from VRNN.temporal_discriminator import (
    TemporalDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
    gradient_penalty,
)
from VRNN.vrnn_cell import RecurrentState, VRNNCell
from VRNN.vrnn_utilities import CheckpointError, load_checkpoint, resolve_device, save_checkpoint

__all__ = ["TASK_LOSS_KEYS", "DPGMMVariationalRecurrentAutoencoder", "gram_anchor_loss"]

logger = logging.getLogger(__name__)

TASK_LOSS_KEYS = ("total_vae_loss", "perceiver_loss", "attention_loss", "adversarial_loss")

# The public keyword names of MODEL.md §4 and their defaults (= AIMEConfig defaults, the paper sizes).
_PUBLIC_DEFAULTS: dict[str, Any] = {
    "max_components": 15, "input_dim": 64, "latent_dim": 36, "hidden_dim": 512, "attention_dim": 64,
    "action_dim": 6, "sequence_length": 16, "img_perceiver_channels": 64, "img_disc_layers": 4,
    "disc_num_heads": 4, "num_latent_perceiver": 128, "num_latent_channels_perceiver": 256,
    "num_codebook_perceiver": 1024, "perceiver_code_dim": 256,
}
# Per-step [B, T] terms of the cell that forward_sequence returns under the same name.
_STEP_KEYS = ("kl_z", "kl_sticks", "kl_alpha", "attention_kl", "attention_dynamics", "attention_diversity",
              "attention_slot_recon", "prior_means", "prior_logvars", "stick_a", "stick_b", "alpha_shape", "alpha_rate")


def recurrent_precision(device: torch.device) -> AbstractContextManager:
    """Autocast off: the posterior head, the LSTM and the DPGMM prior run in float32 inside a bf16
    autocast region (the convolutional parts around them stay in bf16)."""
    return torch.autocast(device.type, enabled=False)


def _map_entropy(maps: Tensor) -> Tensor:
    """Mean entropy in nats of attention maps [B, T, R, R] (each a distribution over R*R positions), no
    gradient; ln(R*R) is the uniform map."""
    p = maps.detach().flatten(2).float()
    return -torch.xlogy(p, p).sum(-1).mean()


def gram_anchor_loss(maps: list[Tensor], anchor_maps: list[Tensor]) -> Tensor:
    """Gram anchoring (MODEL.md §2.8): MSE between cosine Gram matrices of feature maps [N, C, r, r]
    (positions x positions, each position's channel vector L2-normalised, negatives zeroed), averaged
    over the given levels. ``anchor_maps`` (the EMA encoder's) are targets without gradient."""
    terms = []
    for m, a in zip(maps, anchor_maps):
        fm, fa = F.normalize(m.flatten(2), dim=1), F.normalize(a.detach().flatten(2), dim=1)
        gm = F.relu(fm.transpose(1, 2) @ fm)
        ga = F.relu(fa.transpose(1, 2) @ fa)
        terms.append(F.mse_loss(gm, ga))
    return torch.stack(terms).mean()


class DPGMMVariationalRecurrentAutoencoder(nn.Module):
    """The AIME world model. The keywords are the public names of MODEL.md §4; every other hyperparameter
    comes from ``config`` (an ``AIMEConfig``, default: the paper sizes). When ``config`` is given, a
    keyword left at its default takes the config's value and a keyword set to anything else overrides it.
    ``.config`` always holds the full resolved configuration (checkpoints rebuild from it).
    """

    def __init__(self, max_components: int = 15, input_dim: int = 64, latent_dim: int = 36,
                 hidden_dim: int = 512, attention_dim: int = 64, action_dim: int = 6, sequence_length: int = 16,
                 img_perceiver_channels: int = 64, img_disc_layers: int = 4, disc_num_heads: int = 4,
                 device: str | torch.device | None = None, num_latent_perceiver: int = 128,
                 num_latent_channels_perceiver: int = 256, num_codebook_perceiver: int = 1024,
                 perceiver_code_dim: int = 256, config: AIMEConfig | None = None) -> None:
        super().__init__()
        arguments = locals()  # taken outside the comprehension (its own scope before Python 3.12)
        given = {name: arguments[name] for name in _PUBLIC_DEFAULTS}
        if config is not None and not isinstance(config, AIMEConfig):
            raise ValueError(f"config must be an AIMEConfig or None, got {type(config).__name__}")
        base = config if config is not None else AIMEConfig()
        overrides = {k: v for k, v in given.items() if config is None or v != _PUBLIC_DEFAULTS[k]}
        c = self.config = base.replace(**overrides)
        self.action_dim = c.action_dim
        size = c.image_size
        self.pixel_dims = 3 * size * size

        self.encoder = NVAEEncoder.from_config(c)
        self.perceiver = None
        self._perceiver_map = None       # index of the encoder map the tokenizer reads (perceiver_features)
        if c.use_perceiver:
            extra = {}
            if c.perceiver_features == "encoder":
                self._perceiver_map = self._encoder_map_at(PerceiverIOConfig.from_aime_config(c).tokens_per_side)
                extra = {"feature_channels": self.encoder.map_widths[self._perceiver_map]}
            self.perceiver = CausalPerceiverIO(PerceiverIOConfig.from_aime_config(c, **extra))
        widths = {"encoder_widths": self.encoder.map_widths} if c.attention_features == "encoder" else {}
        attention = AttentionSchema.from_config(c, context_dim=c.context_dim if c.use_perceiver else 0,
                                                image_size=size, **widths) if c.use_attention else None
        prior = DPGMMPrior(c.hidden_dim, c.latent_dim, c.max_components, hidden_dim=c.hidden_dim,
                           alpha_a0=c.prior_alpha_a0, alpha_b0=c.prior_alpha_b0, taylor_terms=c.taylor_terms,
                           kl_samples=c.kl_samples, alpha_samples=c.alpha_samples,
                           random_stick_order=c.random_stick_order)
        self.cell = VRNNCell(self.encoder.feature_dim, c.hidden_dim, c.context_dim if c.use_perceiver else 0,
                             c.latent_dim, c.action_dim, attention, prior, lstm_layers=c.lstm_layers,
                             attention_resolution=c.attention_resolution, side_inputs=c.posterior_side_inputs)
        self.likelihood = build_likelihood(c.likelihood, c.num_mixtures)
        self.decoder = NVAEDecoder.from_config(c, c.latent_dim + c.hidden_dim, self.likelihood.num_params,
                                               out_bias=self.likelihood.initial_bias())
        self.discriminator = TemporalDiscriminator(c.latent_dim, c.disc_channels, c.img_disc_layers,
                                                   c.disc_num_heads, image_size=size) if c.use_discriminator else None
        if device is not None:
            self.to(resolve_device(str(device)))

    # ---------------------------------------------------------------------------------------------- build
    @classmethod
    def from_config(cls, config: AIMEConfig, action_dim: int | None = None) -> DPGMMVariationalRecurrentAutoencoder:
        """Build from a full config; ``action_dim`` (the environment's) overrides ``config.action_dim``."""
        if action_dim is not None:
            config = config.replace(action_dim=int(action_dim))
        return cls(config=config)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu",
                        use_ema: bool | None = None) -> DPGMMVariationalRecurrentAutoencoder:
        """Rebuild from a checkpoint's ``config`` and ``action_dim`` and load its weights.

        ``use_ema``: None (default) loads the EMA weights when the checkpoint has them (what the run's
        evaluation reported) and the live ``model`` weights, with a log line, when it has none; True
        requires the EMA weights; False loads the live training weights. A missing file, a foreign file,
        weights that do not fit, or ``use_ema=True`` on a checkpoint without EMA raise ``CheckpointError``."""
        payload = load_checkpoint(path, map_location=map_location)
        for key in ("config", "model"):
            if key not in payload:
                raise CheckpointError(f"checkpoint {str(path)!r} has no {key!r} entry (keys: {sorted(payload)})")
        try:
            config = AIMEConfig.from_dict(payload["config"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} holds an invalid config: {exc}") from exc
        if use_ema is None:
            use_ema = payload.get("ema") is not None
            if not use_ema:
                logger.info("checkpoint %s holds no EMA weights: loading its live training weights", path)
        state = payload.get("ema") if use_ema else payload["model"]
        if state is None:
            raise CheckpointError(f"checkpoint {str(path)!r} has no EMA weights (ema is None); use use_ema=False")
        model = cls.from_config(config, payload.get("action_dim"))
        model.load_weights(state, source=str(path))
        return model.to(map_location)

    def load_weights(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Strict load with a ``CheckpointError`` naming missing, unexpected and mis-shaped entries."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            show = lambda xs: ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")
            raise CheckpointError(f"weights in {source} do not fit this model: missing [{show(missing)}], "
                                  f"unexpected [{show(unexpected)}], shape mismatches [{show(shapes)}]")
        self.load_state_dict(state)

    def save(self, path: str | Path, ema: nn.Module | None = None, **extra: Any) -> Path:
        """Write a checkpoint that ``from_checkpoint`` reads (config, action_dim, model, ema, ``extra``)."""
        return save_checkpoint(path, {"config": self.config.to_dict(), "action_dim": self.action_dim,
                                      "model": self.state_dict(),
                                      "ema": None if ema is None else ema.state_dict(), **extra})

    # ---------------------------------------------------------------------------------------------- params
    def generator_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the discriminator's (what the four tasks and RGB update)."""
        return [p for n, p in self.named_parameters() if not n.startswith("discriminator.")]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """The discriminator's parameters (empty with ``use_discriminator=False``)."""
        return [] if self.discriminator is None else list(self.discriminator.parameters())

    def parameter_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups over ``generator_parameters()`` exactly once (MODEL.md §5): Perceiver x1.5 lr,
        attention schema x1.2, learned initial states x0.1; no weight decay on biases, norm weights,
        gates, scales and initial states (every parameter with fewer than two dims, plus h0/c0)."""
        groups: dict[tuple[str, bool], dict[str, Any]] = {}
        for name, p in self.named_parameters():
            if name.startswith("discriminator."):
                continue
            initial = name in ("cell.lstm.h0", "cell.lstm.c0")
            part, mult = (("initial_state", 0.1) if initial else ("perceiver", 1.5) if name.startswith("perceiver.")
                          else ("attention", 1.2) if name.startswith("cell.attention.") else ("base", 1.0))
            decay = p.dim() >= 2 and not initial
            group = groups.setdefault((part, decay), {"params": [], "lr": lr * mult, "lr_scale": mult,
                                                      "weight_decay": weight_decay if decay else 0.0,
                                                      "name": f"{part}{'' if decay else '/no_decay'}"})
            group["params"].append(p)
        return list(groups.values())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---------------------------------------------------------------------------------------------- inputs
    def _prepare_observations(self, obs: Any, name: str = "observations") -> Tensor:
        """uint8 [0, 255] or float [-1, 1], [B, T, 3, H, W] -> float [-1, 1] on the model's device."""
        size, expected = self.config.image_size, f"[B, T, 3, {self.config.image_size}, {self.config.image_size}]"
        if not isinstance(obs, Tensor):
            try:
                obs = torch.as_tensor(obs)
            except Exception as exc:
                raise ValueError(f"{name} must be a tensor {expected}, got {type(obs).__name__}") from exc
        if obs.dim() != 5 or obs.shape[2] != 3 or obs.shape[0] < 1 or obs.shape[1] < 1:
            raise ValueError(f"{name} must have shape {expected} (uint8 in [0, 255] or float in [-1, 1]), "
                             f"got shape {tuple(obs.shape)}")
        obs = obs.to(self.device)
        if obs.dtype == torch.uint8:
            x = obs.to(torch.get_default_dtype()) / 127.5 - 1.0
        elif obs.is_floating_point():
            if not bool(torch.isfinite(obs).all()):
                raise ValueError(f"{name} contains NaN or inf")
            lo, hi = float(obs.min()), float(obs.max())
            if lo < -1.001 or hi > 1.001:
                raise ValueError(f"float {name} must lie in [-1, 1] (uint8 frames in [0, 255] are also accepted), "
                                 f"got values in [{lo:.4g}, {hi:.4g}]")
            x = obs.clamp(-1.0, 1.0)
        else:
            raise ValueError(f"{name} must be uint8 in [0, 255] or float in [-1, 1], got dtype {obs.dtype}")
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            if h == w == self.config.input_dim:
                warnings.warn(f"{name}: resizing {h}x{w} frames to {size}x{size} (input_dim={h})", stacklevel=3)
                b, t = x.shape[:2]
                x = F.interpolate(x.flatten(0, 1), size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False).clamp(-1, 1).view(b, t, 3, size, size)
            else:
                raise ValueError(f"{name} must be {expected}, got shape {tuple(obs.shape)} (frames of another "
                                 f"size are resized only when input_dim={self.config.input_dim} matches them)")
        return x

    def _prepare_actions(self, actions: Any, batch: int, steps: int, name: str = "actions") -> Tensor:
        expected = f"[B={batch}, T={steps}, A={self.action_dim}]"
        if not isinstance(actions, Tensor):
            actions = torch.as_tensor(actions)
        if actions.dim() != 3 or tuple(actions.shape) != (batch, steps, self.action_dim):
            raise ValueError(f"{name} must have shape {expected}, got {tuple(actions.shape)}")
        actions = actions.to(self.device, torch.get_default_dtype())
        if not bool(torch.isfinite(actions).all()):
            raise ValueError(f"{name} contains NaN or inf")
        return actions

    # ---------------------------------------------------------------------------------------------- forward
    def _encoder_map_at(self, side: int) -> int:
        """Index of the encoder stage whose maps are ``side`` x ``side`` (stage i halves the side i times
        from image_size / 2, the first stage keeping its input's)."""
        sides = [self.config.image_size // 2 // 2**i for i in range(len(self.encoder.map_widths))]
        if side not in sides:
            raise ValueError(f"perceiver_features='encoder' needs an encoder map of {side} x {side} (the token "
                             f"grid); the encoder's maps are {sides}")
        return sides.index(side)

    def perceiver_features(self, x: Tensor, enc_maps: list[Tensor] | None = None) -> Tensor | None:
        """What the Perceiver's tokenizer reads besides x [B, T, 3, S, S]: ``None`` when it tokenizes
        pixels, else the encoder's map at token resolution, detached, [B, T, F, h, w] (``enc_maps``: the
        encoder's maps of x's B*T frames when already computed)."""
        if self._perceiver_map is None:
            return None
        b, t = x.shape[:2]
        if enc_maps is None:
            _, enc_maps = self.encoder(x.flatten(0, 1))
        m = enc_maps[self._perceiver_map].detach()
        return m.view(b, t, *m.shape[1:])

    def _context(self, x: Tensor, perceiver_loss: bool, enc_maps: list[Tensor] | None = None) -> dict[str, Tensor]:
        """The Perceiver's outputs for x [B, T, ...]: ``context`` [B, T, C] (and its losses with
        ``perceiver_loss`` when T >= 2); a [B, T, 0] context without the Perceiver. ``enc_maps``: the
        encoder's maps of x's frames, when computed already (``perceiver_features="encoder"`` reads one)."""
        if self.perceiver is None:
            return {"context": x.new_zeros(x.shape[0], x.shape[1], 0)}
        features = self.perceiver_features(x, enc_maps)
        if perceiver_loss and x.shape[1] >= 2:
            return self.perceiver(x, features)
        return {"context": self.perceiver.extract_context(x, features)}

    def _attention_posterior(self, frames: Tensor, enc_maps: list[Tensor], context: Tensor, b: int,
                             t: int) -> dict[str, Tensor] | None:
        """Bottom-up attention of all B*T frames at once (it reads the frame and c_t, not h_t).
        frames [B*T, 3, S, S], enc_maps the encoder's stage maps of those frames, context [B, T, C]
        -> dict of [B, T, ...] (``None`` without attention)."""
        attention = self.cell.attention
        if attention is None:
            return None
        # c_t is an input the attention reads, not something the attention task should train; nor, with
        # attention_features="encoder", the encoder's maps (the ELBO alone shapes the encoder).
        feats = (attention.encode_encoder_maps([m.detach() for m in enc_maps]) if attention.reads_encoder_maps
                 else attention.encode_features(frames))
        post = attention.posterior_step(feats, context.detach().flatten(0, 1))
        if attention.slot_decoder_out is not None:
            post["slot_recon"] = attention.slot_reconstruction_loss(frames, post["slot_features"])
        return {k: v.reshape(b, t, *v.shape[1:]) for k, v in post.items()}

    def _observe_loop(self, x: Tensor, actions: Tensor, is_first: Tensor | None,
                      generator: torch.Generator | None, perceiver_loss: bool,
                      posterior_mean: bool = False, snapshot_at: int | None = None,
                      attention_last_only: bool = False) -> tuple[dict, RecurrentState, dict]:
        """Batched encoders, then the causal loop over t. x [B, T, 3, S, S] in [-1, 1], actions [B, T, A].
        ``posterior_mean``: feed the posterior mean instead of a draw into the LSTM (deterministic filtering).
        ``snapshot_at``: also return (extras["state_at"]) the state that step ``snapshot_at`` (0-based) starts
        from, i.e. after x_1..x_{snapshot_at} were filtered: where an open-loop rollout from there begins.
        ``attention_last_only``: run the attention posterior on the last frame only (extras["attention"] is
        then [B, 1, ...]), which is all a rollout from the final state reads, unless the posterior reads s_t
        (``posterior_side_inputs``) or a snapshot is asked for; then every frame's attention is computed.

        Returns (per-step stacks [B, T, ...]: h, z, z_mean, z_logvar, noise; the state after the last step,
        which carries z_T and A_T for the attention prior of step T+1; batched extras: perceiver outputs,
        encoder maps, the attention posterior, is_first, state_at)."""
        b, t = x.shape[:2]
        frames = x.flatten(0, 1)
        feature, enc_maps = self.encoder(frames)
        feature = feature.view(b, t, -1)
        perc = self._context(x, perceiver_loss, enc_maps)
        context = perc["context"]
        last_only = attention_last_only and not self.config.posterior_side_inputs and snapshot_at is None
        if last_only:   # imagination reads A_T only: the slot attention of the other frames is not needed
            last = lambda v: v.view(b, t, *v.shape[1:])[:, -1]
            att = self._attention_posterior(last(frames), [last(m) for m in enc_maps], context[:, -1:], b, 1)
        else:
            att = self._attention_posterior(frames, enc_maps, context, b, t)
        if self.config.posterior_side_inputs:
            read = context if self.config.perceiver_elbo_gradient else context.detach()
            side = read if att is None else torch.cat([read, att["state"]], dim=-1)
        else:   # the RSSM posterior: f_t and h_t only
            side = feature.new_zeros(b, t, 0)
        if is_first is not None:
            if tuple(is_first.shape) != (b, t):
                raise ValueError(f"is_first must have shape [B={b}, T={t}], got {tuple(is_first.shape)}")
            is_first = is_first.to(self.device).bool()

        # All posterior noise in one draw (the loop below is what MODEL.md §6 allows: small MLPs only).
        noise = torch.randn((b, t, self.config.latent_dim), generator=generator, device=x.device, dtype=x.dtype)
        state = self.cell.initial_state(b)
        hs, zs, means, logvars = [], [], [], []
        state_at = None
        # The recurrent core runs in float32 even under bf16 autocast (docs/MODEL_CHANGES.md section 14):
        # its matmuls are a few percent of the step, and bf16 recurrence cost ~1 dB past position 16.
        with recurrent_precision(x.device):
            feature, side, actions = feature.float(), side.float(), actions.float()
            for i in range(t):
                state = self.cell.reset(state, None if is_first is None else is_first[:, i])
                if i == snapshot_at:
                    state_at = self._with_attention_at(state, att, i - 1)
                mean, logvar = self.cell.posterior_step(state, feature[:, i], side[:, i])
                z = mean if posterior_mean else mean + torch.exp(0.5 * logvar) * noise[:, i].to(mean.dtype)
                hs.append(state.h)
                zs.append(z)
                means.append(mean)
                logvars.append(logvar)
                state = self.cell.advance(state, z, actions[:, i])
        stacked = {"h": torch.stack(hs, 1), "z": torch.stack(zs, 1), "z_mean": torch.stack(means, 1),
                   "z_logvar": torch.stack(logvars, 1), "noise": noise}
        state = self._with_attention_at(state, att, 0 if last_only else t - 1)
        return stacked, state, {"perceiver": perc, "encoder_maps": enc_maps, "attention": att, "is_first": is_first,
                                "state_at": state_at}

    @staticmethod
    def _with_attention_at(state: RecurrentState, att: dict[str, Tensor] | None, i: int) -> RecurrentState:
        """``state`` with A_{i} and its centre (the attention posterior of step i, [B, R, R] / [B, 2]) as the
        previous map that the attention prior of the next step reads; unchanged without attention or i < 0."""
        if att is None or i < 0:
            return state
        return replace(state, map_prev=att["map"][:, i], center_prev=att["center"][:, i])

    def _rollout(self, state: RecurrentState, actions: Tensor, temperature: float,
                 generator: torch.Generator | None, detach_attention_inputs: bool = False,
                 attention_grad: bool = True) -> dict[str, Tensor]:
        """Open-loop latent rollout from ``state`` (the state of the first imagined step): for each of the
        F = actions.shape[1] steps, z_t from the prior p(z_t | h_t) at ``temperature`` (0: the mean of the
        most probable component, differentiable in the prior's means), the attention prior's map (the
        previous map without attention), then h_{t+1} = LSTM([z_t; a_t], h_t). actions [B, F, A] float32.
        ``detach_attention_inputs``: the attention prior reads h_t and z_{t-1} detached, as in training.
        ``attention_grad`` False: the attention prior runs without autograd (its maps are inputs of the
        decoder; nothing is trained through them), which also implies detached inputs.
        Returns latents [B, F, D], pi [B, F, K], hidden_states [B, F, H], attention_prior_maps [B, F, R, R].
        The frames are not decoded here (the caller decodes all B*F steps at once)."""
        keys = ("latents", "pi", "hidden_states", "attention_prior_maps")
        out: dict[str, list[Tensor]] = {k: [] for k in keys}
        with recurrent_precision(actions.device):
            for j in range(actions.shape[1]):
                with torch.set_grad_enabled(attention_grad and torch.is_grad_enabled()):
                    att_prior = self.cell.attention_prior_step(state, detach_attention_inputs)
                params = self.cell.prior(state.h)
                z, pi = self.cell.prior.sample(params, temperature, generator)
                prior_map = state.map_prev if att_prior is None else att_prior["map"]
                for key, value in zip(keys, (z, pi, state.h, prior_map)):
                    out[key].append(value)
                state = self.cell.advance(state, z, actions[:, j])
                if att_prior is not None:
                    # Only the next attention prior reads the state's map; nothing in a rollout reads
                    # center_prev (the prior's motion head is off), and the state does not leave this loop.
                    state = replace(state, map_prev=prior_map)
        return {k: torch.stack(v, dim=1) for k, v in out.items()}

    def _open_loop_nats(self, x: Tensor, actions: Tensor, extras: dict[str, Any], start: int) -> Tensor:
        """The overshooting term: -log p(x_t | open-loop state) in nats per frame [B, T - start] for the
        frames after ``start`` observed ones, imagined from extras["state_at"] at temperature 0 with the
        true actions (as the evaluation imagines), gradients through the rollout, the prior's means, the
        LSTM and the decoder into the filtered context (with ``overshoot_decoder_grad`` False the decoder's
        weights and the likelihood's scale get no gradient from this term). Frames at or after an episode
        start inside the rollout (is_first) count 0."""
        b, t = x.shape[:2]
        roll = self._rollout(extras["state_at"], actions[:, start:].float(), 0.0, None,
                             detach_attention_inputs=True, attention_grad=self.config.overshoot_attention_grad)
        dec_in = torch.cat([roll["latents"], roll["hidden_states"]], -1).flatten(0, 1).to(x.dtype)
        maps = roll["attention_prior_maps"].flatten(0, 1).to(x.dtype)
        train_decoder = self.config.overshoot_decoder_grad
        if train_decoder:
            params = self.decoder(dec_in, maps).float()
        else:   # gradients reach the rollout through the decoder, not the decoder's weights
            weights = {name: p.detach() for name, p in self.decoder.named_parameters()}
            params = torch.func.functional_call(self.decoder, weights, (dec_in, maps), strict=False).float()
        nats = -self.likelihood.log_prob(params, x[:, start:].flatten(0, 1),
                                         detach_scale=not train_decoder).view(b, t - start)
        is_first = extras["is_first"]
        if is_first is not None:
            nats = nats * (is_first[:, start:].long().cumsum(1) == 0).to(nats.dtype)
        return nats

    @staticmethod
    def _previous(seq: Tensor, first: Tensor, is_first: Tensor | None) -> Tensor:
        """seq [B, T, ...] shifted one step later: out[:, t] = seq[:, t-1], out[:, 0] = first [B, ...], and
        ``first`` wherever is_first [B, T] marks an episode start."""
        out = torch.cat([first.unsqueeze(1), seq[:, :-1]], dim=1)
        if is_first is not None:
            mask = is_first.view(*is_first.shape, *([1] * (seq.dim() - 2)))
            out = torch.where(mask, first.unsqueeze(1).expand_as(out), out)
        return out

    def _prior_terms(self, steps: dict[str, Tensor], extras: dict[str, Any],
                     generator: torch.Generator | None) -> dict[str, Tensor]:
        """The DPGMM prior p(z_t | h_t) and the attention prior of every step, batched over B*T after the
        loop. Returns [B, T, ...] tensors (the per-step terms of ``forward_sequence``)."""
        h, z = steps["h"], steps["z"]
        b, t = h.shape[:2]
        flat = lambda v: v.flatten(0, 1)
        with recurrent_precision(h.device):
            params = self.cell.prior(flat(h))
        terms = self.cell.prior.step_terms(params, flat(steps["z_mean"]), flat(steps["z_logvar"]), generator,
                                           first_noise=flat(steps["noise"]))
        out = {k: v.reshape(b, t, *v.shape[1:]) for k, v in terms.items() if k != "z"}
        out.update(prior_means=params.means.reshape(b, t, *params.means.shape[1:]),
                   prior_logvars=params.logvars.reshape(b, t, *params.logvars.shape[1:]),
                   stick_a=params.kuma_a.reshape(b, t, -1), stick_b=params.kuma_b.reshape(b, t, -1),
                   alpha_shape=params.alpha_shape.reshape(b, t), alpha_rate=params.alpha_rate.reshape(b, t))

        att, is_first = extras["attention"], extras["is_first"]
        attention = self.cell.attention
        zeros = h.new_zeros(b, t)
        if att is None:
            r = self.cell.attention_resolution
            uniform = self.cell.uniform_map(b * t).view(b, t, r, r)
            out.update(map=uniform, prior_map=uniform, slot_maps=uniform.unsqueeze(2),
                       center=h.new_zeros(b, t, 2), s=h.new_zeros(b, t, 0), attention_kl=zeros,
                       attention_dynamics=zeros, attention_diversity=zeros, attention_slot_recon=zeros)
            return out
        init = self.cell.initial_state(b)
        prev_map = self._previous(att["map"], init.map_prev, is_first)
        prev_center = self._previous(att["center"], init.center_prev, is_first)
        prev_z = self._previous(z, init.z_prev, is_first)
        # The attention prior reads h_t and z_{t-1} without training them: the state is the ELBO's.
        prior = attention.prior_step(flat(prev_map), flat(h).detach(), flat(prev_z).detach())
        # Stop-gradient on the posterior map: the KL trains the prior to predict the posterior, it does
        # not pull the posterior towards the prior (which had collapsed both to the uniform map).
        kl = attention.attention_kl(flat(att["map"]).detach(), prior["logits"]).view(b, t)
        dyn = attention.dynamics_loss(prior["motion"], flat(prev_center), flat(att["center"])).view(b, t)
        out.update(map=att["map"], prior_map=prior["map"].view(b, t, *prior["map"].shape[1:]),
                   slot_maps=att["slot_maps"], center=att["center"], s=att["state"], attention_kl=kl,
                   attention_dynamics=dyn, attention_diversity=attention.diversity(flat(att["slot_maps"])).view(b, t),
                   attention_slot_recon=att.get("slot_recon", zeros))
        return out

    def _forward(self, obs: Any, actions: Any, is_first: Tensor | None = None,
                 generator: torch.Generator | None = None, snapshot_at: int | None = None,
                 ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        x = self._prepare_observations(obs)
        b, t = x.shape[:2]
        a = self._prepare_actions(actions, b, t)
        steps, _, extras = self._observe_loop(x, a, is_first, generator, perceiver_loss=True,
                                              snapshot_at=snapshot_at if snapshot_at and snapshot_at < t else None)
        terms = self._prior_terms(steps, extras, generator)
        # The decoder runs once over all B*T frames, on z_t, h_t and the attention PRIOR map.
        dec_in = torch.cat([steps["z"], steps["h"]], dim=-1).flatten(0, 1)
        params = self.decoder(dec_in, terms["prior_map"].flatten(0, 1)).float()  # likelihood in float32
        frames = x.flatten(0, 1)
        recon_nats = -self.likelihood.log_prob(params, frames).view(b, t)
        mean_image = self.likelihood.mean(params).view_as(x)
        perc = extras["perceiver"]
        outputs = {
            "reconstructions": mean_image, "latents": steps["z"], "z_means": steps["z_mean"],
            "z_logvars": steps["z_logvar"], "hidden_states": steps["h"], "context": perc["context"],
            "pi": terms["pi"], "attention_maps": terms["map"], "attention_prior_maps": terms["prior_map"],
            "slot_maps": terms["slot_maps"], "attention_centers": terms["center"], "attention_states": terms["s"],
            "recon_nats": recon_nats, "cluster_entropy": terms["entropy"], "K_eff": terms["k_eff"],
            "active_components": terms["active"], "kl_dyn": terms["kl_dyn"], "kl_rep": terms["kl_rep"],
        }
        outputs.update({k: terms[k] for k in _STEP_KEYS})
        for key, value in perc.items():
            if key != "context":
                outputs[f"perceiver_{key}"] = value
        extras["observations"], extras["actions"] = x, a
        return outputs, extras

    def reconstruction_nats(self, observations: Any, latents: Tensor, hidden_states: Tensor,
                            attention_prior_maps: Tensor) -> Tensor:
        """-log p(x_t | z_t, h_t, A_t) in nats per frame [B, T], decoding the given (possibly swapped) states.

        observations [B, T, 3, 64, 64] (uint8 or float in [-1, 1]), latents [B, T, D], hidden_states [B, T, H],
        attention_prior_maps [B, T, R, R] (as ``forward_sequence`` returns them). Used by the evaluation's
        context-dependence controls: decode window i's frames from window j's z (or h) and compare."""
        x = self._prepare_observations(observations)
        b, t = x.shape[:2]
        dec_in = torch.cat([latents, hidden_states], dim=-1).flatten(0, 1).to(x.dtype)
        params = self.decoder(dec_in, attention_prior_maps.flatten(0, 1).to(x.dtype)).float()
        return -self.likelihood.log_prob(params, x.flatten(0, 1)).view(b, t)

    def forward_sequence(self, observations: Any, actions: Any, is_first: Tensor | None = None,
                         generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Filter a window with the posterior and reconstruct it.

        observations [B, T, 3, 64, 64] (uint8 or float in [-1, 1]), actions [B, T, A] (a_t follows x_t),
        is_first [B, T] bool (optional episode starts). Returns tensors: reconstructions [B, T, 3, 64, 64]
        (mean image), latents / z_means / z_logvars [B, T, D], hidden_states [B, T, H] (h_t), context
        [B, T, C] (c_t), pi [B, T, K], attention_maps / attention_prior_maps [B, T, R, R], slot_maps
        [B, T, S, R, R], and per-step terms [B, T] in nats per frame: recon_nats, kl_z, kl_sticks, kl_alpha,
        cluster_entropy, attention_kl (0 at t = 1), attention_dynamics, attention_diversity,
        attention_slot_recon (0 without the slot decoder), plus K_eff and
        active_components [B, T]; the prior's parameters at each step (prior_means / prior_logvars
        [B, T, K, D], stick_a / stick_b [B, T, K-1], alpha_shape / alpha_rate [B, T]); the Perceiver's scalar
        losses as perceiver_* (when T >= 2).
        """
        return self._forward(observations, actions, is_first, generator)[0]

    def forward(self, observations: Any, actions: Any, is_first: Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Same as ``forward_sequence``."""
        return self.forward_sequence(observations, actions, is_first, generator)

    def compute_total_loss(self, observations: Any, actions: Any, beta: float = 1.0, adversarial_weight: float = 1.0,
                           ema_model: nn.Module | None = None, is_first: Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The four task losses and their components (MODEL.md §3), all scalars, and the outputs.

        Every loss weight comes from ``self.config`` (``entropy_weight``, ``lambda_recon``, ``lambda_att_dyn``,
        ``lambda_div``, ``lambda_gram``, ``feature_matching_weight``), so a run's saved config is exactly what
        ran. Callers pass only the per-step schedule factors: ``beta`` is the KL weight's warm-up factor
        (multiplied by ``config.beta``; 1.0 = fully warmed up) and ``adversarial_weight`` the adversarial
        warm-up factor in [0, 1] (0: the adversarial task is off and the discriminator is not run).
        ``ema_model`` (the EMA copy) enables Gram anchoring when lambda_gram > 0. Per-frame terms are divided
        by 3*H*W (nats per dimension) and averaged over B and T; each weight is applied once.
        """
        c = self.config
        beta = c.beta * float(beta)
        entropy_weight, lambda_recon, lambda_gram = c.entropy_weight, c.lambda_recon, c.lambda_gram
        lambda_att_dyn, lambda_div = c.lambda_att_dyn, c.lambda_div
        start = c.overshoot_context
        outputs, extras = self._forward(observations, actions, is_first, generator,
                                        snapshot_at=start if c.overshoot_weight > 0 else None)
        x = extras["observations"]
        overshoot = extras["state_at"] is not None   # windows longer than overshoot_context
        per_dim = lambda v: v.mean() / self.pixel_dims
        recon, kl_z = per_dim(outputs["recon_nats"]), per_dim(outputs["kl_z"])
        kl_sticks, kl_alpha = per_dim(outputs["kl_sticks"]), per_dim(outputs["kl_alpha"])
        entropy = per_dim(outputs["cluster_entropy"])
        if ema_model is not None and lambda_gram > 0:
            with torch.no_grad():
                _, anchor_maps = ema_model.encoder(x.flatten(0, 1))
            gram = gram_anchor_loss(extras["encoder_maps"][-2:], anchor_maps[-2:])
        else:
            gram = recon.new_zeros(())
        # KL balancing and free nats (DreamerV3), per frame before the per-dimension scaling.
        free = c.free_nats
        kl_balanced = per_dim(c.kl_prior_scale * outputs["kl_dyn"].clamp(min=free)
                              + c.kl_posterior_scale * outputs["kl_rep"].clamp(min=free))
        total_vae = lambda_recon * recon + beta * (kl_balanced + kl_sticks + kl_alpha) - entropy_weight * entropy \
            + lambda_gram * gram
        if overshoot:   # observation overshooting (docs/MODEL_CHANGES.md 16)
            open_loop = per_dim(self._open_loop_nats(x, extras["actions"], extras, start))
            total_vae = total_vae + c.overshoot_weight * open_loop
        else:
            open_loop = recon.new_zeros(())

        t = x.shape[1]
        zero = recon.new_zeros(())
        perc = extras["perceiver"]
        perceiver_loss = perc.get("total", zero)
        # The attention prior at t = 1 has no past map to predict from: KL and dynamics count from t = 2.
        if self.cell.attention is not None and t > 1:
            att_kl = outputs["attention_kl"][:, 1:].mean()
            att_dyn = outputs["attention_dynamics"][:, 1:].mean()
        else:
            att_kl = att_dyn = zero
        att_div = outputs["attention_diversity"].mean()
        slot_recon = outputs["attention_slot_recon"].mean()
        attention_loss = beta * att_kl + lambda_att_dyn * att_dyn + lambda_div * att_div \
            + c.lambda_slot_recon * slot_recon

        if self.discriminator is not None and adversarial_weight > 0:
            z_cond = outputs["latents"].detach()
            fake = self.discriminator(outputs["reconstructions"], z_cond)
            with torch.no_grad():
                real_feats = self.discriminator(x, z_cond)["features"]
            adv = generator_loss(fake, c.disc_loss) + c.feature_matching_weight * feature_matching_loss(
                real_feats, fake["features"])
            fake_score = fake["frame_scores"].detach().mean()
        else:
            adv, fake_score = zero, zero

        losses = {
            "total_vae_loss": total_vae, "perceiver_loss": perceiver_loss, "attention_loss": attention_loss,
            "adversarial_loss": adversarial_weight * adv,
            "recon_loss": recon, "kl_z": kl_z, "kl_z_balanced": kl_balanced.detach(),
            "kl_z_nats_per_frame": outputs["kl_z"].mean(), "kl_sticks": kl_sticks, "kl_alpha": kl_alpha,
            "hierarchical_kl": kl_sticks + kl_alpha, "cluster_entropy": entropy, "attention_kl": att_kl,
            "attention_dynamics_loss": att_dyn, "attention_diversity": att_div,
            "attention_slot_recon": slot_recon, "attention_map_entropy": _map_entropy(outputs["attention_maps"]),
            "gram_enc_loss": gram, "open_loop_recon": open_loop,
            "bits_per_dim": (recon + kl_z + kl_sticks + kl_alpha) / math.log(2.0),
            "K_eff": outputs["K_eff"].mean(), "active_components": outputs["active_components"].mean(),
            "adversarial_raw": adv.detach(), "fake_score": fake_score,
        }
        for key in ("recon", "commitment", "next_token_ce", "accuracy", "copy_accuracy"):
            if key in perc:
                losses[f"perceiver_{key}"] = perc[key]
        return losses, outputs

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The generator parameters each task trains (its graph may reach others; it does not train them).

        - ``total_vae_loss`` (ELBO): every generator parameter (but the Perceiver's when
          ``config.perceiver_elbo_gradient`` is False);
        - ``perceiver_loss``: the Perceiver's;
        - ``attention_loss``: the attention schema's (it reads h_t, z_{t-1} and c_t detached);
        - ``adversarial_loss``: the decoder's: the adversarial task shapes the images, not the state.
        Parameters listed under several tasks are the shared ones that a multi-task aggregator balances;
        the others take their single task's gradient."""
        gen = [p for p in self.generator_parameters() if p.requires_grad]
        own = lambda module: [p for p in module.parameters() if p.requires_grad] if module is not None else []
        if not self.config.perceiver_elbo_gradient:
            perceiver = {id(p) for p in own(self.perceiver)}
            gen = [p for p in gen if id(p) not in perceiver]
        return {"total_vae_loss": gen, "perceiver_loss": own(self.perceiver),
                "attention_loss": own(self.cell.attention),
                "adversarial_loss": own(self.decoder) if self.discriminator is not None else []}

    def discriminator_loss(self, observations: Any, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The discriminator's own loss: real windows vs. the detached reconstructions, both conditioned on
        the detached latents; plus gp_weight * gradient penalty for ``disc_loss="wgan-gp"``."""
        if self.discriminator is None:
            raise RuntimeError("this model has no discriminator (config.use_discriminator=False)")
        x = self._prepare_observations(observations)
        z = outputs["latents"].detach()
        fake_x = outputs["reconstructions"].detach()
        real, fake = self.discriminator(x, z), self.discriminator(fake_x, z)
        loss = discriminator_loss(real, fake, self.config.disc_loss)
        result = {"real_score": real["frame_scores"].detach().mean(), "fake_score": fake["frame_scores"].detach().mean()}
        if self.config.disc_loss == "wgan-gp":
            gp = gradient_penalty(self.discriminator, x, fake_x, z)
            loss = loss + self.config.gp_weight * gp
            result["gradient_penalty"] = gp.detach()
        result["disc_loss"] = loss
        return result

    # ---------------------------------------------------------------------------------------------- inference
    @contextmanager
    def _inference(self, inference_mode: bool = False) -> Iterator[None]:
        """Eval mode and no autograd for the duration, then the previous mode back. ``inference_mode``:
        ``torch.inference_mode`` instead of ``no_grad`` (less per-operation overhead; tensors made inside
        are inference tensors, so the caller returns copies). A model already wholly in eval mode is not
        switched: ``train``/``eval`` set a flag on each of its ~250 modules (3 % of a batch-1 rollout)."""
        was_training = self.training
        switch = any(module.training for module in self.modules())
        if switch:
            self.eval()
        try:
            with torch.inference_mode() if inference_mode else torch.no_grad():
                yield
        finally:
            if switch:
                self.train(was_training)

    def encode(self, observations: Any, actions: Any, generator: torch.Generator | None = None) -> Tensor:
        """Posterior means z_t [B, T, D] of a window, filtering with the means (deterministic; no decoder)."""
        x = self._prepare_observations(observations)
        a = self._prepare_actions(actions, *x.shape[:2])
        with self._inference():
            steps, _, _ = self._observe_loop(x, a, None, generator, perceiver_loss=False, posterior_mean=True)
        return steps["z_mean"]

    def extract_context(self, observations: Any) -> Tensor:
        """The Perceiver context c_t [B, T, C] (causal, differentiable); [B, T, 0] without the Perceiver."""
        return self._context(self._prepare_observations(observations), perceiver_loss=False)["context"]

    def generate_future_sequence(self, context_obs: Any, context_actions: Any, future_actions: Any,
                                 temperature: float = 1.0, generator: torch.Generator | None = None,
                                 ) -> dict[str, Tensor]:
        """Imagine F frames after T0 observed ones (MODEL.md §4).

        context_obs [B, T0, 3, 64, 64], context_actions [B, T0, A] (the last one leads to the first imagined
        frame), future_actions [B, F, A] (future_actions[:, j] is taken after imagined frame j). The context
        is filtered with the posterior; then each future step samples z_t from the prior p(z_t | h_t) at
        ``temperature`` (0: mean of the most probable component, and the context is filtered with posterior
        means, so the whole rollout is deterministic), decodes the mean image from (z_t, h_t) and the
        attention prior's map, and advances h_{t+1} = LSTM([z_t; a_t], h_t). The imagined frames are not fed
        back through the encoders: the recurrent state alone carries the world (docs/MODEL_CHANGES.md), so
        imagination never runs the Perceiver on positions it was not trained on. The attention prior of the
        next step reads this step's prior map as A_{t-1}. Eval mode, no gradients, weights untouched.

        Returns frames [B, F, 3, 64, 64] in [-1, 1], latents [B, F, D], pi [B, F, K], hidden_states [B, F, H],
        attention_prior_maps [B, F, R, R] and attention_maps (the same maps: the attention the model expects).
        """
        x = self._prepare_observations(context_obs, "context_obs")
        b, t0 = x.shape[:2]
        a_ctx = self._prepare_actions(context_actions, b, t0, "context_actions")
        if not isinstance(future_actions, Tensor) or future_actions.dim() != 3 or future_actions.shape[0] != b:
            shape = tuple(future_actions.shape) if isinstance(future_actions, Tensor) else type(future_actions).__name__
            raise ValueError(f"future_actions must have shape [B={b}, F, A={self.action_dim}], got {shape}")
        a_fut = self._prepare_actions(future_actions, b, future_actions.shape[1], "future_actions")
        # inference_mode: 0.91 of a batch-1 rollout's time against no_grad (the per-operation overhead of
        # small tensors is most of it); the results are copied out as ordinary tensors below.
        with self._inference(inference_mode=True):
            _, state, _ = self._observe_loop(x, a_ctx, None, generator, perceiver_loss=False,
                                             posterior_mean=temperature <= 0, attention_last_only=True)
            result = self._rollout(state, a_fut.float(), temperature, generator)
            # No imagined frame is fed back (the state alone carries the world), so the decoder runs once
            # over all B*F imagined steps after the latent rollout instead of once per step.
            dec_in = torch.cat([result["latents"], result["hidden_states"]], -1).flatten(0, 1)
            params = self.decoder(dec_in, result["attention_prior_maps"].flatten(0, 1)).float()
            result["frames"] = self.likelihood.mean(params).view(b, a_fut.shape[1], *x.shape[2:])
        result = {k: v.clone() for k, v in result.items()}   # ordinary tensors: usable with autograd, in place
        result["attention_maps"] = result["attention_prior_maps"]
        return result

    def predict_future(self, context_obs: Any, context_actions: Any, future_actions: Any,
                       temperature: float = 1.0, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Alias of ``generate_future_sequence``."""
        return self.generate_future_sequence(context_obs, context_actions, future_actions, temperature, generator)
