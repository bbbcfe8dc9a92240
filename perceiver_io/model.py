"""`CausalPerceiverIO`: VQ tokenizer + per-frame Perceiver + causal temporal transformer + next-frame
token decoder (MODEL.md §2.1).

Data flow for a video [B,T,3,H,W] in [-1,1] (N = B*T frames, h = w = H/4 tokens per side, K codes):

    frames [N,3,H,W] --tokenizer--> codes [N,D,h,w] (straight-through), indices [N,h,w]
    codes --FrameEncoder--> e [N,C], frame latents [N,L,E], token embeddings [N,h*w,E]
    e viewed [B,T,C] --CausalTemporalTransformer--> c [B,T,C]          (the only mixing across time)
    (c_t, latents_t, tokens_t), t < T --decoder--> logits for x_{t+1} [B,T-1,h*w,K]

The convolutional and attention work runs once, batched over all frames (MODEL.md §6); only the
temporal transformer sees the time axis, through a causal mask, so c_t depends on x_1..x_t only.

Losses (all means, so they read per pixel / per token): ``recon`` (L1 or MSE of the tokenizer's
reconstruction on [-1,1]), ``commitment`` (already times `commitment_weight`), ``next_token_ce``
(cross-entropy of the codes of x_{t+1}, t = 1..T-1, targets are integer indices and carry no gradient);
``total = recon + commitment + next_token_weight * next_token_ce``.

Codebook: updated (EMA) only by `forward` / `compute_loss` when the module is in training mode AND
autograd is enabled. `extract_context`, `predict_next_frames`, `generate`, eval mode and any call under
`torch.no_grad()` leave it untouched.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perceiver_io.config import PerceiverIOConfig
from perceiver_io.decoder import NextFrameTokenDecoder
from perceiver_io.encoder import CausalTemporalTransformer, FrameEncoder
from perceiver_io.tokenizer import VQTokenizer

__all__ = ["CausalPerceiverIO"]

logger = logging.getLogger(__name__)

# Float frames may exceed [-1, 1] by this much (resampling / augmentation round-off) before we refuse them.
_RANGE_TOLERANCE = 1e-3


class CausalPerceiverIO(nn.Module):
    """Causal Perceiver IO context encoder and next-frame token predictor.

    Args:
        config: a `PerceiverIOConfig` (default: the paper sizes).
        validate_range: check that float inputs are finite and within [-1, 1] (one device sync per call).

    Inputs everywhere are videos [B,T,3,H,W] (H = W = `config.image_size`), float in [-1,1] or uint8 in
    [0,255] (mapped to [-1,1] by x/127.5 - 1), with 1 <= T <= `config.max_seq_len`. With
    `config.feature_channels` > 0 every call that tokenizes also takes ``features`` [B,T,F,h,w] (F =
    feature_channels, h = w = tokens_per_side), the map the tokenizer reads instead of the pixels; the
    video is still needed for the reconstruction loss and its shape checks.
    """

    def __init__(self, config: PerceiverIOConfig | None = None, validate_range: bool = True) -> None:
        super().__init__()
        config = PerceiverIOConfig() if config is None else config
        if not isinstance(config, PerceiverIOConfig):
            raise ValueError(  # noqa: TRY004 -- the project contract: public boundaries raise ValueError
                f"config must be a PerceiverIOConfig, got {type(config).__name__}; "
                "use PerceiverIOConfig.from_aime_config(aime_config) to convert")
        self.config = config
        self.validate_range = validate_range
        self.tokenizer = VQTokenizer(config)
        self.frame_encoder = FrameEncoder(config)
        self.temporal = CausalTemporalTransformer(config)
        self.decoder = NextFrameTokenDecoder(config)

    # ------------------------------------------------------------------------------------------------
    # Public API
    def forward(self, video: Tensor, features: Tensor | None = None) -> dict[str, Tensor]:
        """Context and losses in one pass (the world model's entry point; tokenizes once).

        video [B,T,3,H,W], T >= 2 -> dict(``context`` [B,T,C] (c_t depends on x_1..x_t, differentiable),
        ``total``, ``recon``, ``commitment``, ``next_token_ce``, ``accuracy`` (fraction of next-frame
        tokens whose argmax code is right, no grad), ``copy_accuracy`` (the same for the guess "frame t+1
        has frame t's codes", the baseline ``accuracy`` must beat), ``codebook_perplexity`` (exp entropy of
        this batch's code usage, no grad)); all but ``context`` are scalars. Updates the codebook when training.
        The next-token terms cover source positions 0, k, 2k, ... < T - 1 (k = ``predict_every``; 1: all;
        docs/MODEL_CHANGES.md 18), the reconstruction frames 0, r, 2r, ... (r = ``recon_every``).
        """
        video = self._prepare(video, min_frames=2)
        b, t = video.shape[:2]
        frames = video.flatten(0, 1)                                                # [N,3,H,W]
        update = self.training and torch.is_grad_enabled()
        enc = self._encode_frames(self._tokenizer_input(frames, features, b, t), b, t, update=update)
        every = self.config.recon_every                                            # frames 0, k, 2k, ...
        recon = self.tokenizer.decode(enc["quantized"][::every])                    # [N/k,3,H,W]
        recon_loss = self.tokenizer.recon_loss(recon, frames[::every])
        sources = slice(0, t - 1, self.config.predict_every)                          # positions 0, k, 2k, ...
        logits = self._decode_logits(enc, b, t, sources)                            # [B,S,hw,K]
        indices = enc["indices"].view(b, t, -1)
        targets = indices[:, 1:][:, sources]                                        # [B,S,hw]: codes of x_{s+1}
        ce = F.cross_entropy(logits.flatten(0, 2), targets.flatten(),
                             label_smoothing=self.config.label_smoothing)
        accuracy = (logits.detach().argmax(-1) == targets).float().mean()
        copy_accuracy = (indices[:, :-1][:, sources] == targets).float().mean()
        total = recon_loss + enc["commitment"] + self.config.next_token_weight * ce
        return {"context": enc["context"], "total": total, "recon": recon_loss,
                "commitment": enc["commitment"], "next_token_ce": ce, "accuracy": accuracy,
                "copy_accuracy": copy_accuracy, "codebook_perplexity": enc["perplexity"]}

    def compute_loss(self, video: Tensor, features: Tensor | None = None) -> dict[str, Tensor]:
        """video [B,T,3,H,W], T >= 2 -> dict(total, recon, commitment, next_token_ce, accuracy,
        copy_accuracy, codebook_perplexity), scalars; `forward` without the context."""
        out = self.forward(video, features)
        out.pop("context")
        return out

    def extract_context(self, video: Tensor, features: Tensor | None = None) -> Tensor:
        """video [B,T,3,H,W] -> c [B,T,C]; c_t depends on x_1..x_t only. Differentiable (the tokenizer's
        straight-through codes pass gradients to its encoder); never updates the codebook."""
        video = self._prepare(video, min_frames=1)
        b, t = video.shape[:2]
        inputs = self._tokenizer_input(video.flatten(0, 1), features, b, t)
        return self._encode_frames(inputs, b, t, update=False)["context"]

    def next_token_logits(self, video: Tensor, features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """video [B,T,3,H,W] -> (logits [B,T,h*w,K] for the tokens of x_{t+1} given x_{<=t},
        indices [B,T,h,w] of the frames' own codes). Never updates the codebook."""
        video = self._prepare(video, min_frames=1)
        b, t = video.shape[:2]
        enc = self._encode_frames(self._tokenizer_input(video.flatten(0, 1), features, b, t), b, t, update=False)
        side = self.config.tokens_per_side
        return self._decode_logits(enc, b, t, slice(0, t)), enc["indices"].view(b, t, side, side)

    @torch.no_grad()
    def encode_tokens(self, video: Tensor, features: Tensor | None = None) -> Tensor:
        """video [B,T,3,H,W] -> codebook indices [B,T,h,w] (int64)."""
        video = self._prepare(video, min_frames=1)
        b, t = video.shape[:2]
        indices = self.tokenizer.encode(self._tokenizer_input(video.flatten(0, 1), features, b, t),
                                        update=False)["indices"]
        return indices.view(b, t, *indices.shape[1:])

    @torch.no_grad()
    def decode_tokens(self, indices: Tensor) -> Tensor:
        """Codebook indices [B,T,h,w] -> frames [B,T,3,H,W] clamped to [-1,1]."""
        side = self.config.tokens_per_side
        if indices.dim() != 4 or tuple(indices.shape[2:]) != (side, side):
            raise ValueError(f"expected indices of shape [B,T,{side},{side}], got {tuple(indices.shape)}")
        b, t = indices.shape[:2]
        frames = self.tokenizer.decode_indices(indices.flatten(0, 1)).clamp(-1.0, 1.0)
        return frames.view(b, t, *frames.shape[1:])

    @torch.no_grad()
    def predict_next_frames(self, video: Tensor, features: Tensor | None = None) -> Tensor:
        """video [B,T,3,H,W] -> predictions [B,T,3,H,W] in [-1,1]: row t is x_{t+1} predicted from
        x_{<=t} (argmax codes, decoded); the last row predicts the frame after the clip."""
        logits, _ = self.next_token_logits(video, features)                                   # [B,T,hw,K]
        side = self.config.tokens_per_side
        b, t = logits.shape[:2]
        return self.decode_tokens(logits.argmax(-1).view(b, t, side, side))

    @torch.no_grad()
    def generate(self, context_video: Tensor, n_frames: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None, features: Tensor | None = None) -> Tensor:
        """Autoregressive rollout: context_video [B,T0,3,H,W] -> n_frames new frames [B,n,3,H,W] in [-1,1].

        Each new frame's tokens are predicted in parallel over positions from the contexts so far, then
        fed back as codes (not re-encoded pixels). ``temperature`` 0 takes the argmax code; > 0 samples
        from softmax(logits / temperature) with ``generator``. Once the sequence exceeds `max_seq_len`,
        the temporal transformer sees the last `max_seq_len` frames (a sliding window).
        """
        if not isinstance(n_frames, int) or n_frames < 1:
            raise ValueError(f"n_frames must be a positive integer, got {n_frames!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        video = self._prepare(context_video, min_frames=1)
        b, t0 = video.shape[:2]
        side, window = self.config.tokens_per_side, self.config.max_seq_len
        enc = self.tokenizer.encode(self._tokenizer_input(video.flatten(0, 1), features, b, t0), update=False)
        e, latents, tokens = self.frame_encoder(enc["quantized"])                    # from [B*T0,D,h,w]
        current = enc["indices"].view(b, t0, -1)[:, -1]                             # [B,hw]
        embeddings = list(e.view(b, t0, -1).unbind(1))                              # T0 x [B,C]
        latents, tokens = latents.view(b, t0, *latents.shape[1:])[:, -1], tokens.view(b, t0, *tokens.shape[1:])[:, -1]
        new_indices = []
        for _ in range(n_frames):
            context = self.temporal(torch.stack(embeddings[-window:], dim=1))[:, -1]  # [B,C]
            logits = self.decoder(context, latents, tokens, current)                # [B,hw,K]
            if temperature == 0:
                idx = logits.argmax(-1)                                             # [B,hw]
            else:
                probs = F.softmax(logits.float() / temperature, dim=-1).flatten(0, 1)
                idx = torch.multinomial(probs, 1, generator=generator).view(b, -1)
            current = idx
            idx = idx.view(b, side, side)
            new_indices.append(idx)
            e_new, latents, tokens = self.frame_encoder(self.tokenizer.quantizer.lookup(idx))
            embeddings.append(e_new)
        return self.decode_tokens(torch.stack(new_indices, dim=1))                 # [B,n,3,H,W]

    # ------------------------------------------------------------------------------------------------
    # Internals
    def _tokenizer_input(self, frames: Tensor, features: Tensor | None, b: int, t: int) -> Tensor:
        """What the tokenizer's encoder reads: frames [N,3,H,W] (N = b*t), or with
        `config.feature_channels` > 0 the checked ``features`` [B,T,F,h,w] flattened to [N,F,h,w]."""
        cfg = self.config
        if cfg.feature_channels == 0:
            if features is not None:
                raise ValueError("features were passed, but this Perceiver tokenizes pixels "
                                 "(PerceiverIOConfig.feature_channels=0)")
            return frames
        side = cfg.tokens_per_side
        expected = (b, t, cfg.feature_channels, side, side)
        if features is None:
            raise ValueError(f"this Perceiver tokenizes feature maps (feature_channels={cfg.feature_channels});"
                             f" pass features of shape [B,T,F,h,w] = {list(expected)}")
        if not isinstance(features, Tensor) or tuple(features.shape) != expected:
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features must have shape [B,T,F,h,w] = {list(expected)}, got {got}")
        return features.flatten(0, 1).to(frames.dtype)

    def _encode_frames(self, inputs: Tensor, b: int, t: int, update: bool) -> dict[str, Tensor]:
        """inputs [N,...] (frames or feature maps, `_tokenizer_input`), N = b*t -> tokenizer outputs plus
        e, latents, tokens, context [B,T,C]."""
        enc = self.tokenizer.encode(inputs, update=update)
        e, latents, tokens = self.frame_encoder(enc["quantized"])                   # [N,C], [N,L,E], [N,hw,E]
        enc.update(latents=latents, tokens=tokens, context=self.temporal(e.view(b, t, -1)))
        return enc

    def _decode_logits(self, enc: dict[str, Tensor], b: int, t: int, sources: slice) -> Tensor:
        """Logits for x_{s+1} from c_s, the latents and tokens of x_s, for the S positions s of ``sources``
        (0-based, a slice of range(t)) -> [B,S,hw,K]."""
        context = enc["context"][:, sources].flatten(0, 1)                         # [B*S,C]
        latents = enc["latents"].view(b, t, *enc["latents"].shape[1:])[:, sources].flatten(0, 1)
        tokens = enc["tokens"].view(b, t, *enc["tokens"].shape[1:])[:, sources].flatten(0, 1)
        indices = enc["indices"].view(b, t, -1)[:, sources].flatten(0, 1)          # [B*S,hw]
        logits = self.decoder(context, latents, tokens, indices)                    # [B*S,hw,K]
        return logits.view(b, -1, *logits.shape[1:])

    def _prepare(self, video: Tensor, min_frames: int) -> Tensor:
        """Validate a video [B,T,3,H,W] and return it as float in [-1,1] on the model's device dtype."""
        cfg = self.config
        expected = f"[B,T,{cfg.in_channels},{cfg.image_size},{cfg.image_size}]"
        if not isinstance(video, Tensor):
            raise ValueError(f"video must be a torch.Tensor {expected}, got {type(video).__name__}")  # noqa: TRY004
        if video.dim() != 5:
            raise ValueError(f"video must have 5 dims {expected}, got shape {tuple(video.shape)}")
        _, t, c, h, w = video.shape
        if c != cfg.in_channels or h != cfg.image_size or w != cfg.image_size:
            raise ValueError(f"video must be {expected}, got shape {tuple(video.shape)}")
        if video.shape[0] < 1:
            raise ValueError(f"video has an empty batch: shape {tuple(video.shape)}")
        if t < min_frames:
            raise ValueError(f"this call needs at least {min_frames} frames, got T={t}")
        if t > cfg.max_seq_len:
            raise ValueError(f"T={t} frames exceeds max_seq_len={cfg.max_seq_len}; "
                             "raise PerceiverIOConfig.max_seq_len (perceiver_max_seq_len)")
        if video.dtype == torch.uint8:
            return video.float() / 127.5 - 1.0
        if not video.is_floating_point():
            raise ValueError(f"video must be float in [-1,1] or uint8 in [0,255], got dtype {video.dtype}")
        if self.validate_range:
            bad = ~torch.isfinite(video) | (video.abs() > 1.0 + _RANGE_TOLERANCE)
            if bool(bad.any()):
                finite = video[torch.isfinite(video)]
                lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (float("nan"),) * 2
                raise ValueError(f"float video must be finite and within [-1,1]; got range [{lo:.3f}, {hi:.3f}]"
                                 f"{' with non-finite values' if not bool(torch.isfinite(video).all()) else ''}")
        return video
