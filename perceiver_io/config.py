"""`PerceiverIOConfig`: the hyperparameters of the causal Perceiver IO context encoder (MODEL.md §2.1).

Defaults are the paper sizes (the public keyword defaults of the world model: 128 latents x 256 channels,
codebook 1024 x 256). The world model builds this config from its own `AIMEConfig` with
`PerceiverIOConfig.from_aime_config`, which reads fields by name so that this package imports nothing of
the project.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["POSITION_ENCODINGS", "RECON_LOSSES", "PerceiverIOConfig"]

# Names accepted by `recon_loss` and `position_encoding`; the implementations live in tokenizer.py and
# encoder.py (registries keyed by these names).
RECON_LOSSES = ("l1", "mse")
POSITION_ENCODINGS = ("fourier", "learned")

# AIMEConfig field -> PerceiverIOConfig field (the mapping fixed by the project's interface contract).
_AIME_FIELDS = {
    "image_size": "image_size",
    "img_perceiver_channels": "tokenizer_channels",
    "perceiver_code_dim": "code_dim",
    "num_codebook_perceiver": "num_codes",
    "num_latent_perceiver": "num_latents",
    "num_latent_channels_perceiver": "latent_channels",
    "context_dim": "context_dim",
    "perceiver_num_heads": "num_heads",
    "perceiver_self_attn_layers": "num_self_attn_layers",
    "perceiver_temporal_layers": "num_temporal_layers",
    "perceiver_max_seq_len": "max_seq_len",
}
# Read when present (newer fields; older configs without them take the PerceiverIOConfig default).
_OPTIONAL_AIME_FIELDS = {"perceiver_recon_every": "recon_every", "perceiver_downsample": "downsample",
                         "perceiver_predict_every": "predict_every"}


@dataclass(frozen=True)
class PerceiverIOConfig:
    # Frames
    image_size: int = 64                 # H = W of the input frames, pixels
    in_channels: int = 3
    downsample: int = 4                  # tokenizer stride: 64x64 frames -> 16x16 tokens (a power of 2)

    # Tokenizer (conv encoder / EMA vector quantiser / conv decoder)
    tokenizer_channels: int = 64         # conv width at full resolution; doubles once per stride-2 stage
    num_res_blocks: int = 1              # residual blocks at token resolution, in encoder and decoder
    code_dim: int = 256                  # D of a codebook vector
    num_codes: int = 1024                # K codebook entries
    commitment_weight: float = 0.25      # VQ-VAE beta (van den Oord et al. 2017)
    ema_decay: float = 0.99              # codebook EMA decay (VQ-VAE-2 / Jukebox use 0.99)
    ema_epsilon: float = 1e-5            # Laplace smoothing of the EMA cluster sizes
    dead_code_threshold: float = 0.1     # a code whose EMA usage (vectors per batch) falls below this is
                                         # restarted from a batch vector (Jukebox); 0 disables restarts.
                                         # 0.1 at decay 0.99: ~230 unused updates (1.0 churned targets)
    codebook_seed: int = 0               # seeds the choice of batch vectors that initialise the codebook
    recon_loss: str = "l1"               # "l1" | "mse", on pixels in [-1, 1]
    # The tokenizer's reconstruction loss on every k-th frame of a batch only: its decoder (back to full
    # resolution) is the Perceiver's largest cost, and a quarter of the frames train it about as well.
    recon_every: int = 1
    # 0: the tokenizer's conv encoder reads the frames. > 0: it reads a feature map [N, feature_channels,
    # h, w] at token resolution that the caller passes (``features=``, e.g. a world model's own encoder
    # map), through 1x1 convolutions and `feature_res_blocks` residual blocks only; the decoder still
    # reconstructs the frames. Saves the strided convolutions over the full-resolution frame.
    feature_channels: int = 0
    feature_res_blocks: int = 0

    # Per-frame Perceiver encoder
    num_latents: int = 128               # learned latents per frame
    latent_channels: int = 256           # width of latents, token embeddings and decoder queries
    num_heads: int = 4                   # heads of every attention layer (divides latent_channels, context_dim)
    num_self_attn_layers: int = 2        # latent self-attention layers after the cross-attention
    position_encoding: str = "fourier"   # 2-D token position encoding: "fourier" (fixed bands) | "learned"
    fourier_bands: int = 8               # frequency bands per axis of the Fourier position encoding
    mlp_ratio: int = 4                   # hidden width of every transformer MLP, as a multiple of its input
    dropout: float = 0.0

    # Causal temporal transformer
    context_dim: int = 256               # C, size of e_t and c_t
    num_temporal_layers: int = 2
    max_seq_len: int = 64                # longest T accepted (learned positional embedding rows)

    # Next-frame token decoder
    num_decoder_layers: int = 1          # cross-attention blocks of the output queries
    query_from_current_tokens: bool = True  # add a conv of x_t's token embeddings around cell p to the
                                         # query of p (a local copy prior: tokens persist or move a little)
    query_kernel_size: int = 3           # that conv's kernel (odd; 3 covers a one-token displacement)
    copy_prior: bool = True              # learned gain on the logit of x_t's own code at each cell
    copy_logit_init: float | None = None  # its initial value in nats; None: ln(num_codes), so that with
                                         # uniform head logits the copy guess starts at probability ~1/2
    # The next-token cross-entropy from every k-th position of a window only (sources 0, k, 2k, ...): the
    # decoder's 256 queries per frame are most of the Perceiver's FLOPs; the context still covers every frame.
    predict_every: int = 1
    label_smoothing: float = 0.0         # of the next-token cross-entropy
    next_token_weight: float = 1.0       # weight of the next-token cross-entropy inside `total`

    def __post_init__(self) -> None:
        positive = ("image_size", "in_channels", "downsample", "tokenizer_channels", "code_dim", "num_codes",
                    "num_latents", "latent_channels", "num_heads", "context_dim", "max_seq_len",
                    "fourier_bands", "mlp_ratio", "num_decoder_layers", "query_kernel_size", "predict_every")
        for name in positive:
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "a positive integer")
        _check(self.recon_every >= 1, "recon_every", self.recon_every, "a positive integer")
        for name in ("num_res_blocks", "num_self_attn_layers", "num_temporal_layers", "feature_channels",
                     "feature_res_blocks"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 0, name, value, "a non-negative integer")
        _check(self.query_kernel_size % 2 == 1, "query_kernel_size", self.query_kernel_size, "odd")
        d = self.downsample
        _check(d >= 2 and d & (d - 1) == 0, "downsample", d, "a power of 2, at least 2")
        _check(self.image_size % d == 0, "image_size", self.image_size, f"a multiple of downsample={d}")
        _check(self.num_codes >= 2, "num_codes", self.num_codes, "at least 2")
        _check(self.latent_channels % self.num_heads == 0, "num_heads", self.num_heads,
               f"a divisor of latent_channels={self.latent_channels}")
        _check(self.context_dim % self.num_heads == 0, "num_heads", self.num_heads,
               f"a divisor of context_dim={self.context_dim}")
        _check(self.recon_loss in RECON_LOSSES, "recon_loss", self.recon_loss, f"one of {RECON_LOSSES}")
        _check(self.position_encoding in POSITION_ENCODINGS, "position_encoding", self.position_encoding,
               f"one of {POSITION_ENCODINGS}")
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "in [0, 1)")
        _check(self.ema_epsilon > 0, "ema_epsilon", self.ema_epsilon, "positive")
        _check(self.commitment_weight >= 0, "commitment_weight", self.commitment_weight, "non-negative")
        _check(self.dead_code_threshold >= 0, "dead_code_threshold", self.dead_code_threshold, "non-negative")
        _check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "in [0, 1)")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")
        _check(self.next_token_weight >= 0, "next_token_weight", self.next_token_weight, "non-negative")

    @property
    def tokens_per_side(self) -> int:
        """h = w of the token grid (image_size / downsample)."""
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        """Tokens per frame, h * w."""
        return self.tokens_per_side ** 2

    @classmethod
    def from_aime_config(cls, aime_config: Any, **overrides: Any) -> PerceiverIOConfig:
        """Build from any object with the world model's field names (an `AIMEConfig`, a namespace, ...).

        Reads ``image_size, img_perceiver_channels, perceiver_code_dim, num_codebook_perceiver,
        num_latent_perceiver, num_latent_channels_perceiver, context_dim, perceiver_num_heads,
        perceiver_self_attn_layers, perceiver_temporal_layers, perceiver_max_seq_len``, and when present
        ``perceiver_recon_every, perceiver_downsample, perceiver_predict_every``; ``overrides``
        (PerceiverIOConfig field names) win.
        """
        missing = [name for name in _AIME_FIELDS if not hasattr(aime_config, name)]
        if missing:
            raise ValueError(f"{type(aime_config).__name__} lacks the Perceiver fields {missing}")
        values = {ours: getattr(aime_config, theirs) for theirs, ours in _AIME_FIELDS.items()}
        values.update({ours: getattr(aime_config, theirs) for theirs, ours in _OPTIONAL_AIME_FIELDS.items()
                       if hasattr(aime_config, theirs)})
        values.update(overrides)
        return cls(**values)

    def replace(self, **overrides: Any) -> PerceiverIOConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"PerceiverIOConfig.{name}={value!r} is invalid: expected {expected}")
