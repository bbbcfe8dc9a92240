"""DMCVBDataset: windows inside episodes (checked by content), scaling, augmentation, errors, loaders."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from VRNN.dmc_dataset import DMCVBDataset
from VRNN.hdf5_io import EpisodeWriter


def _synthetic(path, lengths, action_dim=2, size=64):
    """A split folder whose rows are recognisable: obs pixel (0,0,0) = episode, (0,0,1) = row; action = [e, row]."""
    attrs = {"env": "cheetah-run", "camera": 0, "action_repeat": 2, "policy": "random", "image_size": size,
             "action_dim": action_dim}
    with EpisodeWriter(path, attrs) as w:
        for e, n in enumerate(lengths):
            obs = np.full((n, size, size, 3), 128, np.uint8)
            obs[:, 0, 0, 0] = e
            obs[:, 0, 0, 1] = np.arange(n)
            action = np.zeros((n, action_dim), np.float32)
            action[:, 0] = e
            action[:, 1] = np.arange(n)
            flags = np.zeros(n, bool)
            w.write_episode({"obs": obs, "action": action, "reward": np.arange(n, dtype=np.float32) + 100 * e,
                             "is_first": np.r_[True, flags[1:]], "is_last": np.r_[flags[:-1], True],
                             "is_terminal": flags}, seed=e)
    return path


@pytest.mark.parametrize("cache_bytes", [2 ** 31, 0])  # RAM cache and lazy reading behave the same
def test_windows_stay_inside_episodes(tmp_path, cache_bytes):
    path = _synthetic(tmp_path / "s", [5, 9, 3, 7])
    T = 4
    ds = DMCVBDataset(path, T, scale="uint8", cache_bytes=cache_bytes)
    assert ds.cached == (cache_bytes > 0)
    assert ds.episode_lengths == [5, 9, 3, 7] and ds.action_dim == 2 and ds.env_name == "cheetah-run"
    assert len(ds) == (5 - T + 1) + (9 - T + 1) + 0 + (7 - T + 1)
    assert ds.window_index[:3] == [(0, 0), (0, 1), (1, 0)]
    for i in range(len(ds)):
        item = ds[i]
        episode, start = ds.window_index[i]
        obs, act = item["observations"], item["actions"]
        assert obs.shape == (T, 3, 64, 64) and obs.dtype == torch.uint8
        assert torch.all(obs[:, 0, 0, 0] == episode)  # never crosses an episode boundary
        assert torch.equal(obs[:, 1, 0, 0], torch.arange(start, start + T, dtype=torch.uint8))
        assert torch.equal(act[:, 1], torch.arange(start, start + T, dtype=torch.float32))
        assert torch.equal(item["rewards"], torch.arange(start, start + T, dtype=torch.float32) + 100 * episode)
        expected_first = torch.zeros(T, dtype=torch.bool)
        expected_first[0] = start == 0
        assert torch.equal(item["is_first"], expected_first)


def test_real_data_float_scale_and_loader(tiny_dmc_data):
    ds = DMCVBDataset(tiny_dmc_data / "train", 8)
    raw = DMCVBDataset(tiny_dmc_data / "train", 8, scale="uint8")
    assert ds.action_dim == 6 and ds.env_name == "cheetah-run" and len(ds) == 2 * (25 - 8 + 1)
    item = ds[3]
    obs = item["observations"]
    assert obs.dtype == torch.float32 and obs.shape == (8, 3, 64, 64)
    assert obs.min() >= -1 and obs.max() <= 1 and obs.std() > 0.05
    assert torch.allclose(obs, raw[3]["observations"].float() / 127.5 - 1)
    episode, start = ds.window_index[3]
    with h5py.File(tiny_dmc_data / "train" / f"ep_{episode:06d}.h5", "r") as f:
        expected = f["obs"][start:start + 8]
    assert np.array_equal(raw[3]["observations"].numpy().transpose(0, 2, 3, 1), expected)
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert batch["observations"].shape == (4, 8, 3, 64, 64)
    assert batch["actions"].shape == (4, 8, 6) and batch["actions"].dtype == torch.float32
    assert batch["rewards"].shape == (4, 8) and batch["is_first"].shape == (4, 8)


def test_lazy_reading_through_worker_processes(tiny_dmc_data):
    ds = DMCVBDataset(tiny_dmc_data / "test", 5, scale="uint8", cache_bytes=0)
    cached = DMCVBDataset(tiny_dmc_data / "test", 5, scale="uint8")
    loader = DataLoader(ds, batch_size=7, num_workers=2, shuffle=False)
    got = torch.cat([b["observations"] for b in loader])
    expected = torch.stack([cached[i]["observations"] for i in range(len(cached))])
    assert torch.equal(got, expected)


def test_augmentation_is_one_shift_per_window_and_reproducible(tmp_path):
    path = tmp_path / "aug"
    attrs = {"env": "cheetah-run", "camera": 0, "action_repeat": 2, "policy": "random", "image_size": 64,
             "action_dim": 1}
    rng = np.random.default_rng(0)
    n = 6
    with EpisodeWriter(path, attrs) as w:
        base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        obs = np.stack([base] * n)  # identical frames: any per-frame difference would be a different shift
        w.write_episode({"obs": obs, "action": np.zeros((n, 1)), "reward": np.zeros(n),
                         "is_first": np.eye(n, dtype=bool)[0], "is_last": np.eye(n, dtype=bool)[-1],
                         "is_terminal": np.zeros(n, bool)})
    plain = DMCVBDataset(path, 4, scale="uint8")
    aug = DMCVBDataset(path, 4, scale="uint8", augment=True, seed=3)
    aug_again = DMCVBDataset(path, 4, scale="uint8", augment=True, seed=3)
    shifted_any = False
    for i in range(len(aug)):
        frames = aug[i]["observations"]
        assert all(torch.equal(frames[0], frames[t]) for t in range(1, 4))  # same shift for every frame
        assert torch.equal(frames, aug_again[i]["observations"])           # reproducible from (seed, index)
        shifted_any |= not torch.equal(frames, plain[i]["observations"])
    assert shifted_any
    # each augmented frame is some crop of the edge-padded original
    padded = np.pad(base, ((4, 4), (4, 4), (0, 0)), mode="edge")
    frame = aug[0]["observations"][0].numpy().transpose(1, 2, 0)
    assert any(np.array_equal(frame, padded[dy:dy + 64, dx:dx + 64]) for dy in range(9) for dx in range(9))
    other_seed = DMCVBDataset(path, 4, scale="uint8", augment=True, seed=4)
    assert any(not torch.equal(aug[i]["observations"], other_seed[i]["observations"]) for i in range(len(aug)))


def test_errors(tmp_path, tiny_dmc_data):
    with pytest.raises(ValueError, match=r"T=26 .*longest: 25 rows"):
        DMCVBDataset(tiny_dmc_data / "train", 26)
    with pytest.raises(ValueError, match="not found"):
        DMCVBDataset(tmp_path / "missing.h5", 4)
    (tmp_path / "junk.h5").write_bytes(b"junk" * 100)
    with pytest.raises(ValueError, match="not an HDF5 file"):
        DMCVBDataset(tmp_path / "junk.h5", 4)
    path = _synthetic(tmp_path / "v", [5, 6])
    with h5py.File(path / "ep_000001.h5", "a") as f:
        f.attrs["schema_version"] = 3
    with pytest.raises(ValueError, match=r"ep_000001.h5: schema_version is 3, expected 2"):
        DMCVBDataset(path, 4)
    with h5py.File(path / "ep_000001.h5", "a") as f:
        f.attrs["schema_version"] = 2
        f.attrs["action_dim"] = 3
    with pytest.raises(ValueError, match=r"ep_000001.h5 has action_dim=3 but ep_000000.h5 has 2"):
        DMCVBDataset(path, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no complete episode"):
        DMCVBDataset(tmp_path / "empty", 4)
    with pytest.raises(ValueError, match="scale"):
        DMCVBDataset(tiny_dmc_data / "train", 4, scale="half")
    with pytest.raises(ValueError, match="sequence_length"):
        DMCVBDataset(tiny_dmc_data / "train", 0)
    with pytest.raises(IndexError):
        DMCVBDataset(tiny_dmc_data / "train", 4)[10_000]


def test_ensure_dataset_collects_three_splits_resumes_and_reads_old_data(tmp_path, caplog):
    import logging

    from VRNN.aime_config import AIMEConfig
    from VRNN.collect_dmc import split_seeds
    from VRNN.ddp_utils import DistContext
    from VRNN.hdf5_io import Split
    from VRNN.run_setup import ensure_dataset, load_datasets

    config = AIMEConfig.preset("smoke", episode_length=6, train_episodes=2, val_episodes=1, eval_episodes=1,
                               sequence_length=4)
    data = tmp_path / "data"
    splits = ensure_dataset(config, data, DistContext(), progress=False)
    assert splits == (data / "train", data / "val", data / "test")
    seeds = {s: Split(data / s).seeds for s in ("train", "val", "test")}
    assert seeds == {s: split_seeds(config.seed, n, s) for s, n in (("train", 2), ("val", 1), ("test", 1))}
    # an interrupted collection (a missing episode) is completed, nothing else is touched
    kept = (data / "train" / "ep_000000.h5").read_bytes()
    (data / "train" / "ep_000001.h5").unlink()
    ensure_dataset(config, data, DistContext(), progress=False)
    assert Split(data / "train").indices == [0, 1] and (data / "train" / "ep_000000.h5").read_bytes() == kept
    train, validation, test = load_datasets(config, *splits)
    assert validation is not test and len(train) == 2 * (7 - 4 + 1)
    # a finished split with fewer episodes than a later config asks for is used as it is, with a warning
    with caplog.at_level(logging.WARNING, logger="VRNN.run_setup"):
        assert ensure_dataset(config.replace(train_episodes=5), data, DistContext(), progress=False) == splits
    assert any("2 finished training episodes, fewer than the 5" in r.getMessage() for r in caplog.records)
    assert Split(data / "train").indices == [0, 1]
    # an old two-split folder is used as it is, and one log line says what serves as validation
    old = tmp_path / "old"
    old.mkdir()
    for name, split in (("train.h5", "train"), ("eval.h5", "test")):
        with h5py.File(old / name, "w") as f:
            f.attrs.update({"schema_version": 1, "env": "cheetah-run", "camera": 0, "action_repeat": 2,
                            "policy": "ou", "image_size": 64, "action_dim": 6, "seeds": np.arange(1)})
            episode = Split(data / split).read(0)
            g = f.create_group("episode_000000")
            for key, value in episode.items():
                g.create_dataset(key, data=value)
    old_splits = ensure_dataset(config, old, DistContext(), progress=False)
    assert old_splits == (old / "train.h5", old / "eval.h5", old / "eval.h5")
    with caplog.at_level(logging.INFO, logger="VRNN.run_setup"):
        train, validation, test = load_datasets(config, *old_splits)
    assert validation is test
    assert any("serves as both validation (best.pt) and test" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in old.iterdir()) == ["eval.h5", "train.h5"]  # nothing collected beside it


def test_two_split_folder_without_val_is_used_as_it_is(tmp_path):
    from VRNN.aime_config import AIMEConfig
    from VRNN.ddp_utils import DistContext
    from VRNN.run_setup import ensure_dataset

    data = tmp_path / "data"
    for split in ("train", "test"):
        _synthetic(data / split, [12, 12])
        for f in (data / split).glob("ep_*.h5"):
            with h5py.File(f, "a") as h:
                h.attrs["split_episodes"] = 2
    config = AIMEConfig.preset("smoke", val_episodes=3)
    assert ensure_dataset(config, data, DistContext(), progress=False) == (data / "train", data / "test", data / "test")
    assert not (data / "val").exists()
