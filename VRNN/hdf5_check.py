"""Checking, repairing and converting split folders of the episode format of ``VRNN/hdf5_io.py``.

``check_split`` / ``verify`` say what is wrong with a split (folder, old single-file split or episode file);
``repair`` moves damaged episode files aside into ``<split>/damaged/`` and deletes leftover temporary files;
``convert_legacy`` turns an old single-file split (schema version 1) into a split folder, resumably;
``check_seeds_disjoint`` finds episode seeds shared between splits. The command line is
``python VRNN/collect_dmc.py verify | repair | convert``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from VRNN.hdf5_io import (
    DAMAGED_DIR,
    DATASETS,
    EPISODE_ATTRS,
    EPISODE_FILE_RE,
    EPISODE_PREFIX,
    REQUIRED_ATTRS,
    SHARED_ATTRS,
    DataFileError,
    EpisodeWriter,
    Split,
    _fsync_dir,
    _open_episode,
    _plain,
    _repair_hint,
    _short,
    _temp_files,
    episode_name,
    file_attrs,
    list_episode_files,
    list_episodes,
    open_checked,
    read_episode,
)

__all__ = ["SplitCheck", "check_seeds_disjoint", "check_split", "convert_legacy", "repair", "verify"]

logger = logging.getLogger(__name__)


class SplitCheck(NamedTuple):
    """What ``check_split`` found: ``problems`` (the split is bad while any remain), ``notes`` (harmless:
    leftover temporary files, gaps left by repair), ``damaged`` (episode files that ``repair`` moves aside)."""

    problems: list[str]
    notes: list[str]
    damaged: list[Path]


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
        return [f"{name}: unreadable data (corrupt file?): {_short(err)}"]
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


def _verify_legacy(path: Path) -> list[str]:
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
            return problems + [f"cannot list episodes (corrupt file?): {_short(err)}"]
        if not names:
            problems.append("file holds no complete episode")
        if "seeds" in f.attrs and len(np.atleast_1d(f.attrs["seeds"])) != len(names):
            problems.append(f"attribute seeds has {len(np.atleast_1d(f.attrs['seeds']))} entries "
                            f"for {len(names)} episodes")
        expected = [episode_name(i) for i in range(len(names))]
        if names != expected:
            problems.append(f"episode groups are not numbered 0..{len(names) - 1} without gaps")
        seen: dict[int, str] = {}
        for name in names:
            try:
                problems.extend(_verify_episode(f[name], name, size, action_dim))
                seed = f[name].attrs.get("seed")
            except (OSError, RuntimeError, KeyError) as err:
                problems.append(f"{name}: unreadable (corrupt file?): {_short(err)}")
                continue
            if seed is not None and int(seed) >= 0:
                if int(seed) in seen:
                    problems.append(f"{name}: duplicate of {seen[int(seed)]} (same seed {int(seed)})")
                seen.setdefault(int(seed), name)
    return problems


def _check_folder(path: Path) -> SplitCheck:
    problems: list[str] = []
    notes: list[str] = []
    damaged: list[Path] = []
    files = list_episode_files(path)
    temps = _temp_files(path)
    if temps:
        notes.append(f"{len(temps)} temporary file(s) left by an interrupted write (ignored; removed by the next "
                     f"collection or by repair): {', '.join(p.name for p in temps[:3])}")
    if not files:
        problems.append(f"{path}: no finished episode file (ep_*.h5)")
    reference: dict[str, Any] = {}
    seen: dict[int, str] = {}
    requested = 0
    for index, file in files:
        name = file.name
        try:
            f = _open_episode(file)
        except DataFileError as err:
            problems.append(f"{name}: {str(err).replace(str(file), 'file')}")
            damaged.append(file)
            continue
        with f:
            try:
                attrs = file_attrs(f)
                own = []
                missing = [a for a in EPISODE_ATTRS if a not in attrs]
                if missing:
                    own.append(f"{name}: missing attributes {missing}")
                if attrs.get("index") is not None and int(attrs["index"]) != index:
                    own.append(f"{name}: attribute index is {attrs['index']}, the file name says {index}")
                requested = max(requested, int(attrs.get("split_episodes", 0) or 0))
                if not reference:
                    reference = {k: attrs[k] for k in SHARED_ATTRS if k in attrs}
                else:
                    for key in SHARED_ATTRS:
                        if key in reference and attrs.get(key) != reference[key]:
                            own.append(f"{name}: {key}={attrs.get(key)!r}, other episodes have {reference[key]!r}")
                size = int(attrs["image_size"]) if "image_size" in attrs else None
                action_dim = int(attrs["action_dim"]) if "action_dim" in attrs else None
                own.extend(_verify_episode(f, name, size, action_dim))
            except (OSError, RuntimeError, KeyError) as err:
                own = [f"{name}: unreadable (corrupt file?): {_short(err)}"]
        seed = int(attrs.get("seed", -1)) if not own else -1
        if seed >= 0 and seed in seen:
            own.append(f"{name}: duplicate of {seen[seed]} (same seed {seed})")
        if seed >= 0:
            seen.setdefault(seed, name)
        if own:
            problems.extend(own)
            damaged.append(file)
    present = {i for i, _ in files}
    if files:
        expected = max(max(present) + 1, requested)
        gaps = sorted(set(range(expected)) - present)
        if gaps:
            notes.append(f"missing episode indices {gaps[:10]}{' ...' if len(gaps) > 10 else ''} "
                         f"(collecting again fills them)")
    aside = path / DAMAGED_DIR
    if aside.is_dir() and any(aside.iterdir()):
        notes.append(f"{sum(1 for _ in aside.iterdir())} file(s) moved aside in {aside}")
    return SplitCheck(problems, notes, damaged)


def check_split(path: str | Path) -> SplitCheck:
    """Problems, notes and damaged episode files of a split folder, an old split file or one episode file.

    It checks the schema version and attributes, that episodes agree on the shared attributes, the
    datasets of every episode (dtypes, shapes agreeing with ``image_size`` and ``action_dim``, the
    is_first / is_last / is_terminal flags, finite actions and rewards, readable data: everything is
    decompressed) and that no two episodes share a seed.
    """
    path = Path(path)
    if path.is_dir():
        return _check_folder(path)
    if not path.exists():
        return SplitCheck([f"data split not found: {path}"], [], [])
    if EPISODE_FILE_RE.match(path.name):
        try:
            with _open_episode(path) as f:
                attrs = file_attrs(f)
                problems = _verify_episode(f, path.name, attrs.get("image_size"), attrs.get("action_dim"))
        except DataFileError as err:
            return SplitCheck([str(err)], [], [path])
        return SplitCheck(problems, [], [path] if problems else [])
    return SplitCheck(_verify_legacy(path), [], [])


def verify(path: str | Path) -> list[str]:
    """Everything wrong with a split (folder, old file or episode file), as human-readable lines (empty
    list: good). Harmless findings (temporary files, gaps) are in ``check_split(path).notes``."""
    return check_split(path).problems


def repair(path: str | Path) -> tuple[list[Path], list[Path]]:
    """Make a split folder consistent: move damaged or duplicate episode files into ``<split>/damaged/``
    and delete leftover temporary files. Returns ``(moved, removed)``. The episodes moved aside are
    collected again by the next collection (their index is free again).

    An old single-file split cannot be repaired in place: DataFileError says to use ``convert_legacy``.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataFileError(f"{path} is not a split folder; {_repair_hint(path)}")
    check = _check_folder(path)
    moved: list[Path] = []
    for file in check.damaged:
        aside = path / DAMAGED_DIR
        aside.mkdir(exist_ok=True)
        target = aside / file.name
        n = 1
        while target.exists():
            target = aside / f"{file.name}.{n}"
            n += 1
        os.replace(file, target)
        moved.append(target)
        logger.warning("moved damaged episode %s to %s", file, target)
    removed = _temp_files(path)
    for temp in removed:
        temp.unlink(missing_ok=True)
    _fsync_dir(path)
    return moved, removed




# --------------------------------------------------------------------------------------------------
# Converting old splits
def convert_legacy(old: str | Path, new_dir: str | Path, split: str = "train") -> tuple[int, list[str]]:
    """Copy the episodes of an old single-file split into a new split folder; returns ``(written,
    skipped)`` where ``skipped`` names every episode left out (unreadable, invalid or a duplicate seed).

    The old file is only read. Each new episode records ``converted_from`` (the old file's absolute
    path), so an interrupted conversion resumes: a ``new_dir`` holding episodes converted from this same
    file gets the missing ones; any other non-empty ``new_dir`` is refused.
    """
    old, new_dir = Path(old), Path(new_dir)
    origin = str(old.resolve())
    if new_dir.exists() and not new_dir.is_dir():
        raise DataFileError(f"{new_dir} is a file; choose a new folder")
    done: dict[int, int] = {}
    if new_dir.is_dir():
        for index, path in list_episode_files(new_dir):
            with _open_episode(path) as g:
                if _plain(g.attrs.get("converted_from")) != origin:
                    raise DataFileError(f"{new_dir} holds episodes that were not converted from {old}; choose a "
                                        f"new folder")
                done[index] = int(_plain(g.attrs.get("seed", -1)))
    with open_checked(old) as f:
        attrs = file_attrs(f)
        try:
            names = list_episodes(f)
        except (OSError, RuntimeError) as err:
            raise DataFileError(f"{old} is damaged beyond repair (cannot list its episodes: {_short(err)})") from err
        file_seeds = list(np.atleast_1d(attrs.get("seeds", [])))
        shared = {k: attrs[k] for k in SHARED_ATTRS if k in attrs}
        if "source" in attrs:
            shared["source"] = attrs["source"]
        missing = [k for k in ("env", "camera", "action_repeat", "policy", "image_size", "action_dim") if k not in shared]
        if missing:
            raise DataFileError(f"{old} lacks the file attributes {missing}; cannot convert it")
        shared["converted_from"] = origin
        written, skipped, seen = 0, [], {seed for seed in done.values() if seed >= 0}
        with EpisodeWriter(new_dir, shared, split=split) as writer:
            for position, name in enumerate(names):
                if int(name[len(EPISODE_PREFIX):]) in done:
                    continue  # converted before an interruption
                try:
                    problems = _verify_episode(f[name], name, int(shared["image_size"]), int(shared["action_dim"]))
                    seed = f[name].attrs.get("seed")
                    data = read_episode(f, name) if not problems else None
                except (OSError, RuntimeError, KeyError) as err:
                    problems, data, seed = [f"{name}: unreadable: {_short(err)}"], None, None
                seed = int(seed) if seed is not None else int(file_seeds[position]) if position < len(file_seeds) else -1
                if problems:
                    skipped.append(f"{name} ({problems[0]})")
                    continue
                if seed >= 0 and seed in seen:
                    skipped.append(f"{name} (duplicate seed {seed})")
                    continue
                seen.add(seed)
                writer.write_episode(data, seed=seed, index=int(name[len(EPISODE_PREFIX):]))
                written += 1
    return written, skipped


def check_seeds_disjoint(splits: Sequence[str | Path]) -> list[str]:
    """Problems when two splits share a (known) episode seed."""
    seen: dict[int, str] = {}
    problems = []
    for path in splits:
        try:
            seeds = Split(path).seeds
        except DataFileError:
            continue
        for seed in seeds:
            if seed >= 0 and seed in seen and seen[seed] != str(path):
                problems.append(f"seed {seed} is in both {seen[seed]} and {path}: splits must be disjoint")
                break
            seen.setdefault(seed, str(path))
    return problems
