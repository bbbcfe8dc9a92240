"""Collection into HDF5: format, seeds, atomic episodes under interruption, resume, verify, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from VRNN import collect_dmc, hdf5_io
from VRNN.collect_dmc import collect_dataset, collect_split, split_seeds
from VRNN.hdf5_io import SCHEMA_VERSION, EpisodeWriter, open_checked, summary, verify

REPO = Path(__file__).resolve().parents[1]
TINY_EPISODE_LENGTH = 24  # tests/conftest.py collects episodes of this many agent steps


def test_tiny_dataset_format(tiny_dmc_data):
    with h5py.File(tiny_dmc_data / "train.h5", "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert f.attrs["env"] == "cheetah-run" and f.attrs["policy"] == "sine"
        assert f.attrs["camera"] == 0 and f.attrs["action_repeat"] == 2
        assert f.attrs["image_size"] == 64 and f.attrs["action_dim"] == 6
        assert list(f.attrs["seeds"]) == split_seeds(0, 2, "train")
        assert sorted(f.keys()) == ["episode_000000", "episode_000001"]
        g = f["episode_000000"]
        n = TINY_EPISODE_LENGTH + 1
        assert g["obs"].shape == (n, 64, 64, 3) and g["obs"].dtype == np.uint8
        assert g["obs"].compression == "gzip" and g["obs"].chunks[0] == 16
        assert g["action"].shape == (n, 6) and g["action"].dtype == np.float32
        assert g["reward"].shape == (n,) and g["reward"].dtype == np.float32
        for key in ("is_first", "is_last", "is_terminal"):
            assert g[key].shape == (n,) and g[key].dtype == bool
        assert g["is_first"][0] and not g["is_first"][1:].any()
        assert g["is_last"][-1] and not g["is_last"][:-1].any()
        # RLDS rows: the last row carries no action and no reward
        assert np.all(g["action"][-1] == 0) and g["reward"][-1] == 0
        assert np.abs(g["action"][:-1]).sum() > 0
        frames = g["obs"][()].astype(np.float32)
        assert np.abs(np.diff(frames, axis=0)).mean() > 1.0
        ep0, ep1 = frames, f["episode_000001"]["obs"][()].astype(np.float32)
        assert np.abs(ep0[-1] - ep1[-1]).mean() > 0.5  # different seeds give different episodes
    assert verify(tiny_dmc_data / "train.h5") == []
    assert verify(tiny_dmc_data / "eval.h5") == []


def test_train_and_eval_seeds_are_disjoint(tiny_dmc_data):
    with h5py.File(tiny_dmc_data / "train.h5", "r") as f:
        train = set(f.attrs["seeds"].tolist())
    with h5py.File(tiny_dmc_data / "eval.h5", "r") as f:
        held_out = set(f.attrs["seeds"].tolist())
    assert train and held_out and not train & held_out
    for seed in (0, 1, 21473):
        a, b = set(split_seeds(seed, 100_000, "train")), set(split_seeds(seed, 100_000, "eval"))
        assert not a & b and max(b) < 2 ** 32
    assert not set(split_seeds(0, 100_000, "train")) & set(split_seeds(1, 100_000, "train"))
    with pytest.raises(ValueError, match="seed must be in"):
        split_seeds(-1, 3, "train")


def test_episodes_are_reproducible_from_their_seed(tmp_path, tiny_dmc_data):
    seed = split_seeds(0, 2, "train")[1]
    collect_split(tmp_path / "one.h5", "cheetah-run", [seed], TINY_EPISODE_LENGTH, "sine", progress=False)
    with h5py.File(tmp_path / "one.h5", "r") as a, h5py.File(tiny_dmc_data / "train.h5", "r") as b:
        assert np.array_equal(a["episode_000000"]["obs"][()], b["episode_000001"]["obs"][()])
        assert np.array_equal(a["episode_000000"]["action"][()], b["episode_000001"]["action"][()])


def test_interrupted_collection_keeps_finished_episodes(tmp_path, monkeypatch):
    real = collect_dmc.collect_episode
    calls = {"episodes": 0}

    def interrupting(env, policy, seed, bar=None):
        calls["episodes"] += 1
        if calls["episodes"] < 2:
            return real(env, policy, seed, bar)
        original_step = env.step
        count = {"n": 0}

        def step(action):
            count["n"] += 1
            if count["n"] == 5:
                raise KeyboardInterrupt
            return original_step(action)

        env.step = step
        return real(env, policy, seed, bar)

    monkeypatch.setattr(collect_dmc, "collect_episode", interrupting)
    path = tmp_path / "train.h5"
    with pytest.raises(KeyboardInterrupt):
        collect_split(path, "cheetah-run", split_seeds(0, 3, "train"), 12, "ou", progress=False)
    assert verify(path) == []
    info = summary(path)
    assert info["episodes"] == 1 and info["rows"] == 13
    with h5py.File(path, "r") as f:
        assert list(f.attrs["seeds"]) == split_seeds(0, 1, "train")
    # re-running appends the missing episodes instead of starting over
    monkeypatch.setattr(collect_dmc, "collect_episode", real)
    with h5py.File(path, "r") as f:
        first = f["episode_000000"]["obs"][()]
    collect_split(path, "cheetah-run", split_seeds(0, 3, "train"), 12, "ou", progress=False)
    assert verify(path) == [] and summary(path)["episodes"] == 3
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["episode_000000"]["obs"][()], first)
        assert list(f.attrs["seeds"]) == split_seeds(0, 3, "train")


def test_interrupt_inside_the_hdf5_write_leaves_no_partial_group(tmp_path, monkeypatch):
    attrs = {"env": "cheetah-run", "camera": 0, "action_repeat": 2, "policy": "random", "image_size": 8,
             "action_dim": 2}
    episode = {"obs": np.zeros((5, 8, 8, 3), np.uint8), "action": np.zeros((5, 2)), "reward": np.zeros(5),
               "is_first": np.eye(5, dtype=bool)[0], "is_last": np.eye(5, dtype=bool)[-1],
               "is_terminal": np.zeros(5, bool)}
    path = tmp_path / "x.h5"
    with EpisodeWriter(path, attrs) as w:
        w.write_episode(episode, seed=1)
    real_move = h5py.Group.move

    def broken_move(self, source, dest):
        raise KeyboardInterrupt

    monkeypatch.setattr(h5py.Group, "move", broken_move)
    with pytest.raises(KeyboardInterrupt), EpisodeWriter(path, attrs) as w:
        w.write_episode(episode, seed=2)
    monkeypatch.setattr(h5py.Group, "move", real_move)
    with h5py.File(path, "r") as f:
        assert any(k.startswith(hdf5_io.TEMP_PREFIX) for k in f)  # the stray group exists ...
    assert verify(path) == [] and summary(path)["episodes"] == 1    # ... but readers ignore it
    with EpisodeWriter(path, attrs) as w:                            # and writers clean it up
        assert w.num_episodes == 1
        w.write_episode(episode, seed=3)
    with h5py.File(path, "r") as f:
        assert sorted(f.keys()) == ["episode_000000", "episode_000001"]
        assert list(f.attrs["seeds"]) == [1, 3]


def test_complete_files_are_skipped_and_mismatches_refused(tmp_path, tiny_dmc_data):
    import shutil

    out = tmp_path / "data"
    shutil.copytree(tiny_dmc_data, out)
    before = (out / "train.h5").stat().st_mtime_ns, (out / "train.h5").read_bytes()
    collect_dataset("cheetah_run", out, 2, 1, TINY_EPISODE_LENGTH, "sine", 0, progress=False)
    assert (out / "train.h5").read_bytes() == before[1]
    with pytest.raises(ValueError, match="policy"):
        collect_dataset("cheetah-run", out, 2, 1, TINY_EPISODE_LENGTH, "ou", 0, progress=False)
    with pytest.raises(ValueError, match="seeds"):
        collect_dataset("cheetah-run", out, 2, 1, TINY_EPISODE_LENGTH, "sine", 1, progress=False)
    collect_dataset("cheetah_run", out, 1, 1, TINY_EPISODE_LENGTH, "sine", 0, progress=False)  # fewer: kept
    assert (out / "train.h5").read_bytes() == before[1]
    collect_dataset("cheetah-run", out, 1, 1, 6, "ou", 0, progress=False, overwrite=True)
    assert summary(out / "train.h5")["rows"] == 7 and summary(out / "train.h5")["policy"] == "ou"


def test_verify_reports_problems(tmp_path, tiny_dmc_data):
    assert "not found" in verify(tmp_path / "missing.h5")[0]
    (tmp_path / "text.h5").write_text("hello")
    assert "not an HDF5 file" in verify(tmp_path / "text.h5")[0]
    import shutil

    bad = tmp_path / "bad.h5"
    shutil.copy(tiny_dmc_data / "eval.h5", bad)
    with h5py.File(bad, "a") as f:
        f.attrs["schema_version"] = 99
    assert "schema_version" in verify(bad)[0]
    with pytest.raises(ValueError, match="schema_version"):
        open_checked(bad)
    shutil.copy(tiny_dmc_data / "train.h5", bad)
    with h5py.File(bad, "a") as f:
        flags = f["episode_000000"]["is_first"][()]
        flags[3] = True
        f["episode_000000"]["is_first"][...] = flags
        del f["episode_000001"]["reward"]
        f["episode_000001"]["reward"] = np.zeros(4, np.float32)
        del f.attrs["policy"]
    problems = "\n".join(verify(bad))
    assert "missing file attributes: ['policy']" in problems
    assert "episode_000000: is_first must be True exactly at row 0, found at rows [0, 3]" in problems
    assert "episode_000001/obs: shape (25, 64, 64, 3), expected (4, 64, 64, 3)" in problems
    # a truncated file is reported, not a traceback
    trunc = tmp_path / "trunc.h5"
    data = (tiny_dmc_data / "train.h5").read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    assert verify(trunc), "a truncated file must not verify clean"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_cli_help_documents_every_flag():
    result = _run("VRNN/collect_dmc.py", "--help")
    assert result.returncode == 0
    for flag in ("--env", "--episodes", "--eval-episodes", "--episode-length", "--policy", "--seed", "--out",
                 "--action-repeat", "--overwrite", "verify"):
        assert flag in result.stdout


def test_cli_collect_and_verify_end_to_end(tmp_path):
    out = tmp_path / "walker"
    result = _run("VRNN/collect_dmc.py", "--env", "dmc_walker_walk", "--episodes", "1", "--eval-episodes", "1",
                  "--episode-length", "6", "--policy", "random", "--seed", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    ok = _run("VRNN/collect_dmc.py", "verify", str(out / "train.h5"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "episodes=1" in ok.stdout and "steps=6" in ok.stdout and "action_dim=6" in ok.stdout
    assert "walker-walk" in ok.stdout
    (tmp_path / "junk.h5").write_bytes(b"\0" * 100)
    bad = _run("VRNN/collect_dmc.py", "verify", str(tmp_path / "junk.h5"))
    assert bad.returncode == 1 and "not an HDF5 file" in bad.stdout
    unknown = _run("VRNN/collect_dmc.py", "--env", "walkr-walk", "--out", str(tmp_path / "x"))
    assert unknown.returncode == 2 and "walker-walk" in unknown.stderr
