"""Every import path of docs/MIGRATION_GUIDE.md works and gives the canonical object (not a copy)."""

import importlib

import pytest

# (old module, name, canonical module)
PATHS = [
    ("VRNN.RGB", "RGB", "multi_task_learning"),
    ("VRNN.lstm", "LSTMLayer", "temporal_dynamics"),
    ("VRNN.perceiver", "CausalPerceiverIO", "perceiver_io"),
    ("VRNN.perceiver", "PerceiverIOConfig", "perceiver_io"),
    ("VRNN.dpgmm_stickbreaking_prior_vrnn", "DPGMMVariationalRecurrentAutoencoder", "world_model"),
    ("VRNN.dmc_vb_transition_dynamics_trainer", "DMCVBTrainer", "training"),
    ("VRNN.dmc_vb_transition_dynamics_trainer", "DMCVBDataset", "training"),
    ("multi_task_learning.rgb_optimizer", "RGB", "multi_task_learning"),
    ("temporal_dynamics.lstm", "LSTMLayer", "temporal_dynamics"),
]


@pytest.mark.parametrize("old, name, canonical", PATHS)
def test_old_path_gives_canonical_object(old, name, canonical):
    old_obj = getattr(importlib.import_module(old), name)
    new_obj = getattr(importlib.import_module(canonical), name)
    assert old_obj is new_obj
