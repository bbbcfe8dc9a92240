"""Small shared utilities: seeding, devices, logging set-up, RNG state capture, checkpoint I/O and the
CPU allocator setting of training processes.

Checkpoints are plain dictionaries of tensors and Python scalars, written to a temporary file in the same
folder and renamed over the target (so a crash mid-write never leaves a truncated ``latest.pt``), and read
back with ``torch.load(weights_only=True)``. Every checkpoint carries ``format_version`` and the run's
``config`` (``AIMEConfig.to_dict()``), so that a mismatched checkpoint is refused with a clear message.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "seed_everything",
    "resolve_device",
    "keep_large_blocks_mapped",
    "setup_logging",
    "get_rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model it is loaded into."""


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); returns a fresh ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> cuda when available else cpu; ``"cuda"`` without a GPU is a ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but torch.cuda.is_available() is False")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; expected 'auto', 'cpu' or 'cuda[:N]'")
    return torch.device(name)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_large_blocks_mapped: bool | None = None


def keep_large_blocks_mapped(threshold_bytes: int = 1 << 30) -> bool:
    """Let glibc's malloc keep freed blocks below ``threshold_bytes`` (bytes) in the heap instead of
    returning them to the operating system; process-wide, idempotent. Returns whether it applied (False on
    anything but Linux with glibc, where it does nothing).

    By default glibc serves every block over its mmap threshold (at most 32 MiB) with a fresh mmap and
    unmaps it on free, so a training step that allocates and frees the same large activations every step
    touches each of their pages anew: one minor page fault per 4 KiB, every step. On the cpu preset at
    B = 8, T = 64 that was 190-240 page faults per frame and 0.82-0.92 of the frames per second at T = 16
    (three runs); with this setting 0.5-7 faults per frame and 1.07-1.11 (T = 16 itself, whose blocks are
    smaller, is unchanged). The heap grows for the first few steps, until freed neighbours coalesce into
    blocks that fit, then stays. The cost: the process keeps its peak heap instead of shrinking after a
    large free.
    ``DMCVBTrainer`` calls this for CPU training."""
    global _large_blocks_mapped
    if _large_blocks_mapped is not None:
        return _large_blocks_mapped
    applied = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)
            if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):
                threshold = int(min(threshold_bytes, 2**31 - 1))
                applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
        except OSError:
            applied = False
    _large_blocks_mapped = applied
    return applied


def setup_logging(level: int = logging.INFO, rank: int = 0) -> None:
    """Console logging for scripts; ranks other than 0 only log warnings and errors."""
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as checkpoint-safe tensors and lists."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``get_rng_state``."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any], wrap_handle=None, before_rename=None) -> Path:
    """Write ``payload`` (plus ``format_version``) atomically: temp file in the same folder, fsync, rename.

    ``wrap_handle(handle)`` (optional) returns the file object ``torch.save`` writes to, and
    ``before_rename()`` (optional) runs between the fsync and the rename; the trainer's checkpoint writer
    uses both for its fault points. On any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": CHECKPOINT_FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle if wrap_handle is None else wrap_handle(handle))
            handle.flush()
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; a missing or corrupt file is a ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {str(path)!r} could not be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{str(path)!r} is not an AIME checkpoint (no format_version)")
    if payload["format_version"] != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format_version {payload['format_version']}, "
            f"this code reads {CHECKPOINT_FORMAT_VERSION}"
        )
    return payload
