"""Compatibility facade: the Perceiver IO context encoder lives in the top-level `perceiver_io` package.

Pure re-exports (the objects are the canonical ones), plus the submodules under their old-style names so
that ``from VRNN.perceiver.model import CausalPerceiverIO`` keeps working too.
"""

import sys as _sys

from perceiver_io import CausalPerceiverIO as CausalPerceiverIO
from perceiver_io import CausalTemporalTransformer as CausalTemporalTransformer
from perceiver_io import ConvDecoder as ConvDecoder
from perceiver_io import ConvEncoder as ConvEncoder
from perceiver_io import EMAVectorQuantizer as EMAVectorQuantizer
from perceiver_io import FrameEncoder as FrameEncoder
from perceiver_io import NextFrameTokenDecoder as NextFrameTokenDecoder
from perceiver_io import PerceiverIOConfig as PerceiverIOConfig
from perceiver_io import VQTokenizer as VQTokenizer
from perceiver_io import config, decoder, encoder, model, tokenizer

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

# Register the submodules under this package's name so that `import VRNN.perceiver.model` finds them
# (the same module objects, not copies).
for _name, _module in {"config": config, "decoder": decoder, "encoder": encoder, "model": model,
                       "tokenizer": tokenizer}.items():
    _sys.modules.setdefault(f"{__name__}.{_name}", _module)
