"""Causal Perceiver IO over vector-quantised frame tokens: the AIME context encoder c_t (MODEL.md §2.1).

>>> from perceiver_io import CausalPerceiverIO, PerceiverIOConfig
>>> model = CausalPerceiverIO(PerceiverIOConfig())
>>> out = model(video)               # video [B,T,3,64,64] in [-1,1] -> context [B,T,C] and the losses

Imports torch only; nothing of the rest of the project.
"""

from perceiver_io.config import PerceiverIOConfig
from perceiver_io.decoder import NextFrameTokenDecoder
from perceiver_io.encoder import CausalTemporalTransformer, FrameEncoder
from perceiver_io.model import CausalPerceiverIO
from perceiver_io.tokenizer import ConvDecoder, ConvEncoder, EMAVectorQuantizer, VQTokenizer

__all__ = [
    "CausalPerceiverIO",
    "CausalTemporalTransformer",
    "ConvDecoder",
    "ConvEncoder",
    "EMAVectorQuantizer",
    "FrameEncoder",
    "NextFrameTokenDecoder",
    "PerceiverIOConfig",
    "VQTokenizer",
]
