"""Behaviour policies for collecting world-model data: they ignore the frame and move the body.

Each policy is built from the environment's action spec (``.minimum``, ``.maximum``, ``.shape``) and a
``numpy.random.Generator``; ``reset()`` starts an episode, ``act() -> action [A] float32`` gives the next
action, always inside the spec bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["POLICIES", "OUPolicy", "Policy", "RandomPolicy", "SinePolicy", "make_policy"]


class Policy:
    """Base class: stores bounds; subclasses implement ``_raw_action`` in [-1, 1] units."""

    def __init__(self, action_spec: Any, rng: np.random.Generator):
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")  # noqa: TRY004
        shape = tuple(action_spec.shape)
        self.low = np.broadcast_to(np.asarray(action_spec.minimum, dtype=np.float64), shape).reshape(-1)
        self.high = np.broadcast_to(np.asarray(action_spec.maximum, dtype=np.float64), shape).reshape(-1)
        self.action_dim = int(np.prod(shape))
        self.rng = rng

    def reset(self) -> None:
        """Start a new episode (re-draws per-episode parameters)."""

    def _raw_action(self) -> np.ndarray:
        raise NotImplementedError

    def act(self, obs: np.ndarray | None = None) -> np.ndarray:
        """Next action [A] float32, mapped from [-1, 1] to the spec bounds and clipped to them."""
        unit = np.asarray(self._raw_action(), dtype=np.float64)
        action = self.low + (unit + 1.0) * 0.5 * (self.high - self.low)
        return np.clip(action, self.low, self.high).astype(np.float32)


class RandomPolicy(Policy):
    """Independent uniform actions every step: jittery, but covers the action box."""

    def _raw_action(self) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, self.action_dim)


class OUPolicy(Policy):
    """Ornstein-Uhlenbeck noise: temporally correlated actions that push limbs through large, smooth
    motions (uniform noise at action repeat 2 mostly cancels out and the body barely moves).

    x <- x + theta * (mu - x) + sigma * N(0, 1), per agent step, in [-1, 1] units.
    """

    def __init__(self, action_spec: Any, rng: np.random.Generator, theta: float = 0.15, sigma: float = 0.4):
        super().__init__(action_spec, rng)
        self.theta, self.sigma = float(theta), float(sigma)
        self.state = np.zeros(self.action_dim)

    def reset(self) -> None:
        self.state = self.rng.uniform(-1.0, 1.0, self.action_dim)

    def _raw_action(self) -> np.ndarray:
        self.state = self.state - self.theta * self.state + self.sigma * self.rng.standard_normal(self.action_dim)
        self.state = np.clip(self.state, -1.0, 1.0)
        return self.state


class SinePolicy(Policy):
    """Per-joint sinusoids with a random period (8-40 agent steps), phase and amplitude per episode:
    rhythmic gaits whose frames change steadily over time."""

    def __init__(self, action_spec: Any, rng: np.random.Generator, min_period: float = 8.0,
                 max_period: float = 40.0):
        super().__init__(action_spec, rng)
        if not 0 < min_period <= max_period:
            raise ValueError(f"need 0 < min_period <= max_period, got {min_period}, {max_period}")
        self.min_period, self.max_period = float(min_period), float(max_period)
        self.reset()

    def reset(self) -> None:
        period = self.rng.uniform(self.min_period, self.max_period, self.action_dim)
        self.omega = 2.0 * np.pi / period
        self.phase = self.rng.uniform(0.0, 2.0 * np.pi, self.action_dim)
        self.amplitude = self.rng.uniform(0.6, 1.0, self.action_dim)
        self.t = 0

    def _raw_action(self) -> np.ndarray:
        out = self.amplitude * np.sin(self.omega * self.t + self.phase)
        self.t += 1
        return out


POLICIES: dict[str, Callable[..., Policy]] = {"random": RandomPolicy, "ou": OUPolicy, "sine": SinePolicy}


def make_policy(name: str, action_spec: Any, rng: np.random.Generator) -> Policy:
    """Build a registered policy by name (``random``, ``ou``, ``sine``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; expected one of {sorted(POLICIES)}")
    return POLICIES[name](action_spec, rng)
