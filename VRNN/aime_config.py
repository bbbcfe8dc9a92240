"""`AIMEConfig`: every hyperparameter of the AIME world model and its trainer, in one frozen dataclass.

Config flows one way: class defaults (the paper's sizes) -> a named preset -> command-line overrides ->
saved as ``config.json`` in the run directory and inside every checkpoint. Nothing rewrites a config
after launch; ``replace`` returns a new one.

Presets
-------
``paper``  the sizes of the public keyword defaults of ``DPGMMVariationalRecurrentAutoencoder``
           (hidden 512, latent 36, K = 15, Perceiver 128 latents x 256 channels, codebook 1024x256),
           batch 8, sequence length 16. Meant for one GPU.
``cpu``    small enough that training makes visible progress on two CPU cores within half an hour.
``smoke``  tiny: a training step takes well under a second; used by the tests.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AIMEConfig", "PRESETS", "parse_overrides"]


@dataclass(frozen=True)
class AIMEConfig:
    # ----------------------------------------------------------------------------------------------
    # Data and environment
    env: str = "cheetah-run"
    image_size: int = 64                 # frames are image_size x image_size RGB; the model is built for 64
    action_repeat: int = 2               # physics steps per agent step (DMC convention)
    episode_length: int = 500            # agent steps per collected episode
    train_episodes: int = 50
    eval_episodes: int = 10              # test split: the held-out episodes of the reported evaluation
    val_episodes: int = 4                # validation split: chooses best.pt (0: the test split serves)
    policy: str = "ou"                   # behaviour policy for collection: random | ou | sine
    augment: bool = False                # frame-consistent random shift of whole windows

    # ----------------------------------------------------------------------------------------------
    # Model sizes (names follow the public keyword arguments of the model)
    max_components: int = 15             # K, truncation level of the stick-breaking mixture
    input_dim: int = 64                  # expected frame side in pixels
    latent_dim: int = 36                 # D
    hidden_dim: int = 512                # H, LSTM state size
    context_dim: int = 256               # C, Perceiver context size
    attention_dim: int = 64              # size of the attention state s_t
    action_dim: int = 6                  # A; overridden by the environment's action spec
    sequence_length: int = 16            # T of training windows
    lstm_layers: int = 1
    encoder_channels: int = 64           # base width of the NVAE encoder (doubles at each downsampling)
    decoder_channels: int = 64           # base width of the NVAE decoder
    use_spectral_norm: bool = False
    use_squeeze_excitation: bool = True
    # Residual cells only in the encoder and decoder stages whose maps are at most this many pixels on a
    # side (64: every stage, as NVAE). The cells at 32 x 32 and 16 x 16 are most of the image model's
    # multiply-adds at a given width.
    residual_cell_max_side: int = 64
    # How each decoder stage doubles the side: "nearest" (nearest-neighbour upsampling, then a 3x3 conv at
    # the new side; NVAE) or "transposed" (a 4x4 transposed conv of stride 2; DreamerV3), 16/36 of the cost.
    decoder_upsample: str = "nearest"

    # Likelihood p(x_t | z_t, h_t, A_t)
    likelihood: str = "gaussian"         # "gaussian" (docs/MODEL_CHANGES.md) | "mdl" (discretised logistic mixture)
    num_mixtures: int = 10               # logistic components per pixel (PixelCNN++ uses 10)

    # DPGMM prior
    prior_alpha_a0: float = 1.0          # Gamma(a0, b0) hyperprior on the concentration (shape, rate)
    prior_alpha_b0: float = 1.0
    kl_samples: int = 8                  # Monte Carlo samples for KL_z
    alpha_samples: int = 4               # samples of alpha for E_q(alpha) KL(Kuma || Beta(1, alpha))
    taylor_terms: int = 10               # M, Taylor terms of the Kumaraswamy-Beta KL (Nalisnick & Smyth)
    random_stick_order: bool = False

    # Perceiver IO context encoder (perceiver_io.PerceiverIOConfig is built from these)
    img_perceiver_channels: int = 64     # tokenizer conv width
    num_latent_perceiver: int = 128      # learned latents per frame
    num_latent_channels_perceiver: int = 256
    num_codebook_perceiver: int = 1024   # VQ codebook size
    perceiver_code_dim: int = 256        # VQ code dimension
    perceiver_num_heads: int = 4
    perceiver_self_attn_layers: int = 2
    perceiver_temporal_layers: int = 2
    perceiver_max_seq_len: int = 64      # longest sequence the causal temporal transformer accepts
    perceiver_recon_every: int = 1       # tokenizer reconstruction loss on every k-th frame (its decoder's cost)
    perceiver_predict_every: int = 1     # Perceiver next-token loss from every k-th position (its decoder's cost)
    perceiver_downsample: int = 4        # tokenizer stride: 64x64 frames -> (64 / k)^2 tokens per frame
    # Whether the ELBO's gradient reaches the Perceiver through c_t (MODEL.md §2.1: yes). False: the
    # posterior reads c_t detached and the Perceiver learns from its own task alone, so its parameters are
    # no longer shared between two tasks and the step walks the Perceiver's backward once, not twice.
    # cpu preset: False (benchmarks/quality.py, cheetah-run, 12 min on one core each: 881 vs 799 steps,
    # open-loop PSNR over +1..+8 25.5 vs 25.3 dB, recon 28.6 vs 28.4 dB; docs/MODEL_CHANGES.md).
    perceiver_elbo_gradient: bool = True
    # What the Perceiver's tokenizer reads: "frames", its own strided convolutions over the 64 x 64 frame
    # (MODEL.md), or "encoder", the NVAE encoder's stage map at token resolution (detached) through 1x1
    # convolutions; its decoder still reconstructs the frame. "encoder" with attention_features="encoder":
    # 0.82 of the step time, but 0.8 dB less open-loop PSNR from +8 on (docs/MODEL_CHANGES.md section 10).
    perceiver_features: str = "frames"
    # Whether the posterior q(z_t | f_t, h_t, ...) also reads the side inputs c_t (Perceiver context) and s_t
    # (attention state), as MODEL.md §2.3 has it. False: it reads f_t and h_t only, as the RSSM posterior
    # of PlaNet and DreamerV3 does; c_t and s_t then serve their own tasks (the attention posterior, whose
    # prior map FiLM-modulates the decoder) and nothing the prior cannot see reaches z.
    posterior_side_inputs: bool = True

    # Attention schema
    attention_resolution: int = 16       # R, attention maps are R x R
    num_slots: int = 4                   # S
    slot_iterations: int = 3
    # Slot attention's keys relative to their mean over the R*R positions. Without it one slot took every
    # position (slot logits ~30 apart against ~1 between positions) and the fused map was exactly uniform
    # (docs/MODEL_CHANGES.md).
    slot_center_keys: bool = False
    slot_dim: int = 64
    # What the bottom-up attention reads: "frames", its own convolutional feature pyramid over the frame
    # (MODEL.md), or "encoder", 1x1 projections of the NVAE encoder's stage maps (detached), which saves
    # the pyramid's convolutions (docs/MODEL_CHANGES.md).
    attention_features: str = "frames"

    # Temporal discriminator
    img_disc_layers: int = 4             # spatial-temporal attention blocks
    disc_num_heads: int = 4
    disc_channels: int = 64
    disc_loss: str = "hinge"             # "hinge" | "wgan-gp"
    gp_weight: float = 10.0              # WGAN-GP gradient-penalty weight
    n_critic: int = 1                    # discriminator steps per generator step
    adversarial_warmup_steps: int = 1000
    # The adversarial task and the discriminator's own steps begin at this optimiser step (VQGAN's
    # "disc_start"): before it the decoder learns from the ELBO alone and a step skips the discriminator's
    # passes; the warm-up of adversarial_warmup_steps starts here.
    adversarial_start_steps: int = 0
    feature_matching_weight: float = 1.0

    # Ablation switches (benchmarks/quality.py): each removes one pillar; max_components=1 is the
    # single-Gaussian prior and aggregator="sum" the plain sum of task gradients
    use_perceiver: bool = True           # False: no Perceiver context c_t and no Perceiver task
    use_attention: bool = True           # False: no attention schema (uniform map, no s_t, no attention task)
    use_discriminator: bool = True       # False: no adversarial task and no discriminator steps

    # ----------------------------------------------------------------------------------------------
    # KL guards of DreamerV3 (Hafner et al. 2023), docs/MODEL_CHANGES.md: KL_z is split into a term that
    # trains only the prior (posterior held fixed) and one that trains only the posterior (prior held
    # fixed), each clipped below at free_nats nats per frame, so the posterior is free to carry that much
    # information before it pays, and the prior moves towards the posterior faster than the reverse.
    free_nats: float = 1.0               # nats per frame below which KL_z costs nothing (0 disables)
    kl_prior_scale: float = 0.5          # weight of the prior-training half (DreamerV3 "dyn": 0.5)
    kl_posterior_scale: float = 0.1      # weight of the posterior-training half (DreamerV3 "rep": 0.1)

    # Observation overshooting (docs/MODEL_CHANGES.md 16): after overshoot_context filtered frames of each
    # training window, the rest of the window is imagined open loop (the prior's most probable component
    # mean, the true actions; what the evaluation does) and decoded, and overshoot_weight times its
    # -log p(x) per dimension joins the ELBO task, so the prior and the LSTM are trained for the rollouts
    # they are scored on, not only for one step from a filtered state. 0 disables (no extra cost).
    overshoot_weight: float = 0.0
    overshoot_context: int = 4
    # False: the open-loop part reads the attention prior's maps as decoder inputs without training the
    # attention schema through them (the teacher-forced ELBO and the attention task still do); the rollout
    # then keeps no graph of its per-step attention convolutions (docs/MODEL_CHANGES.md 19).
    overshoot_attention_grad: bool = True
    # False: the open-loop part trains the prior, the LSTM and the filtered context through the decoder, but
    # not the decoder's weights nor the likelihood's scale, which learn from the teacher-forced
    # reconstruction alone. Measured on walker-walk (docs/RESULTS.md 2m): the same reconstruction and 0.4-0.5 dB
    # less open-loop PSNR at equal steps, so every preset keeps True.
    overshoot_decoder_grad: bool = True

    # ----------------------------------------------------------------------------------------------
    # Loss weights (MODEL.md section 3); each is applied exactly once
    beta: float = 1.0                    # final KL weight after warm-up
    beta_warmup_steps: int = 1000
    entropy_weight: float = 0.6
    lambda_recon: float = 1.0
    lambda_att_dyn: float = 0.1
    lambda_div: float = 0.1
    lambda_gram: float = 0.05
    # Weight of the slot reconstruction objective of the attention task (AttentionSchema.
    # slot_reconstruction_loss); 0 builds no slot decoder. Off by default: at 1.0 the slots learn the frame
    # but the fused map stays uniform and open-loop PSNR over +1..+8 fell 25.65 -> 25.12 dB
    # (benchmarks/quality.py, cheetah-run, 10 min on one core; docs/RESULTS.md section 2c).
    lambda_slot_recon: float = 0.0
    ema_decay: float = 0.995

    # ----------------------------------------------------------------------------------------------
    # Optimisation (MODEL.md section 5)
    batch_size: int = 8
    learning_rate: float = 2e-4
    disc_learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 500              # linear learning-rate warm-up, then cosine decay to max_steps
    min_lr_ratio: float = 0.1            # cosine floor as a fraction of the peak learning rate
    # True: with a wall-clock budget (--minutes) the cosine's progress is the larger of step / max_steps and
    # the fraction of the budget spent, so a run that stops on its budget ends at the floor too
    # (VRNN/schedules.py WarmupCosine); its learning rates then depend on the machine's speed. Off: a
    # 25-minute cheetah-run demo whose cosine ended at the floor (max_steps 3000) predicted worse than the
    # preset's, which stops near 0.24 of the peak: 26.9 against 27.3 dB over +1..+8 (docs/MODEL_CHANGES.md 15).
    lr_follows_budget: bool = False
    max_steps: int = 100_000
    aggregator: str = "rgb"              # "rgb" | "sum" | "pcgrad"
    rgb_mu: float = 0.9
    # RGB proximity weight. MODEL.md section 5 gives lambda = 1 (the default of multi_task_learning.RGB); we
    # depart from it here. RGB normalises the task gradients before it rotates them towards a consensus in
    # which every task votes equally, so at lambda = 1 the angles settle near 0.75 rad and the ELBO's update
    # is bent towards the tiny attention and adversarial directions (cos 0.71 with its own gradient on
    # synthetic orthogonal tasks). benchmarks/aggregator_training.py, cheetah-run, cpu preset, 100 steps,
    # same data and seed, training bits/dim over the last 10 steps: 5.84 at lambda = 1 (1.44x the plain
    # sum's), 4.29 at lambda = 10 (1.06x), 4.17 with pcgrad (1.03x), 4.05 with the sum. lambda = 10 keeps
    # the angles near 0.13 rad.
    rgb_lambda: float = 10.0
    # Tasks whose gradient on the shared parameters is below this fraction of the largest are left out of
    # the aggregation and added plainly, so a task with a tiny gradient cannot rotate the others' update
    # (issue 9: the attention task's ||g|| was 0.02 against 343 for the ELBO, yet it had an equal vote).
    aggregator_min_relative_norm: float = 0.01
    rgb_alpha_steps: int = 3
    rgb_inner_lr: float = 0.2
    rgb_scale: str = "norm"              # "norm" | "unit"
    max_nonfinite_steps: int = 5         # stop after this many non-finite steps in a row
    # bf16 autocast of the training step (weights, optimiser state, likelihood, KLs and the recurrent core -
    # posterior head, LSTM, DPGMM prior - stay float32; docs/MODEL_CHANGES.md 11, 14): on CUDA,
    # and on CPUs with native bf16 (AVX512-BF16 or AMX), where convolutions run 2-4x faster; a CPU without it
    # falls back to float32 with a warning. cpu preset: on (benchmarks/quality.py, cheetah-run, 10 min on one
    # core each, with lambda_gram=0: 23 % more steps, recon 28.3 vs 27.5 dB, open-loop +1..+8 25.85 vs 25.79).
    amp: bool = False
    num_workers: int = 0

    # ----------------------------------------------------------------------------------------------
    # Logging, evaluation, checkpoints
    log_every: int = 50
    eval_every: int = 2000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3            # numbered checkpoints kept beside latest.pt and best.pt
    eval_windows: int = 64               # held-out windows per evaluation (non-overlapping; fewer if the split has fewer)
    eval_context_frames: int = 5         # T0: observed frames before open-loop prediction
    eval_horizon: int = 15               # F: imagined frames (the protocol is 5 observed + 15 imagined)
    seed: int = 0

    # ----------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        _check(self.likelihood in ("mdl", "gaussian"), "likelihood", self.likelihood, "'mdl' or 'gaussian'")
        _check(self.disc_loss in ("hinge", "wgan-gp"), "disc_loss", self.disc_loss, "'hinge' or 'wgan-gp'")
        _check(self.aggregator in ("rgb", "sum", "pcgrad"), "aggregator", self.aggregator,
               "'rgb', 'sum' or 'pcgrad'")
        _check(self.rgb_scale in ("norm", "unit"), "rgb_scale", self.rgb_scale, "'norm' or 'unit'")
        _check(self.perceiver_features in ("frames", "encoder"), "perceiver_features", self.perceiver_features,
               "'frames' or 'encoder'")
        _check(self.attention_features in ("frames", "encoder"), "attention_features", self.attention_features,
               "'frames' or 'encoder'")
        _check(self.decoder_upsample in ("nearest", "transposed"), "decoder_upsample", self.decoder_upsample,
               "'nearest' or 'transposed'")
        _check(self.residual_cell_max_side >= 0, "residual_cell_max_side", self.residual_cell_max_side,
               "0 (no residual cells) or a positive side in pixels")
        _check(self.policy in ("random", "ou", "sine"), "policy", self.policy, "'random', 'ou' or 'sine'")
        _check(self.max_components >= 1, "max_components", self.max_components, "at least 1")
        _check(self.free_nats >= 0, "free_nats", self.free_nats, "a number >= 0")
        _check(self.overshoot_weight >= 0, "overshoot_weight", self.overshoot_weight, "a number >= 0")
        _check(self.overshoot_context >= 1, "overshoot_context", self.overshoot_context,
               "a positive number of filtered frames before the open-loop part")
        _check(self.lambda_slot_recon >= 0, "lambda_slot_recon", self.lambda_slot_recon, "a number >= 0")
        _check(self.kl_prior_scale >= 0 and self.kl_posterior_scale >= 0, "kl_prior_scale/kl_posterior_scale",
               (self.kl_prior_scale, self.kl_posterior_scale), "numbers >= 0")
        _check(self.image_size % 16 == 0, "image_size", self.image_size, "a multiple of 16")
        _check(self.val_episodes >= 0, "val_episodes", self.val_episodes, "0 or a positive integer")
        _check(self.sequence_length >= 2, "sequence_length", self.sequence_length, "at least 2")
        _check(self.sequence_length <= self.perceiver_max_seq_len, "sequence_length",
               self.sequence_length, f"at most perceiver_max_seq_len={self.perceiver_max_seq_len}")
        for name in ("latent_dim", "hidden_dim", "context_dim", "attention_dim", "action_dim", "batch_size",
                     "num_slots", "attention_resolution", "kl_samples", "taylor_terms", "n_critic"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "a positive integer")
        # Intervals and counts of the training loop: 0 would divide by zero or never stop.
        for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "max_steps",
                     "max_nonfinite_steps", "eval_windows"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "a positive integer")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "0 or a positive integer")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "a positive number")
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "in [0, 1)")
        if isinstance(self.adam_betas, list):  # JSON gives lists; keep the dataclass hashable
            object.__setattr__(self, "adam_betas", tuple(self.adam_betas))

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "AIMEConfig":
        """The named preset (``paper``, ``cpu`` or ``smoke``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AIMEConfig":
        """Build from a mapping; an unknown key is a ``ValueError`` that names it and close matches."""
        known = set(cls.field_names())
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"unknown AIMEConfig field {key!r}{hint}")
        return cls(**values)

    def replace(self, **overrides: Any) -> "AIMEConfig":
        """A copy with some fields changed (validated like ``from_dict``)."""
        return self.from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> "AIMEConfig":
        """From a JSON string or the path of a JSON file."""
        text = Path(source).read_text() if _looks_like_path(source) else str(source)
        return cls.from_dict(json.loads(text))

    def diff(self, other: "AIMEConfig") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: ``{name: (self_value, other_value)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def _looks_like_path(source: str | Path) -> bool:
    return isinstance(source, Path) or not str(source).lstrip().startswith("{")


def _parse_value(text: str) -> Any:
    """'3' -> 3, '5e-4' -> 0.0005, 'true' / 'False' -> bool, anything else stays a string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Command-line overrides ``["free_nats=0", "likelihood=mdl"]`` -> ``{"free_nats": 0, "likelihood": "mdl"}``.

    Values become int, float or bool where they read as one. A malformed item or an unknown field is a
    ``ValueError`` that names it (with close matches); values are checked when a config is built from them.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    AIMEConfig.from_dict({**AIMEConfig().to_dict(), **out})     # unknown fields and bad values fail here
    return out


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"AIMEConfig.{name}={value!r} is invalid: expected {expected}")


PRESETS: dict[str, dict[str, Any]] = {
    # The sizes of the public keyword defaults; one GPU.
    "paper": {},
    # Two CPU cores, visible progress within half an hour: 16 windows of 16 frames per step (0.6-0.7 s on two
    # idle cores, benchmarks/run_all.py), so a 25-minute demo makes about 2300 steps. Windows of 16, not 8: the
    # evaluation imagines up to position 20 (5 observed + 15), and a model trained on windows of 8 never ran its
    # LSTM past position 8 (benchmarks/quality.py, cheetah-run, 10 min on one core each, same 40 sine-policy
    # test windows: open-loop PSNR at +8 / +15 24.66 / 24.35 dB for 2 x 16 against 23.94 / 24.00 for 4 x 8,
    # mean training frame 24.01 / 24.11; docs/MODEL_CHANGES.md 9). More windows than 2 since the cheaper parts
    # below made the step cheap enough (25-minute demos, MODEL_CHANGES 17: at 4 windows cheetah-run 28.6 against
    # 28.5 dB over +1..+8, walker-walk 20.2 against 20.2 dB and action shuffle at +8 1.21 against 1.13); 8 since
    # MODEL_CHANGES 18 (below).
    "cpu": dict(
        max_components=8, latent_dim=16, hidden_dim=128, context_dim=64, attention_dim=32,
        sequence_length=16, encoder_channels=16, decoder_channels=16, num_mixtures=5,
        img_perceiver_channels=16, num_latent_perceiver=16, num_latent_channels_perceiver=64,
        num_codebook_perceiver=128, perceiver_code_dim=32, perceiver_num_heads=2,
        perceiver_elbo_gradient=False,
        perceiver_self_attn_layers=1, perceiver_temporal_layers=1, perceiver_max_seq_len=32,
        num_slots=3, slot_dim=32, img_disc_layers=1, disc_num_heads=2,
        disc_channels=16, kl_samples=4, alpha_samples=2,
        # 16 windows per step at learning rate 1e-3 (8 at 5e-4 until docs/MODEL_CHANGES.md 22), with the cosine
        # to max_steps 3000 (4000): the step costs 1.6x for 2x the frames, and at the larger rate fewer,
        # larger steps learn more per minute. 25-minute cheetah-run demo: 2275 steps, +1..+8 30.28 against
        # 29.38 dB, recon 32.4 against 31.6; 16 windows at 5e-4 alone: 1995 steps, 29.25 dB.
        batch_size=16, learning_rate=1e-3,
        # bf16 autocast and no Gram anchoring (its EMA-encoder pass): 23 % more steps in the same minutes and
        # the same open-loop PSNR (benchmarks/quality.py, cheetah-run, 10 min on one core each: 863 vs 702
        # steps, +1..+8 25.85 vs 25.79 dB, recon 28.3 vs 27.5 dB; docs/MODEL_CHANGES.md section 11).
        amp=True, lambda_gram=0.0,
        # Observation overshooting and no temporal discriminator (docs/MODEL_CHANGES.md 16). 25-minute
        # cheetah-run demos, open-loop PSNR over +1..+8 / at +15: 28.4 / 26.8 dB (2839 steps) against 27.3 /
        # 25.6 for the preset before (discriminator, no overshooting); with the discriminator kept the
        # overshooting demo made 20 % fewer steps and scored 28.2 / 26.7. --discriminator puts it back.
        overshoot_weight=0.5, use_discriminator=False,
        # The cheaper parts of docs/MODEL_CHANGES.md 12, which lost long-horizon prediction without
        # overshooting but not with it (MODEL_CHANGES 17): no residual cells and transposed-conv upsampling
        # in the image model, the Perceiver and the attention on the encoder's maps, the RSSM posterior
        # q(z_t | f_t, h_t), the tokenizer's reconstruction on 1 frame in 16. 0.6 of the step time; 25-minute
        # cheetah-run demo at 2 x 16: 4000 steps (max_steps, after 23.5 minutes) against 2839, recon 30.9 against
        # 31.0 dB, +1..+8 28.5 against 28.4 dB, action shuffle 2.72 against 2.60 at +8.
        residual_cell_max_side=0, decoder_upsample="transposed", perceiver_features="encoder",
        attention_features="encoder", posterior_side_inputs=False, perceiver_recon_every=16,
        # 8 windows per step (4 until MODEL_CHANGES 18, 16 since 22) and the Perceiver's next-token loss from
        # every 4th position: 25-minute cheetah-run demo 2221 steps of 8 x 16 against 2969 of 4 x 16, +1..+8 28.76
        # against 28.60 dB, +15 27.0 against 26.8, recon 31.3 against 31.2 (docs/MODEL_CHANGES.md 18).
        perceiver_predict_every=4,
        # Attention maps of 8 x 8 (16 x 16 before) and an overshooting rollout that reads the attention
        # prior's maps without training the attention through them (docs/MODEL_CHANGES.md 19): 0.84 of the
        # step (paired in one process); 25-minute cheetah-run demo 2748 steps against 2334, +1..+8 28.84 against
        # 28.75 dB, recon 31.31 against 31.22 (the maps were uniform at both resolutions).
        attention_resolution=8, overshoot_attention_grad=False,
        # Slot attention's keys centred over positions (docs/MODEL_CHANGES.md 23): one slot had taken every
        # position and the fused map was exactly uniform; centred, the slots split the frame (cheetah: the sky,
        # the legs, the rest), and the figures are the same (cheetah-run 25-minute demo: +1..+8 30.26 against
        # 30.28 dB, recon 32.42 against 32.40; fused-map entropy 3.72 against exactly ln 64 = 4.159).
        slot_center_keys=True,
        # The Perceiver tokenizes the encoder's 8 x 8 map (64 tokens per frame) instead of its 16 x 16 map
        # (256): 0.82 of the step (docs/MODEL_CHANGES.md 20), the Perceiver having been 36 % of it while its
        # next-token accuracy equalled copying; validation at equal steps the same to 0.05 dB.
        perceiver_downsample=8,
        warmup_steps=100, beta_warmup_steps=300, adversarial_warmup_steps=500, max_steps=3000,
        # 200 training episodes (40,000 frames; about 2.5 minutes to collect on two cores) instead of 20: with
        # 20 the model replayed its training episodes, leading the mean frame by 2.4 dB over +8..+15 on
        # training windows and by 0.06 dB on test windows (walker-walk, 25-minute run); with 200 that
        # memorisation gap is 0.1 ± 0.2 dB and walker-walk's prediction beats every baseline from +1
        # (+1..+8: 20.56 dB against 19.93; docs/MODEL_CHANGES.md 21).
        train_episodes=200, eval_episodes=4, episode_length=200, log_every=10, eval_every=500,
        checkpoint_every=250, eval_windows=64, eval_context_frames=5, eval_horizon=15,
    ),
    # Seconds: used by the test suite.
    "smoke": dict(
        max_components=4, latent_dim=4, hidden_dim=16, context_dim=8, attention_dim=8,
        sequence_length=4, encoder_channels=4, decoder_channels=4, num_mixtures=2,
        use_squeeze_excitation=False, img_perceiver_channels=4, num_latent_perceiver=4,
        num_latent_channels_perceiver=8, num_codebook_perceiver=16, perceiver_code_dim=8,
        perceiver_num_heads=1, perceiver_self_attn_layers=1, perceiver_temporal_layers=1,
        perceiver_max_seq_len=16, attention_resolution=8, num_slots=2, slot_iterations=2, slot_dim=8,
        img_disc_layers=1, disc_num_heads=1, disc_channels=4, kl_samples=2, alpha_samples=1,
        taylor_terms=5, batch_size=2, warmup_steps=2, beta_warmup_steps=2, adversarial_warmup_steps=2,
        max_steps=4, train_episodes=2, eval_episodes=1, episode_length=20, log_every=1, eval_every=4,
        # Evaluation windows of 2 observed + 2 imagined frames instead of the protocol's 5 + 15: the test
        # data sets hold episodes of ~25 rows and the suite evaluates many times, so windows stay short.
        checkpoint_every=2, keep_checkpoints=2, eval_windows=2, eval_context_frames=2, eval_horizon=2,
    ),
}
