"""Collection into split folders: format, seeds, whole episodes under interruption, resume, verify, repair,
old single-file splits (loading and convert), bad input, CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from VRNN import collect_dmc, hdf5_io
from VRNN.collect_dmc import collect_dataset, collect_split, split_seeds, unfinished_splits
from VRNN.dmc_dataset import DMCVBDataset
from VRNN.hdf5_check import check_split, convert_legacy, repair, verify
from VRNN.hdf5_io import (
    SCHEMA_VERSION,
    DataFileError,
    EpisodeWriter,
    Split,
    find_splits,
    open_checked,
    summary,
)

REPO = Path(__file__).resolve().parents[1]
TINY_EPISODE_LENGTH = 24  # tests/conftest.py collects episodes of this many agent steps
ATTRS = {"env": "cheetah-run", "camera": 0, "action_repeat": 2, "policy": "random", "image_size": 8, "action_dim": 2}


def _episode(n: int = 5, size: int = 8, action_dim: int = 2, mark: int = 0) -> dict[str, np.ndarray]:
    obs = np.full((n, size, size, 3), mark, np.uint8)
    obs[:, 0, 0, 1] = np.arange(n)
    return {"obs": obs, "action": np.full((n, action_dim), mark, np.float32), "reward": np.arange(n, dtype=np.float32),
            "is_first": np.eye(n, dtype=bool)[0], "is_last": np.eye(n, dtype=bool)[-1], "is_terminal": np.zeros(n, bool)}


def write_legacy(path: Path, episodes: list[dict], seeds: list[int], attrs: dict = ATTRS) -> Path:
    """An old single-file split (schema version 1), exactly as the previous writer laid it out."""
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = 1
        f.attrs["seeds"] = np.asarray(seeds, np.int64)
        for key, value in attrs.items():
            f.attrs[key] = value
        for i, (episode, seed) in enumerate(zip(episodes, seeds, strict=False)):
            g = f.create_group(f"episode_{i:06d}")
            g.create_dataset("obs", data=episode["obs"], chunks=(min(16, len(episode["obs"])), *episode["obs"].shape[1:]),
                             compression="gzip")
            for key in ("action", "reward", "is_first", "is_last", "is_terminal"):
                g.create_dataset(key, data=episode[key])
            g.attrs["seed"] = seed
    return path


def test_tiny_dataset_format(tiny_dmc_data):
    assert find_splits(tiny_dmc_data) == hdf5_io.DataSplits(*(tiny_dmc_data / s for s in ("train", "val", "test")))
    files = sorted(p.name for p in (tiny_dmc_data / "train").glob("ep_*.h5"))
    assert files == ["ep_000000.h5", "ep_000001.h5"]
    with h5py.File(tiny_dmc_data / "train" / "ep_000000.h5", "r") as g:
        assert g.attrs["schema_version"] == SCHEMA_VERSION == 2
        assert g.attrs["env"] == "cheetah-run" and g.attrs["policy"] == "sine" and g.attrs["split"] == "train"
        assert g.attrs["camera"] == 0 and g.attrs["action_repeat"] == 2
        assert g.attrs["image_size"] == 64 and g.attrs["action_dim"] == 6
        assert g.attrs["index"] == 0 and g.attrs["seed"] == split_seeds(0, 1, "train")[0]
        assert g.attrs["split_episodes"] == 2 and g.attrs["episode_length"] == TINY_EPISODE_LENGTH
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
        ep0 = g["obs"][()].astype(np.float32)
    assert np.abs(np.diff(ep0, axis=0)).mean() > 1.0
    ep1 = Split(tiny_dmc_data / "train").read(1)["obs"].astype(np.float32)
    assert np.abs(ep0[-1] - ep1[-1]).mean() > 0.5  # different seeds give different episodes
    for split in ("train", "val", "test"):
        assert verify(tiny_dmc_data / split) == []
    assert not list((tiny_dmc_data / "train").glob(".*.tmp"))


def test_three_splits_have_disjoint_seeds(tiny_dmc_data):
    seeds = {s: set(Split(tiny_dmc_data / s).seeds) for s in ("train", "val", "test")}
    assert all(seeds.values())
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    for seed in (0, 1, 21473):
        a = set(split_seeds(seed, 100_000, "train"))
        b, c = set(split_seeds(seed, 50_000, "test")), set(split_seeds(seed, 50_000, "val"))
        assert not a & b and not a & c and not b & c and max(b | c) < 2 ** 32
    assert split_seeds(3, 4, "eval") == split_seeds(3, 4, "test")  # the old eval.h5 seeds are the test seeds
    assert not set(split_seeds(0, 50_000, "val")) & set(split_seeds(1, 50_000, "test"))
    with pytest.raises(ValueError, match="seed must be in"):
        split_seeds(-1, 3, "train")
    with pytest.raises(ValueError, match="val episode count"):
        split_seeds(0, 50_001, "val")


def test_episodes_are_reproducible_from_their_seed(tmp_path, tiny_dmc_data):
    seed = split_seeds(0, 2, "train")[1]
    collect_split(tmp_path / "one", "cheetah-run", [seed], TINY_EPISODE_LENGTH, "sine", progress=False)
    a, b = Split(tmp_path / "one").read(0), Split(tiny_dmc_data / "train").read(1)
    assert np.array_equal(a["obs"], b["obs"]) and np.array_equal(a["action"], b["action"])


def test_interrupted_collection_keeps_finished_episodes_and_resumes(tmp_path, monkeypatch):
    real = collect_dmc.collect_episode
    calls = {"episodes": 0}

    def interrupting(env, policy, seed, bar=None, stop=None):
        calls["episodes"] += 1
        if calls["episodes"] < 2:
            return real(env, policy, seed, bar, stop)
        original_step = env.step
        count = {"n": 0}

        def step(action):
            count["n"] += 1
            if count["n"] == 5:
                raise KeyboardInterrupt
            return original_step(action)

        env.step = step
        return real(env, policy, seed, bar, stop)

    monkeypatch.setattr(collect_dmc, "collect_episode", interrupting)
    path = tmp_path / "train"
    with pytest.raises(KeyboardInterrupt):
        collect_split(path, "cheetah-run", split_seeds(0, 3, "train"), 12, "ou", progress=False)
    assert verify(path) == []
    info = summary(path)
    assert info["episodes"] == 1 and info["rows"] == 13 and info["seeds"] == split_seeds(0, 1, "train")
    assert unfinished_splits(tmp_path, 3, 0, 0) == ["train"]
    monkeypatch.setattr(collect_dmc, "collect_episode", real)
    first = (path / "ep_000000.h5").read_bytes()
    collect_split(path, "cheetah-run", split_seeds(0, 3, "train"), 12, "ou", progress=False)
    assert verify(path) == [] and summary(path)["episodes"] == 3
    assert (path / "ep_000000.h5").read_bytes() == first  # finished episodes are never rewritten
    assert Split(path).seeds == split_seeds(0, 3, "train")
    assert unfinished_splits(tmp_path, 3, 0, 0) == []


def test_interrupt_inside_the_write_leaves_no_partial_episode(tmp_path, monkeypatch):
    path = tmp_path / "split"
    with EpisodeWriter(path, ATTRS) as w:
        w.write_episode(_episode(), seed=1, index=0)
    real_fsync = os.fsync

    def broken_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(hdf5_io.os, "fsync", broken_fsync)
    with pytest.raises(KeyboardInterrupt), EpisodeWriter(path, ATTRS) as w:
        w.write_episode(_episode(), seed=2, index=1)
    monkeypatch.setattr(hdf5_io.os, "fsync", real_fsync)
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".lock")) == ["ep_000000.h5"]
    # a temporary file left by a hard kill is ignored by readers and removed by the next writer
    (path / ".ep_000001.h5.999.tmp").write_bytes(b"half an episode")
    assert verify(path) == [] and summary(path)["episodes"] == 1
    assert "temporary file" in check_split(path).notes[0]
    with EpisodeWriter(path, ATTRS) as w:
        w.write_episode(_episode(), seed=3, index=1)
        with pytest.raises(FileExistsError, match="never overwritten"):
            w.write_episode(_episode(), seed=4, index=1)
    assert not list(path.glob(".*.tmp")) and Split(path).seeds == [1, 3]
    with EpisodeWriter(path, ATTRS), pytest.raises(DataFileError, match="another process"):
        EpisodeWriter(path, ATTRS)  # one writer per folder


def test_complete_splits_are_skipped_and_mismatches_refused(tmp_path, tiny_dmc_data):
    out = tmp_path / "data"
    shutil.copytree(tiny_dmc_data, out)
    before = {p: p.read_bytes() for p in out.rglob("ep_*.h5")}
    collect_dataset("cheetah_run", out, 2, 1, TINY_EPISODE_LENGTH, "sine", 0, progress=False, val_episodes=1)
    assert {p: p.read_bytes() for p in out.rglob("ep_*.h5")} == before
    with pytest.raises(ValueError, match="policy='sine', not 'ou'.*--overwrite"):
        collect_dataset("cheetah-run", out, 2, 1, TINY_EPISODE_LENGTH, "ou", 0, progress=False, val_episodes=1)
    with pytest.raises(ValueError, match=r"has seed .*\(another --seed"):
        collect_dataset("cheetah-run", out, 2, 1, TINY_EPISODE_LENGTH, "sine", 1, progress=False, val_episodes=1)
    collect_dataset("cheetah_run", out, 1, 1, TINY_EPISODE_LENGTH, "sine", 0, progress=False, val_episodes=1)
    assert {p: p.read_bytes() for p in out.rglob("ep_*.h5")} == before  # fewer requested: all kept
    splits = collect_dataset("cheetah-run", out, 1, 1, 6, "ou", 0, progress=False, overwrite=True, val_episodes=0)
    assert splits.validation == splits.test == out / "test"
    assert summary(out / "train")["rows"] == 7 and summary(out / "train")["policy"] == "ou"


def test_verify_reports_problems(tmp_path, tiny_dmc_data):
    assert "not found" in verify(tmp_path / "missing")[0]
    (tmp_path / "text.h5").write_text("hello")
    assert "not an HDF5 file" in verify(tmp_path / "text.h5")[0]
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dmc_data / "train", bad)
    with h5py.File(bad / "ep_000000.h5", "a") as f:
        flags = f["is_first"][()]
        flags[3] = True
        f["is_first"][...] = flags
    with h5py.File(bad / "ep_000001.h5", "a") as f:
        del f["reward"]
        f["reward"] = np.zeros(4, np.float32)
    shutil.copy(bad / "ep_000001.h5", bad / "ep_000002.h5")
    check = check_split(bad)
    problems = "\n".join(check.problems)
    assert "ep_000000.h5: is_first must be True exactly at row 0, found at rows [0, 3]" in problems
    assert "ep_000001.h5/obs: shape (25, 64, 64, 3), expected (4, 64, 64, 3)" in problems
    assert "ep_000002.h5: attribute index is 1, the file name says 2" in problems
    assert [p.name for p in check.damaged] == ["ep_000000.h5", "ep_000001.h5", "ep_000002.h5"]
    with h5py.File(bad / "ep_000000.h5", "a") as f:
        f.attrs["schema_version"] = 99
    assert "schema_version is 99, expected 2" in verify(bad)[0]
    # a truncated episode file is reported by name, not a traceback
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_dmc_data / "train", trunc)
    data = (trunc / "ep_000001.h5").read_bytes()
    (trunc / "ep_000001.h5").write_bytes(data[: len(data) // 2])
    problems = verify(trunc)
    assert len(problems) == 1 and problems[0].startswith("ep_000001.h5:"), problems
    with pytest.raises(DataFileError, match=r"ep_000001.h5 is damaged .*collect_dmc.py repair"):
        DMCVBDataset(trunc, 4)


def test_repair_moves_damaged_episodes_aside_and_collection_refills_them(tmp_path, tiny_dmc_data):
    out = tmp_path / "data"
    shutil.copytree(tiny_dmc_data, out)
    good = (out / "train" / "ep_000000.h5").read_bytes()
    (out / "train" / "ep_000001.h5").write_bytes(good[:1000])
    (out / "train" / ".ep_000002.h5.1.tmp").write_bytes(b"x")
    with pytest.raises(DataFileError, match="ep_000001.h5 is damaged"):
        collect_dataset("cheetah-run", out, 2, 1, TINY_EPISODE_LENGTH, "sine", 0, progress=False, val_episodes=1)
    moved, removed = repair(out / "train")
    assert [p.name for p in moved] == ["ep_000001.h5"] and moved[0].parent.name == "damaged"
    assert [p.name for p in removed] == [".ep_000002.h5.1.tmp"]
    assert verify(out / "train") == [] and "missing episode indices [1]" in check_split(out / "train").notes[0]
    assert unfinished_splits(out, 2, 1, 1) == ["train"]
    collect_dataset("cheetah-run", out, 2, 1, TINY_EPISODE_LENGTH, "sine", 0, progress=False, val_episodes=1)
    assert verify(out / "train") == [] and Split(out / "train").seeds == split_seeds(0, 2, "train")
    assert np.array_equal(Split(out / "train").read(1)["obs"], Split(tiny_dmc_data / "train").read(1)["obs"])
    with pytest.raises(DataFileError, match="convert"):
        repair(tmp_path / "old.h5")


def test_old_single_file_splits_load_and_convert(tmp_path):
    episodes = [_episode(5, mark=1), _episode(6, mark=2), _episode(5, mark=2), _episode(7, mark=3)]
    # the damage the old writer could leave: a duplicated episode (same seed) and a seeds list one short
    old = write_legacy(tmp_path / "train.h5", episodes, seeds=[10, 11, 11, 12])
    with h5py.File(old, "a") as f:
        f.attrs["seeds"] = np.asarray([10, 11, 11], np.int64)
    write_legacy(tmp_path / "eval.h5", [_episode(5, mark=9)], seeds=[99])
    assert find_splits(tmp_path) == hdf5_io.DataSplits(old, tmp_path / "eval.h5", tmp_path / "eval.h5")
    ds = DMCVBDataset(old, 4, scale="uint8")
    assert ds.episode_lengths == [5, 6, 5, 7] and ds.image_size == 8 and len(ds) == 2 + 3 + 2 + 4
    problems = "\n".join(verify(old))
    assert "seeds has 3 entries for 4 episodes" in problems and "episode_000002: duplicate of episode_000001" in problems
    with open_checked(old) as f:
        assert f.attrs["schema_version"] == 1
    written, skipped = convert_legacy(old, tmp_path / "train")
    assert written == 3 and skipped == ["episode_000002 (duplicate seed 11)"]
    new = Split(tmp_path / "train")
    assert new.indices == [0, 1, 3] and new.seeds == [10, 11, 12] and verify(tmp_path / "train") == []
    for i, j in ((0, 0), (1, 1), (2, 3)):
        for key, value in new.read(i).items():
            assert np.array_equal(value, episodes[j][key]), key
    # an interrupted conversion resumes; a folder of other episodes is refused
    kept = (tmp_path / "train" / "ep_000000.h5").read_bytes()
    (tmp_path / "train" / "ep_000003.h5").unlink()
    assert convert_legacy(old, tmp_path / "train") == (1, ["episode_000002 (duplicate seed 11)"])
    assert Split(tmp_path / "train").indices == [0, 1, 3] and (tmp_path / "train" / "ep_000000.h5").read_bytes() == kept
    with pytest.raises(DataFileError, match="not converted from"):
        convert_legacy(tmp_path / "eval.h5", tmp_path / "train")
    # with a train/ folder present the folder layout takes precedence only once test/ exists too
    result = _run("VRNN/collect_dmc.py", "convert", str(tmp_path / "eval.h5"), str(tmp_path / "test"))
    assert result.returncode == 0 and "1 episodes" in result.stdout
    assert find_splits(tmp_path) == hdf5_io.DataSplits(tmp_path / "train", tmp_path / "test", tmp_path / "test")
    with pytest.raises(ValueError, match="old single-file dataset.*convert"):
        collect_dataset("cheetah-run", tmp_path, 1, 1, 6, "ou", 0, progress=False)


def test_disk_full_keeps_finished_episodes(tmp_path):
    env = {**os.environ, "AIME_DATA_FAULT": "mid_write:2:enospc"}
    out = tmp_path / "data"
    result = _run("VRNN/collect_dmc.py", "--env", "cheetah-run", "--episodes", "3", "--val-episodes", "0",
                  "--eval-episodes", "1", "--episode-length", "6", "--out", str(out), "--quiet", env=env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert lines == [f"error: [Errno 28] No space left on device while writing {out / 'train' / 'ep_000001.h5'}; "
                     f"the finished episodes are intact: free some space and run the same command again to resume"]
    assert "Traceback" not in result.stderr
    assert [p.name for p in (out / "train").iterdir() if p.name != ".lock"] == ["ep_000000.h5"]
    assert verify(out / "train") == []
    # a real write error from the kernel: a file-size limit below one episode file (EFBIG)
    import resource
    import signal

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    result = subprocess.run([sys.executable, "VRNN/collect_dmc.py", "--env", "cheetah-run", "--episodes", "3",
                             "--val-episodes", "0", "--eval-episodes", "1", "--episode-length", "6", "--out",
                             str(out), "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False, preexec_fn=small_files)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: [Errno 27] File too large while writing ")
    assert [p.name for p in (out / "train").iterdir() if p.name != ".lock"] == ["ep_000000.h5"]


def _run(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          check=False, env=env)


def test_cli_help_documents_every_flag():
    result = _run("VRNN/collect_dmc.py", "--help")
    assert result.returncode == 0
    for flag in ("--env", "--episodes", "--val-episodes", "--eval-episodes", "--test-episodes", "--episode-length",
                 "--policy", "--seed", "--out", "--action-repeat", "--image-size", "--overwrite", "--quiet",
                 "verify", "repair", "convert"):
        assert flag in result.stdout, flag
    for command in ("verify", "repair", "convert"):
        assert _run("VRNN/collect_dmc.py", command, "--help").returncode == 0


def test_cli_collect_verify_and_bad_input(tmp_path):
    out = tmp_path / "walker"
    result = _run("VRNN/collect_dmc.py", "--env", "dmc_walker_walk", "--episodes", "1", "--val-episodes", "1",
                  "--eval-episodes", "1", "--episode-length", "6", "--policy", "random", "--seed", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    ok = _run("VRNN/collect_dmc.py", "verify", str(out))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count(": OK") == 3 and "episodes=1" in ok.stdout and "steps=6" in ok.stdout
    assert "action_dim=6" in ok.stdout and "walker-walk" in ok.stdout
    (tmp_path / "junk.h5").write_bytes(b"\0" * 100)
    bad = _run("VRNN/collect_dmc.py", "verify", str(tmp_path / "junk.h5"))
    assert bad.returncode == 1 and "not an HDF5 file" in bad.stdout
    unknown = _run("VRNN/collect_dmc.py", "--env", "walkr-walk", "--out", str(tmp_path / "x"))
    assert unknown.returncode == 2 and "walker-walk" in unknown.stderr
    # --out that is a file: one line, exit 2, nothing written
    target = tmp_path / "a_file"
    target.write_text("keep me")
    before = sorted(tmp_path.iterdir())
    result = _run("VRNN/collect_dmc.py", "--episodes", "1", "--eval-episodes", "1", "--episode-length", "3",
                  "--out", str(target))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: output folder {target} is a file; give a folder " \
                                                      f"(it will hold train/ val/ test/)"
    assert sorted(tmp_path.iterdir()) == before and target.read_text() == "keep me"
