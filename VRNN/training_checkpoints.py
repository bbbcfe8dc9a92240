"""The trainer's checkpoint folder (SYSTEM.md section 6): ``latest.pt``, ``best.pt`` and the last N
numbered ``step_XXXXXXXX.pt``, all written atomically through ``vrnn_utilities.save_checkpoint``; and the
compatibility check that refuses a checkpoint from another model configuration or action size.

A numbered file is written once; ``latest.pt`` and ``best.pt`` are hard links to it made under a
temporary name and renamed over the target (a copy where the file system has no hard links), so each of
the three names always points at a complete file.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from VRNN.aime_config import AIMEConfig
from VRNN.vrnn_utilities import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["RUN_ONLY_FIELDS", "CheckpointManager", "all_finite", "check_compatible", "find_latest"]

logger = logging.getLogger(__name__)

_NUMBERED = re.compile(r"^step_(\d{8,})\.pt$")

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


def find_latest(checkpoint_dir: Path) -> Path | None:
    """``latest.pt`` when present, else the highest numbered checkpoint, else ``None``."""
    checkpoint_dir = Path(checkpoint_dir)
    latest = checkpoint_dir / "latest.pt"
    if latest.is_file():
        return latest
    numbered = sorted(p for p in checkpoint_dir.glob("step_*.pt") if _NUMBERED.match(p.name))
    return numbered[-1] if numbered else None


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
        path = save_checkpoint(self.path_for(step), payload)
        self._point(path, self.dir / "latest.pt")
        if best:
            self._point(path, self.dir / "best.pt")
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
