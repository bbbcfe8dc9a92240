"""``metrics.jsonl`` (one JSON object per logged step) and, when asked and installed, TensorBoard.

Tensors become floats (scalars) or lists; non-finite floats are written as the strings ``"nan"``,
``"inf"``, ``"-inf"`` so every line stays strict JSON. When a run resumes from step S, rows logged after
S by the interrupted run are dropped first, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLogger", "read_metrics", "to_jsonable"]

logger = logging.getLogger(__name__)


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for tensors, NumPy values, floats (non-finite as strings), dicts and sequences."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple, dict, str, bytes)):
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return str(value)


def metric_series(rows: Iterable[Mapping[str, Any]]) -> dict[str, tuple[list, list[float]]]:
    """``{key: (steps, values)}`` for every finite numeric (non-bool) value of metrics.jsonl rows; rows
    without a ``step`` are skipped."""
    series: dict[str, tuple[list, list[float]]] = {}
    for row in rows:
        step = row.get("step")
        if step is None:
            continue
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    return series


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl``; a truncated last line (crash mid-write) is skipped."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping an unreadable line of %s", path)
    return rows


class MetricsLogger:
    """Appends rows to ``<run_dir>/metrics.jsonl``; a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False,
                 resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if not isinstance(r.get("step"), int) or r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                logger.warning("--tensorboard asked for but the tensorboard package is not installed; "
                               "metrics go to metrics.jsonl only (pip install tensorboard)")
            else:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, row: Mapping[str, Any]) -> None:
        """Write one row (must hold an integer ``step``)."""
        if not self.enabled:
            return
        clean = to_jsonable(dict(row))
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = int(clean.get("step", 0))
            for key, value in _flatten(clean).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out
