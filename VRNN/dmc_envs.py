"""DeepMind Control Suite tasks as pixel environments for world-model data collection.

Every dm_control suite domain-task pair is available under several spellings (``cheetah-run``,
``cheetah_run``, ``dmc_cheetah_run``). Names are matched against the known pairs as a whole, never by
splitting on ``_``, because domains (``ball_in_cup``, ``point_mass``) and tasks (``turn_easy``,
``swingup_sparse``) contain underscores themselves.

Rendering is headless: ``MUJOCO_GL=egl`` is set at import time when the user has not chosen a backend,
which must happen before dm_control (and with it the OpenGL bindings) is imported; dm_control is
therefore only imported inside functions.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

__all__ = ["DMCEnv", "EnvSpec", "all_env_names", "apply_fast_render", "make_env", "resolve_env_name"]

logger = logging.getLogger(__name__)

# Camera 0 is the suite's tracking camera for most domains; quadruped's camera 0 is a fixed far view in
# which the body is a few pixels tall at 64x64, so (like Dreamer and DMC-VB) its egocentric camera 2.
_CAMERA_OVERRIDES: dict[str, int] = {"quadruped": 2}
_DEFAULT_CAMERA = 0


@dataclass(frozen=True)
class EnvSpec:
    """A resolved suite task: ``name`` is the canonical ``domain-task`` spelling."""

    domain: str
    task: str
    name: str
    camera: int


@functools.lru_cache(maxsize=1)
def _known_pairs() -> tuple[tuple[str, str], ...]:
    from dm_control import suite  # lazy: importing dm_control starts the GL bindings

    return tuple(suite.ALL_TASKS)


@functools.lru_cache(maxsize=1)
def _lookup() -> dict[str, tuple[str, str]]:
    """Normalised key ``domain_task`` -> (domain, task); keys are unique (checked in tests)."""
    table: dict[str, tuple[str, str]] = {}
    for domain, task in _known_pairs():
        table[f"{domain}_{task}".lower()] = (domain, task)
    return table


def all_env_names() -> list[str]:
    """Canonical ``domain-task`` names of every suite task, sorted."""
    return sorted(f"{d}-{t}" for d, t in _known_pairs())


def _normalise(name: str) -> str:
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    for prefix in ("dmc_", "dm_control_"):
        key = key.removeprefix(prefix)
    return key


def resolve_env_name(name: str) -> EnvSpec:
    """``cheetah-run`` / ``cheetah_run`` / ``dmc_cheetah_run`` -> EnvSpec(domain, task, name, camera).

    Raises ValueError naming the unknown task and the closest known names.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"environment name must be a non-empty string like 'cheetah-run', got {name!r}")
    table = _lookup()
    key = _normalise(name)
    if key not in table:
        close = difflib.get_close_matches(key, list(table), n=5, cutoff=0.5)
        hint = ", ".join("-".join(table[c]) for c in close) if close else "none"
        raise ValueError(
            f"unknown DMC environment {name!r}; close matches: {hint}. "
            f"Known tasks: {len(table)} suite pairs (see dmc_envs.all_env_names())."
        )
    domain, task = table[key]
    return EnvSpec(domain, task, f"{domain}-{task}", _CAMERA_OVERRIDES.get(domain, _DEFAULT_CAMERA))


def apply_fast_render(physics: Any, image_size: int | None = None) -> None:
    """No shadow map and no multisampling: 64x64 frames need neither, and on software GL they dominate
    the render time (measured ~17 ms -> ~3 ms per cheetah frame on llvmpipe EGL). With ``image_size``
    the offscreen framebuffer also shrinks from 640x480 to that size. Must run before the first render,
    because the rendering context reads these values when it is created."""
    physics.model.vis.quality.shadowsize = 0
    physics.model.vis.quality.offsamples = 0
    if image_size is not None:
        physics.model.vis.global_.offwidth = int(image_size)
        physics.model.vis.global_.offheight = int(image_size)


class DMCEnv:
    """A suite task with pixel observations, action repeat and a fixed episode length.

    ``reset(seed=None) -> obs`` uint8 [S,S,3]; ``step(action [A]) -> (obs [S,S,3] uint8, reward float
    (sum over the action repeat), is_last bool, is_terminal bool)``. ``is_last`` is True after
    ``episode_length`` agent steps or when the task ends; ``is_terminal`` only when the task ended with
    discount 0 (a true terminal state, rare in the suite).
    """

    def __init__(self, spec: EnvSpec, seed: int, episode_length: int = 500, action_repeat: int = 2,
                 image_size: int = 64):
        for label, value in (("episode_length", episode_length), ("action_repeat", action_repeat),
                             ("image_size", image_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        from dm_control import suite

        self.spec = spec
        self.episode_length = int(episode_length)
        self.action_repeat = int(action_repeat)
        self.image_size = int(image_size)
        # The suite's own time limit is lifted: the episode length is counted here in agent steps.
        self._env = suite.load(spec.domain, spec.task,
                               task_kwargs={"random": int(seed), "time_limit": float("inf")})
        self.physics = self._env.physics
        apply_fast_render(self.physics, self.image_size)
        self._camera = None  # built at the first render, then reused: a new Camera per frame allocates
        # a fresh MjvScene, which costs about as much as the render itself at 64x64
        self.action_spec = self._env.action_spec()
        self.action_dim = int(np.prod(self.action_spec.shape))
        self._steps = 0
        self._needs_reset = True

    @property
    def name(self) -> str:
        return self.spec.name

    def render(self) -> np.ndarray:
        """The current frame, uint8 [S,S,3]."""
        if self._camera is None:
            from dm_control.mujoco.engine import Camera

            self._camera = Camera(self.physics, self.image_size, self.image_size, self.spec.camera)
        frame = self._camera.render()
        return np.ascontiguousarray(frame, dtype=np.uint8)

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode; with ``seed`` the task's initial-state randomness is re-seeded first, so an
        episode depends only on its seed (and the policy's actions)."""
        if seed is not None:
            self._env.task.random.seed(int(seed))
        self._env.reset()
        self._steps = 0
        self._needs_reset = False
        return self.render()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:
        if self._needs_reset:
            raise RuntimeError("DMCEnv.step() called before reset() or after the episode ended")
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape[0] != self.action_dim:
            raise ValueError(f"action for {self.name} must have {self.action_dim} entries, got {action.shape[0]}")
        reward = 0.0
        terminal = False
        ended = False
        for _ in range(self.action_repeat):
            ts = self._env.step(action)
            reward += float(ts.reward or 0.0)
            if ts.last():
                ended = True
                terminal = ts.discount is not None and float(ts.discount) == 0.0
                break
        self._steps += 1
        is_last = ended or self._steps >= self.episode_length
        self._needs_reset = is_last
        return self.render(), reward, bool(is_last), bool(terminal)

    def close(self) -> None:
        self._camera = None
        self._env.close()


def make_env(name: str, seed: int, episode_length: int = 500, action_repeat: int = 2,
             image_size: int = 64) -> DMCEnv:
    """Build the pixel environment for any spelling of a suite task name (see ``resolve_env_name``)."""
    return DMCEnv(resolve_env_name(name), seed, episode_length, action_repeat, image_size)
