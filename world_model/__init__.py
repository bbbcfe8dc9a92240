"""AIME world model: the public facade. Pure re-exports of the canonical objects in ``VRNN``.

>>> from world_model import DPGMMVariationalRecurrentAutoencoder, AIMEConfig
>>> model = DPGMMVariationalRecurrentAutoencoder.from_config(AIMEConfig.preset("smoke"), action_dim=6)

See ``world_model/README.md`` for building, one training step, imagination and checkpoints.
"""

from VRNN.aime_config import PRESETS, AIMEConfig
from VRNN.attention_schema import AttentionSchema
from VRNN.dpgmm_prior import DPGMMPrior
from VRNN.dpgmm_stickbreaking_prior_vrnn import TASK_LOSS_KEYS, DPGMMVariationalRecurrentAutoencoder
from VRNN.ema import ModelEMA
from VRNN.likelihoods import LIKELIHOODS, DiscretizedGaussian, DiscretizedLogisticMixture
from VRNN.nvae import NVAEDecoder, NVAEEncoder
from VRNN.perceiver import CausalPerceiverIO, PerceiverIOConfig
from VRNN.stick_breaking import Kumaraswamy, kl_gamma, kl_kumaraswamy_beta, stick_breaking_weights
from VRNN.temporal_discriminator import TemporalDiscriminator
from VRNN.vrnn_cell import VRNNCell
from VRNN.vrnn_utilities import CheckpointError

__all__ = [
    "LIKELIHOODS",
    "PRESETS",
    "TASK_LOSS_KEYS",
    "AIMEConfig",
    "AttentionSchema",
    "CausalPerceiverIO",
    "CheckpointError",
    "DPGMMPrior",
    "DPGMMVariationalRecurrentAutoencoder",
    "DiscretizedGaussian",
    "DiscretizedLogisticMixture",
    "Kumaraswamy",
    "ModelEMA",
    "NVAEDecoder",
    "NVAEEncoder",
    "PerceiverIOConfig",
    "TemporalDiscriminator",
    "VRNNCell",
    "kl_gamma",
    "kl_kumaraswamy_beta",
    "stick_breaking_weights",
]
