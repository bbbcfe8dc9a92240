"""Environment registry, pixel wrapper and behaviour policies (real dm_control rendering, few steps)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from VRNN.dmc_envs import all_env_names, make_env, resolve_env_name
from VRNN.policies import POLICIES, make_policy


def test_mujoco_gl_default_is_set():
    assert os.environ.get("MUJOCO_GL")  # set by VRNN.dmc_envs at import when the user had not


@pytest.mark.parametrize("name, domain, task", [
    ("cheetah-run", "cheetah", "run"),
    ("cheetah_run", "cheetah", "run"),
    ("dmc_cheetah_run", "cheetah", "run"),
    ("humanoid_walk", "humanoid", "walk"),
    ("ball_in_cup-catch", "ball_in_cup", "catch"),
    ("ball_in_cup_catch", "ball_in_cup", "catch"),
    ("finger_turn_easy", "finger", "turn_easy"),
    ("point_mass_easy", "point_mass", "easy"),
    ("Walker-Walk", "walker", "walk"),
])
def test_names_resolve(name, domain, task):
    spec = resolve_env_name(name)
    assert (spec.domain, spec.task) == (domain, task)
    assert spec.name == f"{domain}-{task}"


def test_registry_covers_every_suite_task_and_keys_are_unambiguous():
    from dm_control import suite

    names = all_env_names()
    assert len(names) == len(suite.ALL_TASKS) == len(set(names))
    for domain, task in suite.ALL_TASKS:
        for spelling in (f"{domain}-{task}", f"{domain}_{task}", f"dmc_{domain}_{task}"):
            spec = resolve_env_name(spelling)
            assert (spec.domain, spec.task) == (domain, task)


def test_cameras():
    assert resolve_env_name("quadruped-walk").camera == 2
    assert resolve_env_name("walker-walk").camera == 0


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError) as err:
        resolve_env_name("cheeta-rnu")
    message = str(err.value)
    assert "cheeta-rnu" in message and "cheetah-run" in message
    with pytest.raises(ValueError, match="close matches: none"):
        resolve_env_name("zzzzzzzz")
    with pytest.raises(ValueError):
        resolve_env_name("")


def test_env_api_episode_length_and_reward_sum():
    env = make_env("cheetah_run", seed=1, episode_length=5, action_repeat=3)
    try:
        obs = env.reset()
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
        assert env.action_dim == 6
        assert np.all(env.action_spec.minimum == -1) and np.all(env.action_spec.maximum == 1)
        lasts = []
        for _ in range(5):
            obs, reward, is_last, is_terminal = env.step(np.zeros(6))
            assert obs.shape == (64, 64, 3) and isinstance(reward, float) and not is_terminal
            lasts.append(is_last)
        assert lasts == [False] * 4 + [True]
        with pytest.raises(RuntimeError):
            env.step(np.zeros(6))
        env.reset()
        with pytest.raises(ValueError, match="6 entries"):
            env.step(np.zeros(3))
    finally:
        env.close()


def test_action_repeat_sums_rewards():
    # The same state and action with repeat 1 twice vs repeat 2 once: summed rewards agree.
    a = make_env("cartpole-balance", seed=3, episode_length=4, action_repeat=1)
    b = make_env("cartpole-balance", seed=3, episode_length=2, action_repeat=2)
    try:
        a.reset(seed=11)
        b.reset(seed=11)
        action = np.array([0.3])
        r1 = a.step(action)[1] + a.step(action)[1]
        obs_b, r2, _, _ = b.step(action)
        assert r2 == pytest.approx(r1, rel=1e-6)
        assert np.array_equal(a.render(), obs_b)
    finally:
        a.close()
        b.close()


def test_reset_seed_is_reproducible_and_seeds_differ():
    env = make_env("walker-walk", seed=0, episode_length=3)
    try:
        first = env.reset(seed=5)
        env.step(np.ones(env.action_dim) * 0.5)
        again = env.reset(seed=5)
        other = env.reset(seed=6)
        assert np.array_equal(first, again)
        assert not np.array_equal(first, other)
    finally:
        env.close()


def _frames(policy_name: str, steps: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    env = make_env("cheetah-run", seed=seed, episode_length=steps)
    try:
        policy = make_policy(policy_name, env.action_spec, np.random.default_rng(seed))
        policy.reset()
        frames = [env.reset(seed=seed)]
        actions = []
        for _ in range(steps):
            action = policy.act(frames[-1])
            actions.append(action)
            frames.append(env.step(action)[0])
        return np.stack(frames).astype(np.float32), np.stack(actions)
    finally:
        env.close()


def test_policies_move_the_body_and_differ():
    results = {name: _frames(name) for name in POLICIES}
    for name, (frames, actions) in results.items():
        motion = np.abs(np.diff(frames, axis=0)).mean()
        assert motion > 1.0, f"{name}: frames barely change over time (mean abs diff {motion:.3f})"
        assert actions.dtype == np.float32 and np.all(np.abs(actions) <= 1.0)
    last = {name: frames[-1] for name, (frames, _) in results.items()}
    names = sorted(last)
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            assert np.abs(last[p] - last[q]).mean() > 1.0, f"{p} and {q} end in the same frame"


class _Spec:
    def __init__(self, low, high):
        self.minimum, self.maximum = np.asarray(low, float), np.asarray(high, float)
        self.shape = self.minimum.shape


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_respect_bounds_and_are_seeded(name):
    spec = _Spec([-0.5, 0.0, -2.0], [0.5, 3.0, -1.0])
    p1 = make_policy(name, spec, np.random.default_rng(7))
    p2 = make_policy(name, spec, np.random.default_rng(7))
    p1.reset()
    p2.reset()
    a1 = np.stack([p1.act() for _ in range(200)])
    a2 = np.stack([p2.act() for _ in range(200)])
    assert np.array_equal(a1, a2)
    assert np.all(a1 >= spec.minimum) and np.all(a1 <= spec.maximum)
    spread = a1.max(0) - a1.min(0)
    assert np.all(spread > 0.3 * (spec.maximum - spec.minimum)), f"{name} covers too little of the range"


def test_sine_policy_is_periodic_per_joint():
    spec = _Spec([-1, -1], [1, 1])
    policy = make_policy("sine", spec, np.random.default_rng(0))
    acts = np.stack([policy.act() for _ in range(400)])
    # each joint oscillates: many sign changes, and the two joints have different periods or phases
    for j in range(2):
        assert (np.diff(np.sign(acts[:, j])) != 0).sum() >= 10
    assert not np.allclose(acts[:, 0], acts[:, 1])


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy 'brownian'"):
        make_policy("brownian", _Spec([-1], [1]), np.random.default_rng(0))


def test_fast_render_settings_are_applied():
    env = make_env("cheetah-run", seed=0, episode_length=2)
    try:
        assert env.physics.model.vis.quality.shadowsize == 0
        assert env.physics.model.vis.quality.offsamples == 0
    finally:
        env.close()


def test_reused_camera_renders_what_physics_render_gives():
    env = make_env("walker-walk", seed=0, episode_length=3)
    try:
        env.reset(seed=2)
        env.step(np.full(env.action_dim, 0.7))
        frame = env.render()
        reference = env.physics.render(64, 64, camera_id=env.spec.camera)
        assert np.array_equal(frame, reference)
    finally:
        env.close()
