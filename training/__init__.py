"""AIME training: the public facade. Pure re-exports of the canonical objects in ``VRNN``.

>>> from training import DMCVBTrainer, DMCVBDataset

See ``training/README.md`` for training from Python, resuming, data parallelism and the run directory.
"""

from VRNN.dmc_vb_transition_dynamics_trainer import (
                                                     DMCVBDataset,
                                                     DMCVBTrainer,
                                                     NonFiniteTrainingError,
                                                     TrainResult,
)

__all__ = ["DMCVBDataset", "DMCVBTrainer", "NonFiniteTrainingError", "TrainResult"]
