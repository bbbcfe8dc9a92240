"""Training windows from a split (format: VRNN/hdf5_io.py).

``DMCVBDataset(path, T)`` reads a split folder (``data/<env>/train``: one file per episode) or an old
single-file split (``train.h5``) and indexes every window of T consecutive rows that lies inside one episode
(stride 1; a window never crosses an episode boundary). Item ``i`` is a dict:

* ``observations``: [T,3,S,S] float32 in [-1, 1] (``scale="float"``) or uint8 (``scale="uint8"``)
* ``actions``: [T,A] float32 (row t: the action taken after seeing frame t)
* ``rewards``: [T] float32
* ``is_first``: [T] bool (True only on an episode's first row, so only at t=0 of windows that start
  an episode)

``augment=True`` applies one random shift per window (replicate-pad 4 pixels, random crop back to S),
identical for every frame of the window so that motion is not corrupted; the shift comes from a
generator seeded with (seed, epoch, index), so a given item is reproducible (``set_epoch`` changes it).

Splits below ``cache_bytes`` (2 GiB of uint8 frames) are loaded into RAM once; larger ones are read
lazily, each DataLoader worker process opening its own h5py handles (h5py handles must not cross fork).
Damaged data raises DataFileError (a ValueError) naming the file and what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from VRNN.hdf5_io import DataFileError, Split

__all__ = ["SCALES", "DMCVBDataset"]

logger = logging.getLogger(__name__)

SCALES = ("float", "uint8")
SHIFT_PAD = 4  # pixels, as in DrQ's random-shift augmentation for 64-84 px DMC frames
DEFAULT_CACHE_BYTES = 2 * 1024 ** 3


class DMCVBDataset(Dataset):
    """Windows of ``sequence_length`` (T) consecutive steps inside single episodes of one split."""

    def __init__(self, path: str | Path, sequence_length: int, scale: str = "float", augment: bool = False,
                 seed: int = 0, cache_bytes: int = DEFAULT_CACHE_BYTES):
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if not isinstance(sequence_length, (int, np.integer)) or sequence_length < 1:
            raise ValueError(f"sequence_length must be a positive integer, got {sequence_length!r}")
        self.path = Path(path)
        self.sequence_length = int(sequence_length)
        self.scale = scale
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0
        # DataFileError (a ValueError) naming the file for missing / damaged / wrong-schema data
        self._split = Split(self.path)
        names, attrs = self._split.names, self._split.attrs
        if not names:
            raise DataFileError(f"{self.path} holds no complete episode; collect it again "
                                f"('python VRNN/collect_dmc.py --out {self.path.parent}')")
        self.episode_lengths = list(self._split.lengths)
        self.action_dim = int(attrs.get("action_dim", 0))
        self.env_name = str(attrs.get("env", "unknown"))
        self.image_size = int(attrs.get("image_size", 64))
        self.attrs = attrs
        self.episode_names = names
        longest = max(self.episode_lengths)
        if self.sequence_length > longest:
            raise ValueError(f"sequence_length T={self.sequence_length} is longer than every episode of "
                             f"{self.path} (longest: {longest} rows); use a shorter T or longer episodes")
        self.window_index: list[tuple[int, int]] = [
            (e, start) for e, n in enumerate(self.episode_lengths) for start in range(n - self.sequence_length + 1)
        ]
        total_bytes = self.image_size * self.image_size * 3 * sum(self.episode_lengths)
        self.cached = total_bytes < cache_bytes
        self._episodes: list[dict[str, np.ndarray]] | None = None
        if self.cached:
            self._episodes = [self._split.read(i) for i in range(len(names))]
            self._split.close()
            for name, episode in zip(names, self._episodes, strict=True):
                if episode["obs"].shape[1:] != (self.image_size, self.image_size, 3):
                    raise DataFileError(f"{self.path} episode {name} has frames of shape {episode['obs'].shape[1:]}"
                                        f", the split says image_size={self.image_size}; run "
                                        f"'python VRNN/collect_dmc.py verify {self.path}'")
        logger.info("%s: %d episodes, %d windows of T=%d, %s", self.path, len(names), len(self.window_index),
                    self.sequence_length, "cached in RAM" if self.cached else "read lazily")

    def __len__(self) -> int:
        return len(self.window_index)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws (items stay reproducible for a given (seed, epoch))."""
        self.epoch = int(epoch)

    def _rows(self, episode: int, start: int) -> dict[str, np.ndarray]:
        stop = start + self.sequence_length
        if self._episodes is not None:
            return {k: v[start:stop] for k, v in self._episodes[episode].items()}
        return self._split.rows(episode, start, stop)  # one h5py handle per file and worker process

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        episode, start = self.window_index[index % len(self)]
        rows = self._rows(episode, start)
        frames = rows["obs"]  # [T,S,S,3] uint8
        if self.augment:
            frames = self._shift(frames, index)
        obs = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))  # [T,3,S,S]
        if self.scale == "float":
            obs = obs.float().div_(127.5).sub_(1.0)
        return {
            "observations": obs,
            "actions": torch.from_numpy(np.asarray(rows["action"], dtype=np.float32)),
            "rewards": torch.from_numpy(np.asarray(rows["reward"], dtype=np.float32)),
            "is_first": torch.from_numpy(np.asarray(rows["is_first"], dtype=bool)),
        }

    def _shift(self, frames: np.ndarray, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, int(index) % len(self)])
        dy, dx = rng.integers(0, 2 * SHIFT_PAD + 1, size=2)
        size = frames.shape[1]
        padded = np.pad(frames, ((0, 0), (SHIFT_PAD, SHIFT_PAD), (SHIFT_PAD, SHIFT_PAD), (0, 0)), mode="edge")
        return padded[:, dy:dy + size, dx:dx + size]

