"""The on-disk episode format: one HDF5 file per episode inside a split folder (schema version 2).

Layout of a data folder (default ``data/<env>``)::

    train/ep_000000.h5 ep_000001.h5 ...     training episodes
    val/ep_000000.h5 ...                    validation episodes (checkpoint selection)
    test/ep_000000.h5 ...                   test episodes (the reported evaluation)

Each episode file holds, for an episode of L agent steps, N = L + 1 rows (RLDS convention) as root
datasets: ``obs`` uint8 [N,S,S,3] (gzip, chunks of 16 frames), ``action`` float32 [N,A] (a_t taken after
x_t; the last row is zeros), ``reward`` float32 [N] (r_t received after a_t; last row 0), ``is_first``,
``is_last``, ``is_terminal`` bool [N]; and attributes ``schema_version`` (2), ``env`` (canonical
``domain-task``), ``camera``, ``action_repeat``, ``policy``, ``image_size`` (S), ``action_dim`` (A),
``index`` (the number in the file name), ``seed`` (-1 when unknown), ``split``, and optionally
``episode_length``, ``split_episodes`` (how many episodes the collection asked for), ``source``
(imported shards) and ``converted_from`` (the old split file).

Crash safety: an episode file is built in memory, written under a hidden temporary name
(``.ep_000017.h5.<pid>.tmp``), fsynced, linked to its final name (never over an existing file) and the
folder is fsynced. Nothing is ever updated in place: the split's index (episodes, seeds, attributes) is
derived from the files present, so a kill at any moment loses at most the episode being written, and
readers ignore temporary files (writers and ``repair`` delete them).

Old splits of schema version 1 (one file per split, ``train.h5`` / ``eval.h5``, one group
``episode_000000`` ... per episode, file attributes including ``seeds``) are still read everywhere;
``convert_legacy`` (``VRNN/hdf5_check.py``, with ``check_split``, ``verify`` and ``repair``) turns one into
a split folder.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Self

import h5py
import numpy as np

__all__ = [
    "DAMAGED_DIR",
    "LEGACY_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "SPLITS",
    "DataFileError",
    "DataSplits",
    "DiskFullError",
    "EpisodeWriter",
    "Split",
    "episode_file_name",
    "episode_name",
    "fault_point",
    "file_attrs",
    "find_splits",
    "iter_episodes",
    "list_episode_files",
    "list_episodes",
    "open_checked",
    "read_episode",
    "remove_split",
    "summary",
    "write_episode_file",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2           # one file per episode in a split folder
LEGACY_SCHEMA_VERSION = 1    # one file per split, one group per episode
SPLITS = ("train", "val", "test")
LEGACY_FILES = {"train": "train.h5", "test": "eval.h5"}
DAMAGED_DIR = "damaged"
EPISODE_PREFIX = "episode_"   # legacy group names
TEMP_PREFIX = "_incomplete_"  # legacy temporary groups
EPISODE_FILE_RE = re.compile(r"^ep_(\d{6,})\.h5$")
TEMP_FILE_RE = re.compile(r"^\.ep_\d{6,}\.h5\..*\.tmp$")
CHUNK_FRAMES = 16
REQUIRED_ATTRS = ("schema_version", "env", "camera", "action_repeat", "policy", "seeds", "image_size",
                  "action_dim")
EPISODE_ATTRS = ("schema_version", "env", "camera", "action_repeat", "policy", "image_size", "action_dim",
                 "index", "seed", "split")
# attributes every episode of one split must share
SHARED_ATTRS = ("env", "camera", "action_repeat", "policy", "image_size", "action_dim", "episode_length")
DATASETS = ("obs", "action", "reward", "is_first", "is_last", "is_terminal")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DataFileError(ValueError):
    """A data file or split folder is missing, damaged, of another schema version or inconsistent."""


class DiskFullError(OSError):
    """The disk (or quota, or file-size limit) ran out while an episode was written; finished episodes
    are intact and the temporary file was removed."""


class DataSplits(NamedTuple):
    """Paths of the three splits of a data folder (a split folder or an old single file each).

    ``validation`` equals ``test`` when the folder has no validation split (old two-split data)."""

    train: Path
    validation: Path
    test: Path


# --------------------------------------------------------------------------------------------------
# Fault injection for the crash tests (tests/test_fault_injection_data.py)
_FAULT_ENV = "AIME_DATA_FAULT"
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named point of the write path where the tests inject a fault; does nothing unless the
    environment variable ``AIME_DATA_FAULT`` is ``"<name>:<n>:<action>"``: at the n-th time (from 1)
    ``name`` is reached, ``action`` happens: ``kill`` / ``term`` / ``int`` send SIGKILL / SIGTERM / SIGINT
    to this process, ``enospc`` raises OSError(ENOSPC), ``pause`` sleeps 60 s (the test kills it)."""
    spec = os.environ.get(_FAULT_ENV)
    if not spec:
        return
    point, count, action = spec.split(":")
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] != int(count):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action == "pause":
        time.sleep(60)
        return
    sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[action]
    os.kill(os.getpid(), sig)


# --------------------------------------------------------------------------------------------------
# Names and small helpers
def episode_file_name(index: int) -> str:
    """``ep_000017.h5``: the file of episode ``index`` inside a split folder."""
    return f"ep_{int(index):06d}.h5"


def episode_name(index: int) -> str:
    """``episode_000017``: the group of episode ``index`` in an old single-file split."""
    return f"{EPISODE_PREFIX}{index:06d}"


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def file_attrs(f: h5py.File | h5py.Group) -> dict[str, Any]:
    """Attributes as plain Python values (arrays as lists)."""
    return {key: _plain(value) for key, value in f.attrs.items()}


def list_episode_files(directory: str | Path) -> list[tuple[int, Path]]:
    """``(index, path)`` of the finished episode files of a split folder, by index; temporary files and
    the ``damaged/`` folder are ignored."""
    directory = Path(directory)
    out = []
    for entry in os.scandir(directory):
        match = EPISODE_FILE_RE.match(entry.name)
        if match and entry.is_file():
            out.append((int(match.group(1)), Path(entry.path)))
    return sorted(out)


def _temp_files(directory: Path) -> list[Path]:
    return sorted(Path(e.path) for e in os.scandir(directory) if TEMP_FILE_RE.match(e.name))


def find_splits(data_dir: str | Path) -> DataSplits | None:
    """The splits of a data folder, or None when it holds no training split.

    Folder layout (``train/``, ``val/``, ``test/``) first; otherwise the old files ``train.h5`` and
    ``eval.h5``, where ``eval.h5`` serves as both validation and test. A folder layout without ``val/``
    uses ``test/`` for validation too. Raises DataFileError when ``data_dir`` is not a folder.
    """
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataFileError(f"data folder {data_dir} is a file; expected a folder holding train/ val/ test/ "
                            f"(or the old train.h5 and eval.h5)")
    train_dir, val_dir, test_dir = (data_dir / s for s in SPLITS)
    if train_dir.is_dir() and test_dir.is_dir():
        return DataSplits(train_dir, val_dir if val_dir.is_dir() else test_dir, test_dir)
    old_train, old_eval = data_dir / LEGACY_FILES["train"], data_dir / LEGACY_FILES["test"]
    if old_train.is_file() and old_eval.is_file() and not train_dir.exists():
        return DataSplits(old_train, old_eval, old_eval)
    return None


def _repair_hint(path: Path) -> str:
    if path.parent.is_dir() and EPISODE_FILE_RE.match(path.name):
        return (f"run 'python VRNN/collect_dmc.py repair {path.parent}' to move it aside (collecting again "
                f"re-collects that episode), or delete the file")
    return (f"run 'python VRNN/collect_dmc.py convert {path} NEWDIR' to keep its readable episodes, or "
            f"delete it and collect again")


# --------------------------------------------------------------------------------------------------
# Old single-file splits (schema version 1)
def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataFileError(f"data file not found: {path}")
    if not path.is_file():
        raise DataFileError(f"data path is not a file: {path}")
    if not h5py.is_hdf5(str(path)):
        raise DataFileError(f"not an HDF5 file (wrong or corrupt file?): {path}; {_repair_hint(path)}")


def _check_version(f: h5py.File, path: Path, expected: int) -> None:
    version = _plain(f.attrs.get("schema_version"))
    if isinstance(version, (int, np.integer)) and int(version) == expected:
        return
    f.close()
    if version is None:
        raise DataFileError(f"{path}: no schema_version attribute; not a file of this project's format")
    raise DataFileError(f"{path}: schema_version is {version!r}, expected {expected}; re-collect or re-import "
                        f"the data")


def _open_h5(path: Path) -> h5py.File:
    _check_exists(path)
    try:
        return h5py.File(path, "r")
    except (OSError, RuntimeError) as err:
        raise DataFileError(f"{path} is damaged (cannot open: {_short(err)}); {_repair_hint(path)}") from err


def _short(err: BaseException) -> str:
    return str(err).splitlines()[0][:160] if str(err) else type(err).__name__


def open_checked(path: str | Path) -> h5py.File:
    """Open an old single-file split (schema version 1) for reading, raising DataFileError (a ValueError)
    with a clear message when it is missing, not HDF5, unreadable or of another schema version."""
    path = Path(path)
    f = _open_h5(path)
    _check_version(f, path, LEGACY_SCHEMA_VERSION)
    return f


def list_episodes(f: h5py.File) -> list[str]:
    """Names of the complete episode groups of an old single-file split, in order."""
    return sorted(k for k in f if k.startswith(EPISODE_PREFIX))


def read_episode(f: h5py.File | h5py.Group, name: str | None = None) -> dict[str, np.ndarray]:
    """One episode as arrays: obs uint8 [N,S,S,3], action float32 [N,A], reward float32 [N], flags [N].

    ``f`` is an episode file (``name`` None) or an old split file with the group ``name``."""
    group = f if name is None else f[name]
    return {key: group[key][()] for key in DATASETS}


# --------------------------------------------------------------------------------------------------
# A split, whichever its layout
class Split:
    """The episodes of one split: a folder of episode files or an old single file.

    Attributes: ``path``, ``layout`` ("folder" or "file"), ``names`` (file stems or group names),
    ``indices``, ``seeds``, ``lengths`` (rows per episode), ``attrs`` (the shared attributes plus
    ``seeds``), ``requested`` (episodes the collection asked for, None when unknown).
    Construction raises DataFileError naming the first damaged file and what to do.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()
        if self.path.is_dir():
            self._init_folder()
        elif self.path.exists():
            self._init_file()
        else:
            raise DataFileError(f"data split not found: {self.path}")

    def _init_folder(self) -> None:
        self.layout = "folder"
        listed = list_episode_files(self.path)
        self.files = [p for _, p in listed]
        self.indices = [i for i, _ in listed]
        self.names = [p.stem for p in self.files]
        self.seeds, self.lengths = [], []
        attrs: dict[str, Any] = {}
        requested = None
        for path in self.files:
            with _open_episode(path) as f:
                a = file_attrs(f)
                length = int(f["reward"].shape[0]) if "reward" in f else 0
            if not attrs:
                attrs = {k: a[k] for k in SHARED_ATTRS + ("source",) if k in a}
            else:
                clash = [k for k in SHARED_ATTRS if k in attrs and a.get(k) != attrs[k]]
                if clash:
                    key = clash[0]
                    raise DataFileError(f"{path} has {key}={a.get(key)!r} but {self.files[0].name} has "
                                        f"{attrs[key]!r}: episodes of one split must agree; "
                                        f"{_repair_hint(path)}")
            if a.get("split_episodes") is not None:
                requested = max(requested or 0, int(a["split_episodes"]))
            self.seeds.append(int(a.get("seed", -1)))
            self.lengths.append(length)
        attrs["schema_version"] = SCHEMA_VERSION
        attrs["seeds"] = list(self.seeds)
        self.attrs = attrs
        self.requested = requested

    def _init_file(self) -> None:
        self.layout = "file"
        self.files = [self.path]
        with open_checked(self.path) as f:
            try:
                self.names = list_episodes(f)
                self.lengths = [int(f[n]["reward"].shape[0]) for n in self.names]
                group_seeds = [f[n].attrs.get("seed") for n in self.names]
            except (OSError, RuntimeError, KeyError) as err:
                raise DataFileError(f"{self.path} is damaged ({_short(err)}); {_repair_hint(self.path)}") from err
            self.attrs = file_attrs(f)
        file_seeds = list(np.atleast_1d(self.attrs.get("seeds", [])))
        self.seeds = [int(s) if s is not None else int(file_seeds[i]) if i < len(file_seeds) else -1
                      for i, s in enumerate(group_seeds)]
        self.indices = [int(n[len(EPISODE_PREFIX):]) for n in self.names]
        self.requested = None

    def __len__(self) -> int:
        return len(self.names)

    def _handle(self, i: int) -> h5py.File:
        if self._pid != os.getpid():  # a handle must not cross fork: reopen in each worker process
            self._handles = {}
            self._pid = os.getpid()
        key = 0 if self.layout == "file" else i
        handle = self._handles.get(key)
        if handle is None or not handle.id.valid:
            if len(self._handles) >= 64:
                for old in list(self._handles.values()):
                    old.close()
                self._handles.clear()
            path = self.files[key]
            try:
                handle = h5py.File(path, "r")
            except (OSError, RuntimeError) as err:
                raise DataFileError(f"{path} is damaged (cannot open: {_short(err)}); {_repair_hint(path)}") from err
            self._handles[key] = handle
        return handle if self.layout == "folder" else handle[self.names[i]]

    def read(self, i: int) -> dict[str, np.ndarray]:
        """Episode at position ``i``: the arrays of ``read_episode``; DataFileError when unreadable."""
        return self.rows(i, 0, None)

    def rows(self, i: int, start: int, stop: int | None) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of episode ``i`` (every dataset)."""
        where = self.files[i] if self.layout == "folder" else f"{self.path} group {self.names[i]}"
        try:
            group = self._handle(i)
            return {key: group[key][start:stop] for key in DATASETS}
        except (OSError, RuntimeError, KeyError) as err:
            raise DataFileError(f"{where} is damaged ({_short(err)}); {_repair_hint(Path(self.files[i]))}") from err

    def close(self) -> None:
        for handle in self._handles.values():
            if handle.id.valid:
                handle.close()
        self._handles = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # open h5py handles cannot be pickled into spawned workers
        return state

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_episode(path: Path) -> h5py.File:
    f = _open_h5(path)
    _check_version(f, path, SCHEMA_VERSION)
    return f


def iter_episodes(path: str | Path) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``(name, arrays)`` of every episode of a split folder or old split file, in order."""
    with Split(path) as split:
        for i, name in enumerate(split.names):
            yield name, split.read(i)


def summary(path: str | Path) -> dict[str, Any]:
    """Counts for humans: episodes, rows, agent steps (rows minus one per episode), A, env, policy."""
    split = Split(path)
    attrs, lengths = split.attrs, split.lengths
    return {
        "path": str(path), "layout": split.layout, "episodes": len(lengths), "rows": sum(lengths),
        "steps": sum(lengths) - len(lengths), "episode_lengths": lengths,
        "action_dim": attrs.get("action_dim"), "env": attrs.get("env"), "policy": attrs.get("policy"),
        "image_size": attrs.get("image_size"), "action_repeat": attrs.get("action_repeat"),
        "camera": attrs.get("camera"), "schema_version": attrs.get("schema_version"),
        "seeds": list(split.seeds), "requested": split.requested,
    }


# --------------------------------------------------------------------------------------------------
# Writing
def _episode_arrays(data: Mapping[str, np.ndarray], image_size: int, action_dim: int) -> dict[str, np.ndarray]:
    n = int(np.asarray(data["reward"]).shape[0])
    arrays = {
        "obs": np.asarray(data["obs"], dtype=np.uint8),
        "action": np.asarray(data["action"], dtype=np.float32).reshape(n, -1),
        "reward": np.asarray(data["reward"], dtype=np.float32),
        "is_first": np.asarray(data["is_first"], dtype=bool),
        "is_last": np.asarray(data["is_last"], dtype=bool),
        "is_terminal": np.asarray(data["is_terminal"], dtype=bool),
    }
    if arrays["obs"].shape != (n, image_size, image_size, 3):
        raise ValueError(f"obs shape {arrays['obs'].shape}, expected {(n, image_size, image_size, 3)}")
    if arrays["action"].shape != (n, action_dim):
        raise ValueError(f"action shape {arrays['action'].shape}, expected {(n, action_dim)}")
    for key in ("is_first", "is_last", "is_terminal"):
        if arrays[key].shape != (n,):
            raise ValueError(f"{key} shape {arrays[key].shape}, expected {(n,)}")
    return arrays


def encode_episode(arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any], compression_level: int = 4) -> bytes:
    """The bytes of one episode file (built in memory: nothing touches the disk)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value
        obs = arrays["obs"]
        f.create_dataset("obs", data=obs, chunks=(min(CHUNK_FRAMES, obs.shape[0]), *obs.shape[1:]),
                         compression="gzip", compression_opts=int(compression_level))
        for key in ("action", "reward", "is_first", "is_last", "is_terminal"):
            f.create_dataset(key, data=arrays[key])
    return buffer.getvalue()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_full(err: OSError, final: Path) -> DiskFullError:
    return DiskFullError(err.errno, f"{os.strerror(err.errno)} while writing {final}; the finished episodes "
                                    f"are intact: free some space and run the same command again to resume")


def write_episode_file(directory: str | Path, index: int, data: Mapping[str, np.ndarray],
                       attrs: Mapping[str, Any], compression_level: int = 4) -> Path:
    """Write one complete episode to ``directory/ep_<index>.h5`` crash-safely; returns the path.

    ``data``: the arrays of the module docstring ([N,S,S,3] uint8 frames, [N,A] actions, [N] rewards and
    flags). ``attrs`` must hold ``image_size`` and ``action_dim`` (they are checked against the arrays)
    and the other episode attributes. The bytes go to a temporary file that is fsynced and then linked to
    the final name, which must not exist yet (FileExistsError). A full disk raises DiskFullError after
    removing the temporary file.
    """
    directory = Path(directory)
    arrays = _episode_arrays(data, int(attrs["image_size"]), int(attrs["action_dim"]))
    image = encode_episode(arrays, {**attrs, "index": int(index)}, compression_level)
    final = directory / episode_file_name(index)
    if final.exists():
        raise FileExistsError(f"{final} exists already; an episode file is never overwritten")
    temp = directory / f".{final.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            fault_point("open")
            view = memoryview(image)
            half = len(view) // 2
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:half if written < half else len(view)])
                if written == half:
                    fault_point("mid_write")
            fault_point("written")
            os.fsync(fd)
        finally:
            os.close(fd)
        fault_point("synced")
        try:
            os.link(temp, final)           # atomic and never replaces an existing episode
            temp.unlink()
        except FileExistsError:
            raise FileExistsError(f"{final} appeared while it was written; is another collector running?") from None
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                raise
            os.replace(temp, final)        # file systems without hard links
        fault_point("renamed")
        _fsync_dir(directory)
    except OSError as err:
        temp.unlink(missing_ok=True)
        if err.errno in DISK_FULL_ERRNOS:
            raise _disk_full(err, final) from err
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return final


class EpisodeWriter:
    """Writes whole episodes into a split folder, one file each (``write_episode_file``).

    ``attrs`` must hold ``env``, ``camera``, ``action_repeat``, ``policy``, ``image_size``, ``action_dim``
    (and may hold ``episode_length``, ``source``, ``split_episodes``). Opening a folder that holds episodes
    checks that they agree with ``attrs`` (ValueError otherwise, naming the attribute) and removes stray
    temporary files. Only one writer may hold a folder at a time (an advisory lock, released by any exit).
    """

    def __init__(self, directory: str | Path, attrs: Mapping[str, Any], split: str = "train",
                 compression_level: int = 4):
        self.path = Path(directory)
        self.compression_level = int(compression_level)
        needed = [a for a in ("env", "camera", "action_repeat", "policy", "image_size", "action_dim")
                  if a not in attrs]
        if needed:
            raise ValueError(f"EpisodeWriter attrs lack {needed}")
        if self.path.exists() and not self.path.is_dir():
            raise DataFileError(f"{self.path} is a file, expected a split folder (an old single-file split? "
                                f"convert it with 'python VRNN/collect_dmc.py convert {self.path} NEWDIR')")
        self.attrs = {**attrs, "split": split}
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_folder(self.path)
        try:
            for temp in _temp_files(self.path):
                logger.warning("%s: removing %s left by an interrupted write", self.path, temp.name)
                temp.unlink(missing_ok=True)
            self.existing = Split(self.path)
            self._check_attrs()
        except BaseException:
            self.close()
            raise

    def _check_attrs(self) -> None:
        have = self.existing.attrs
        for key in SHARED_ATTRS:
            if key in have and key in self.attrs and have[key] != _plain(self.attrs[key]):
                raise DataFileError(f"{self.path} holds episodes with {key}={have[key]!r}, not {self.attrs[key]!r}")

    @property
    def indices(self) -> list[int]:
        return list(self.existing.indices)

    @property
    def seeds(self) -> dict[int, int]:
        """``index -> seed`` of the episodes present."""
        return dict(zip(self.existing.indices, self.existing.seeds, strict=True))

    def write_episode(self, data: Mapping[str, np.ndarray], seed: int = -1, index: int | None = None) -> Path:
        """Write one complete episode as ``ep_<index>.h5`` (default: the next free index); returns its path."""
        if index is None:
            index = max(self.existing.indices, default=-1) + 1
        path = write_episode_file(self.path, index, data, {**self.attrs, "seed": int(seed)},
                                  self.compression_level)
        self.existing.indices.append(int(index))
        self.existing.seeds.append(int(seed))
        return path

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            os.close(lock)
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock_folder(directory: Path) -> int:
    import fcntl

    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        raise DataFileError(f"{directory} is being written by another process (locked); wait for it or stop it") from err
    return fd


def remove_split(path: str | Path) -> None:
    """Delete a split folder (or old split file) for ``--overwrite``; refuses a folder that holds anything
    but episode files, temporary files, the lock and ``damaged/`` (DataFileError), so that a mistyped
    path never deletes other data."""
    path = Path(path)
    if path.is_file():
        path.unlink()
        return
    if not path.is_dir():
        return
    foreign = [e.name for e in path.iterdir()
               if not (EPISODE_FILE_RE.match(e.name) or TEMP_FILE_RE.match(e.name) or e.name in (".lock", DAMAGED_DIR))]
    if foreign:
        raise DataFileError(f"refusing to delete {path}: it holds files that are not episodes "
                            f"({', '.join(sorted(foreign)[:3])})")
    shutil.rmtree(path)
