"""The trainer's checkpoint folder (SYSTEM.md section 6): ``latest.pt``, ``best.pt`` and the last N
numbered ``step_XXXXXXXX.pt``, each written atomically (a temporary file in the same folder, synced, then
renamed; the format of ``vrnn_utilities.save_checkpoint``); the compatibility check that refuses a
checkpoint from another model configuration or action size; and what a resume needs from the folder.

A numbered file is written once; ``latest.pt`` and ``best.pt`` are hard links to it made under a
temporary name and renamed over the target (a copy where the file system has no hard links), so each of
the three names always points at a complete file. A kill can leave temporary files behind
(``.step_XXXXXXXX.pt.*.tmp``, ``.latest.pt.*.tmp``); ``remove_temporary_files`` clears them at start-up.
``find_resumable`` skips a damaged ``latest.pt`` (truncated, or overwritten by a disk fault) and falls
back, with a warning, to the newest checkpoint in the folder that reads. A write that fails (disk full)
raises ``CheckpointWriteError`` and leaves the previous checkpoints as they were.

The writer passes the fault points of ``VRNN.fault_points`` (``checkpoint:partial``, ``:written``,
``:renamed``, ``:linked``), where the fault-injection tests pause it to kill the process.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from VRNN.aime_config import AIMEConfig
from VRNN.fault_points import fault_point
from VRNN.vrnn_utilities import CheckpointError, load_checkpoint, save_checkpoint

__all__ = [
    "RUN_ONLY_FIELDS",
    "TRAINING_STATE_KEYS",
    "CheckpointManager",
    "CheckpointWriteError",
    "all_finite",
    "check_compatible",
    "find_resumable",
    "remove_temporary_files",
    "require_training_state",
    "write_checkpoint_file",
]

logger = logging.getLogger(__name__)

_NUMBERED = re.compile(r"^step_(\d{8,})\.pt$")
# Temporary names of the writer and of the links: ".step_00000012.pt.<random>.tmp", ".latest.pt.<random>.tmp"
_TEMPORARY = re.compile(r"^\.(step_\d{8,}\.pt|latest\.pt|best\.pt)\..+\.tmp$")

# What a checkpoint needs beyond the weights for training to continue from it (DMCVBTrainer.state_dict).
TRAINING_STATE_KEYS = ("optimizer", "disc_optimizer", "scheduler", "disc_scheduler", "aggregator", "step",
                       "position", "rng")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous ones are intact."""

# Fields that may change between a checkpoint and the run that resumes or evaluates it: they set how
# long and how verbosely to run, or how data is collected, not what the model is.
RUN_ONLY_FIELDS = frozenset({
    "max_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_windows",
    "num_workers", "amp", "train_episodes", "eval_episodes", "val_episodes", "episode_length", "policy",
    "max_nonfinite_steps",
})


def check_compatible(payload: dict[str, Any], config: AIMEConfig, action_dim: int, source: str = "checkpoint",
                     ignore: frozenset[str] = RUN_ONLY_FIELDS) -> None:
    """Raise ``CheckpointError`` naming every differing field when ``payload`` does not fit this run."""
    if "config" not in payload:
        raise CheckpointError(f"{source} holds no config: it was not written by DMCVBTrainer")
    try:
        saved = AIMEConfig.from_dict(payload["config"])
    except ValueError as exc:
        raise CheckpointError(f"{source} holds a config this code cannot read: {exc}") from exc
    problems = []
    saved_action = int(payload.get("action_dim", saved.action_dim))
    if saved_action != int(action_dim):
        problems.append(f"action size: checkpoint {saved_action}, this run {action_dim}")
    for name, (theirs, ours) in sorted(saved.diff(config).items()):
        if name not in ignore and name != "action_dim":
            problems.append(f"{name}: checkpoint {theirs!r}, this run {ours!r}")
    if problems:
        raise CheckpointError(f"{source} does not fit this run; differing fields:\n  " + "\n  ".join(problems)
                              + "\nUse the checkpoint's preset and flags (see its config.json) or a new run dir.")


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor of a state dict is finite."""
    return all(bool(torch.isfinite(t).all()) for t in state.values()
               if isinstance(t, torch.Tensor) and torch.is_floating_point(t))


def _numbered(checkpoint_dir: Path) -> list[Path]:
    return sorted(p for p in Path(checkpoint_dir).glob("step_*.pt") if _NUMBERED.match(p.name))


def find_resumable(checkpoint_dir: Path,
                   map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of the folder that reads, with its payload; ``None`` when there is none.

    ``latest.pt`` first, then the numbered files from the highest step down, then ``best.pt``. A file that
    does not read (truncated, corrupt) is skipped with a warning naming it; when none reads, a
    ``CheckpointError`` lists them all. A file that reads but holds only weights (``model.save()``) is not
    skipped: ``require_training_state`` says what it is.
    """
    checkpoint_dir = Path(checkpoint_dir)
    candidates = [checkpoint_dir / "latest.pt", *reversed(_numbered(checkpoint_dir)), checkpoint_dir / "best.pt"]
    seen: set[tuple[int, int]] = set()
    failures: list[str] = []
    for path in candidates:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) in seen:  # a hard link to a file already tried
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            payload = load_checkpoint(path, map_location=map_location)
        except CheckpointError as exc:
            failures.append(f"{path.name} ({exc})")
            logger.warning("%s does not read, skipping it: %s", path, exc)
            continue
        if failures:
            logger.warning("resuming from %s (step %s), the newest intact checkpoint in %s; skipped: %s",
                           path.name, payload.get("step", "?"), checkpoint_dir, "; ".join(failures))
        return path, payload
    if failures:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir} reads: " + "; ".join(failures)
                              + ". Start a new run (another --run-dir) or restore the folder from a backup.")
    return None


def require_training_state(payload: dict[str, Any], path: str | Path) -> None:
    """``CheckpointError`` saying what the file is when it cannot be resumed (weights only, or foreign)."""
    missing = [k for k in TRAINING_STATE_KEYS if k not in payload]
    if not missing:
        return
    if "model" in payload and "config" in payload:
        raise CheckpointError(
            f"{path} holds model weights only (the file model.save() writes: config, model, EMA; no "
            f"{', '.join(missing)}), so training cannot continue from it. Evaluate it with --eval-only "
            f"--load-checkpoint {path}, or start a new run from its weights with --load-checkpoint {path} "
            "and a new --run-dir (without --resume).")
    raise CheckpointError(f"{path} is not a DMCVBTrainer checkpoint: it lacks {', '.join(missing)}")


def remove_temporary_files(checkpoint_dir: Path) -> list[Path]:
    """Delete the temporary files a killed writer leaves in ``checkpoint_dir``; returns what was removed."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    removed = []
    for path in sorted(checkpoint_dir.iterdir()):
        if _TEMPORARY.match(path.name) and path.is_file():
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            removed.append(path)
            logger.info("removed %s (%.1f MB), left by an interrupted checkpoint write", path, size / 1e6)
    return removed


class _PausingWriter:
    """File wrapper that passes the ``checkpoint:partial`` fault point once part of the file is written."""

    def __init__(self, handle: BinaryIO, step: int | None, after_bytes: int = 64 * 1024) -> None:
        self.handle, self.step, self.after_bytes, self.written = handle, step, after_bytes, 0

    def write(self, data: bytes) -> int:
        n = self.handle.write(data)
        before, self.written = self.written, self.written + n
        if before < self.after_bytes <= self.written:
            self.handle.flush()
            fault_point("checkpoint:partial", self.step)
        return n

    def flush(self) -> None:
        self.handle.flush()


def write_checkpoint_file(path: Path, payload: dict[str, Any], step: int | None = None) -> Path:
    """``payload`` (plus ``format_version``) to ``path`` atomically: temporary file, fsync, rename.

    ``vrnn_utilities.save_checkpoint`` with the fault points in between. On any
    error the temporary file is removed and an ``OSError`` becomes ``CheckpointWriteError``.
    """
    try:
        return save_checkpoint(path, payload, wrap_handle=lambda handle: _PausingWriter(handle, step),
                               before_rename=lambda: fault_point("checkpoint:written", step))
    except OSError as exc:
        if isinstance(exc, CheckpointWriteError):
            raise
        raise CheckpointWriteError(exc.errno, f"{path}: {exc.strerror or exc}") from exc


class CheckpointManager:
    """Writes and rotates the checkpoints of one run directory's ``checkpoints/`` folder."""

    def __init__(self, checkpoint_dir: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep_checkpoints={keep} is invalid: expected at least 1")
        self.dir = Path(checkpoint_dir)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}.pt"

    def save(self, payload: dict[str, Any], step: int, best: bool = False) -> Path:
        """Write the numbered file, point ``latest.pt`` (and ``best.pt`` when ``best``) at it, rotate."""
        path = write_checkpoint_file(self.path_for(step), payload, step)
        fault_point("checkpoint:renamed", step)
        try:
            self._point(path, self.dir / "latest.pt")
            if best:
                self._point(path, self.dir / "best.pt")
        except OSError as exc:
            raise CheckpointWriteError(exc.errno, f"{path} written, but latest.pt/best.pt could not be pointed at "
                                                  f"it: {exc.strerror or exc}") from exc
        fault_point("checkpoint:linked", step)
        self._rotate()
        logger.info("checkpoint %s%s", path, " (best)" if best else "")
        return path

    def _point(self, source: Path, target: Path) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        os.unlink(tmp)
        try:
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _rotate(self) -> None:
        numbered = sorted(p for p in self.dir.glob("step_*.pt") if _NUMBERED.match(p.name))
        for old in numbered[:-self.keep]:
            old.unlink(missing_ok=True)

    def load(self, path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location)
