"""Shared fixtures.

``tiny_dmc_data``: a real cheetah-run dataset collected once per test session (sine policy, seed 0,
2 train, 1 validation and 1 test episode of 24 agent steps, i.e. 25 rows each, 64x64 frames, action_dim 6).
Returns the data folder holding the split folders ``train/``, ``val/`` and ``test/``; treat it as read-only.
"""

from __future__ import annotations

import pytest
import torch

TINY_EPISODE_LENGTH = 24  # tests/test_collect.py repeats this number


@pytest.fixture(scope="session")
def tiny_dmc_data(tmp_path_factory):
    from VRNN.collect_dmc import collect_dataset

    out = tmp_path_factory.mktemp("tiny_cheetah_run")
    collect_dataset("cheetah-run", out, episodes=2, eval_episodes=1, episode_length=TINY_EPISODE_LENGTH,
                    policy="sine", seed=0, action_repeat=2, progress=False, val_episodes=1)
    return out


@pytest.fixture
def one_thread():
    """One intra-op thread for the few-step training tests: on a small shared CPU, torch's default thread
    pool oversubscribes the cores and tensors this small make the threads mostly wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
