"""The on-disk episode format (schema version 1): one HDF5 file per split, one group per episode.

File attributes: ``schema_version`` (int), ``env`` (canonical ``domain-task``), ``camera``,
``action_repeat``, ``policy``, ``seeds`` (int64 [E], one per episode in episode order, -1 = unknown),
``image_size`` (S), ``action_dim`` (A); optional ``episode_length`` and ``source``.
Group ``episode_000000`` ... holds, for an episode of L agent steps, N = L + 1 rows (RLDS convention):
``obs`` uint8 [N,S,S,3] (gzip, chunks of 16 frames), ``action`` float32 [N,A] (a_t taken after x_t; the
last row is zeros), ``reward`` float32 [N] (r_t received after a_t; last row 0), ``is_first``,
``is_last``, ``is_terminal`` bool [N].

Atomicity: an episode is written under a temporary group name and moved to its final name only once
complete, then the file is flushed; readers ignore temporary groups and writers delete stray ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import h5py
import numpy as np

__all__ = [
    "SCHEMA_VERSION",
    "DataFileError",
    "EpisodeWriter",
    "episode_name",
    "file_attrs",
    "iter_episodes",
    "list_episodes",
    "open_checked",
    "read_episode",
    "summary",
    "verify",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EPISODE_PREFIX = "episode_"
TEMP_PREFIX = "_incomplete_"
CHUNK_FRAMES = 16
REQUIRED_ATTRS = ("schema_version", "env", "camera", "action_repeat", "policy", "seeds", "image_size",
                  "action_dim")
DATASETS = ("obs", "action", "reward", "is_first", "is_last", "is_terminal")


class DataFileError(ValueError):
    """A data file is missing, not HDF5, of another schema version or inconsistent."""


def episode_name(index: int) -> str:
    return f"{EPISODE_PREFIX}{index:06d}"


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataFileError(f"data file not found: {path}")
    if not path.is_file():
        raise DataFileError(f"data path is not a file: {path}")
    if not h5py.is_hdf5(str(path)):
        raise DataFileError(f"not an HDF5 file (wrong or corrupt file?): {path}")


def open_checked(path: str | Path, mode: str = "r") -> h5py.File:
    """Open an existing data file, raising DataFileError (a ValueError) with a clear message when it is
    missing, not HDF5, unreadable or of another schema version."""
    path = Path(path)
    _check_exists(path)
    try:
        f = h5py.File(path, mode)
    except OSError as err:
        raise DataFileError(f"cannot open HDF5 file {path} (corrupt or truncated?): {err}") from err
    version = f.attrs.get("schema_version")
    version = version.item() if isinstance(version, np.generic) else version
    if not isinstance(version, (int, np.integer)) or int(version) != SCHEMA_VERSION:
        f.close()
        if version is None:
            raise DataFileError(f"{path}: no schema_version attribute; not a file of this project's format "
                                f"(schema_version {SCHEMA_VERSION})")
        raise DataFileError(f"{path}: schema_version is {version!r}, this code reads schema_version "
                            f"{SCHEMA_VERSION}; re-collect or re-import the data")
    return f


def list_episodes(f: h5py.File) -> list[str]:
    """Names of the complete episodes, in order (temporary groups are ignored)."""
    return sorted(k for k in f if k.startswith(EPISODE_PREFIX))


def file_attrs(f: h5py.File) -> dict[str, Any]:
    """File attributes as plain Python values (seeds as a list of ints)."""
    out: dict[str, Any] = {}
    for key, value in f.attrs.items():
        if isinstance(value, np.ndarray):
            out[key] = value.tolist()
        elif isinstance(value, np.generic):
            out[key] = value.item()
        elif isinstance(value, bytes):
            out[key] = value.decode()
        else:
            out[key] = value
    return out


def read_episode(f: h5py.File, name: str) -> dict[str, np.ndarray]:
    """One episode as arrays: obs uint8 [N,S,S,3], action float32 [N,A], reward float32 [N], flags [N]."""
    group = f[name]
    return {key: group[key][()] for key in DATASETS}


def iter_episodes(path: str | Path) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    with open_checked(path) as f:
        for name in list_episodes(f):
            yield name, read_episode(f, name)


def summary(path: str | Path) -> dict[str, Any]:
    """Counts for humans: episodes, rows, agent steps (rows minus one per episode), A, env, policy."""
    with open_checked(path) as f:
        names = list_episodes(f)
        lengths = [int(f[n]["reward"].shape[0]) for n in names]
        attrs = file_attrs(f)
    return {
        "path": str(path), "episodes": len(names), "rows": sum(lengths),
        "steps": sum(lengths) - len(lengths), "episode_lengths": lengths,
        "action_dim": attrs.get("action_dim"), "env": attrs.get("env"), "policy": attrs.get("policy"),
        "image_size": attrs.get("image_size"), "action_repeat": attrs.get("action_repeat"),
        "camera": attrs.get("camera"), "schema_version": attrs.get("schema_version"),
    }


def _verify_episode(group: h5py.Group, name: str, size: int | None, action_dim: int | None) -> list[str]:
    problems: list[str] = []
    missing = [k for k in DATASETS if k not in group]
    if missing:
        return [f"{name}: missing datasets {missing}"]
    expected_dtype = {"obs": np.uint8, "action": np.float32, "reward": np.float32,
                      "is_first": np.bool_, "is_last": np.bool_, "is_terminal": np.bool_}
    for key, dtype in expected_dtype.items():
        if group[key].dtype != dtype:
            problems.append(f"{name}/{key}: dtype {group[key].dtype}, expected {np.dtype(dtype)}")
    n = group["reward"].shape[0] if group["reward"].ndim == 1 else None
    if n is None:
        return problems + [f"{name}/reward: shape {group['reward'].shape}, expected [N]"]
    if n < 2:
        problems.append(f"{name}: {n} rows, an episode needs at least 2 (one agent step)")
    shapes = {
        "obs": (n, size, size, 3) if size else None, "action": (n, action_dim) if action_dim else None,
        "is_first": (n,), "is_last": (n,), "is_terminal": (n,),
    }
    for key, shape in shapes.items():
        if shape is not None and tuple(group[key].shape) != shape:
            problems.append(f"{name}/{key}: shape {tuple(group[key].shape)}, expected {shape}")
    if problems:
        return problems
    try:
        data = {key: group[key][()] for key in DATASETS}
    except (OSError, RuntimeError, ValueError) as err:
        return [f"{name}: unreadable data (corrupt file?): {err}"]
    first, last, terminal = data["is_first"], data["is_last"], data["is_terminal"]
    if not first[0] or first[1:].any():
        problems.append(f"{name}: is_first must be True exactly at row 0, found at rows {np.flatnonzero(first).tolist()}")
    if not last[-1] or last[:-1].any():
        problems.append(f"{name}: is_last must be True exactly at the last row, found at rows {np.flatnonzero(last).tolist()}")
    if terminal[:-1].any():
        problems.append(f"{name}: is_terminal set before the last row at {np.flatnonzero(terminal[:-1]).tolist()}")
    for key in ("action", "reward"):
        if not np.isfinite(data[key]).all():
            problems.append(f"{name}/{key}: contains non-finite values")
    return problems


def verify(path: str | Path) -> list[str]:
    """Everything wrong with a data file, as human-readable lines (empty list: the file is good)."""
    path = Path(path)
    try:
        f = open_checked(path)
    except DataFileError as err:
        return [str(err)]
    problems: list[str] = []
    with f:
        missing = [a for a in REQUIRED_ATTRS if a not in f.attrs]
        if missing:
            problems.append(f"missing file attributes: {missing}")
        size = int(f.attrs["image_size"]) if "image_size" in f.attrs else None
        action_dim = int(f.attrs["action_dim"]) if "action_dim" in f.attrs else None
        try:
            names = list_episodes(f)
        except (OSError, RuntimeError) as err:
            return problems + [f"cannot list episodes (corrupt file?): {err}"]
        if not names:
            problems.append("file holds no complete episode")
        if "seeds" in f.attrs and len(np.atleast_1d(f.attrs["seeds"])) != len(names):
            problems.append(f"attribute seeds has {len(np.atleast_1d(f.attrs['seeds']))} entries "
                            f"for {len(names)} episodes")
        expected = [episode_name(i) for i in range(len(names))]
        if names != expected:
            problems.append(f"episode groups are not numbered 0..{len(names) - 1} without gaps")
        for name in names:
            try:
                problems.extend(_verify_episode(f[name], name, size, action_dim))
            except (OSError, RuntimeError, KeyError) as err:
                problems.append(f"{name}: unreadable (corrupt file?): {err}")
    return problems


class EpisodeWriter:
    """Appends whole episodes to a data file, creating it with ``attrs`` when it does not exist.

    ``attrs`` must hold every required attribute except ``schema_version`` and ``seeds`` (managed here).
    Opening an existing file checks that its attributes agree with ``attrs`` (ValueError otherwise) and
    removes stray temporary groups left by an interrupted write.
    """

    def __init__(self, path: str | Path, attrs: Mapping[str, Any], compression_level: int = 4):
        self.path = Path(path)
        self.compression_level = int(compression_level)
        needed = [a for a in REQUIRED_ATTRS if a not in ("schema_version", "seeds") and a not in attrs]
        if needed:
            raise ValueError(f"EpisodeWriter attrs lack {needed}")
        self.image_size = int(attrs["image_size"])
        self.action_dim = int(attrs["action_dim"])
        if self.path.exists():
            self._file = open_checked(self.path, "a")
            self._check_attrs(attrs)
            for key in [k for k in self._file if k.startswith(TEMP_PREFIX)]:
                logger.warning("%s: removing incomplete group %s left by an interrupted write", self.path, key)
                del self._file[key]
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.path, "w")
            self._file.attrs["schema_version"] = SCHEMA_VERSION
            self._file.attrs["seeds"] = np.zeros(0, dtype=np.int64)
            for key, value in attrs.items():
                self._file.attrs[key] = value
            self._file.flush()

    def _check_attrs(self, attrs: Mapping[str, Any]) -> None:
        existing = file_attrs(self._file)
        for key, value in attrs.items():
            if key in existing and existing[key] != (value.tolist() if isinstance(value, np.ndarray) else value):
                self._file.close()
                raise ValueError(f"{self.path} was written with {key}={existing[key]!r}, not {value!r}; "
                                 f"use another output path or overwrite it")

    @property
    def num_episodes(self) -> int:
        return len(list_episodes(self._file))

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in np.atleast_1d(self._file.attrs["seeds"])]

    def write_episode(self, data: Mapping[str, np.ndarray], seed: int = -1) -> str:
        """Append one complete episode (arrays as in the module docstring); returns its group name."""
        n = int(np.asarray(data["reward"]).shape[0])
        arrays = {
            "obs": np.asarray(data["obs"], dtype=np.uint8),
            "action": np.asarray(data["action"], dtype=np.float32).reshape(n, -1),
            "reward": np.asarray(data["reward"], dtype=np.float32),
            "is_first": np.asarray(data["is_first"], dtype=bool),
            "is_last": np.asarray(data["is_last"], dtype=bool),
            "is_terminal": np.asarray(data["is_terminal"], dtype=bool),
        }
        if arrays["obs"].shape != (n, self.image_size, self.image_size, 3):
            raise ValueError(f"obs shape {arrays['obs'].shape}, expected {(n, self.image_size, self.image_size, 3)}")
        if arrays["action"].shape != (n, self.action_dim):
            raise ValueError(f"action shape {arrays['action'].shape}, expected {(n, self.action_dim)}")
        for key in ("is_first", "is_last", "is_terminal"):
            if arrays[key].shape != (n,):
                raise ValueError(f"{key} shape {arrays[key].shape}, expected {(n,)}")
        index = self.num_episodes
        final = episode_name(index)
        temp = TEMP_PREFIX + final
        if temp in self._file:
            del self._file[temp]
        group = self._file.create_group(temp)
        group.create_dataset("obs", data=arrays["obs"], chunks=(min(CHUNK_FRAMES, n), *arrays["obs"].shape[1:]),
                             compression="gzip", compression_opts=self.compression_level)
        for key in ("action", "reward", "is_first", "is_last", "is_terminal"):
            group.create_dataset(key, data=arrays[key])
        group.attrs["seed"] = int(seed)
        self._file.move(temp, final)
        self._file.attrs["seeds"] = np.asarray(self.seeds + [int(seed)], dtype=np.int64)
        self._file.flush()
        return final

    def close(self) -> None:
        if self._file.id.valid:
            self._file.flush()
            self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
