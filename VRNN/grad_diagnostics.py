"""Gradient diagnostics between the world model's tasks: per-task gradient norms and pairwise cosines.

The four tasks of MODEL.md section 3 (ELBO, Perceiver, attention, adversarial) share most parameters;
whether their gradients agree (cosine near 1), are orthogonal (near 0) or conflict (negative) is what
RGB is there to fix, so the trainer logs these numbers and the report plots them over training.

Sources of the numbers
----------------------
- a per-task gradient matrix ``G [T, D]`` (one flattened gradient per task over the shared parameters),
  e.g. from ``per_task_gradients(losses, params)``;
- or the diagnostics dict returned by ``multi_task_learning.RGB.backward`` (per-task norms ``[T]`` and
  cosines ``[T, T]``), so that nothing is differentiated twice.

``GradDiagnostics`` keeps running means between two logging steps and returns flat JSON-ready dicts
(``grad_norm/<task>``, ``grad_cos/<a>__<b>``, ``grad_conflict_frac``) for ``metrics.jsonl``; it also
keeps a history of (step, cosine matrix) for ``plot_gradient_cosines``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from multi_task_learning import per_task_gradients as _per_task_gradients
from VRNN.metrics_log import metric_series

__all__ = [
    "TASK_LOSS_KEYS",
    "TASK_NAMES",
    "GradDiagnostics",
    "cosine_records_from_metrics",
    "gradient_norms_and_cosines",
    "per_task_gradients",
    "plot_gradient_cosines",
    "stats_from_rgb_diagnostics",
]

logger = logging.getLogger(__name__)

# Short task names, in the order the trainer hands the four task losses to the aggregator.
TASK_NAMES: tuple[str, ...] = ("vae", "perceiver", "attention", "adversarial")
TASK_LOSS_KEYS: tuple[str, ...] = ("total_vae_loss", "perceiver_loss", "attention_loss", "adversarial_loss")

NORM_PREFIX = "grad_norm/"
COS_PREFIX = "grad_cos/"
PAIR_SEP = "__"

# Key names under which an aggregator's diagnostics dict may hold the two quantities (first match wins).
_NORM_KEYS = ("grad_norms", "task_grad_norms", "norms", "task_norms")
_COS_KEYS = ("cosines", "pairwise_cosines", "cosine", "cos", "grad_cosines", "cosine_matrix")


def gradient_norms_and_cosines(grads: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task L2 norms and pairwise cosines. grads: [T, D] -> (norms [T], cosines [T, T]).

    A task whose gradient is zero (below ``eps``) has no direction: its row and column of the cosine
    matrix are NaN (the diagonal of the other tasks is 1).
    """
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(f"expected a per-task gradient matrix [T, D], got shape {tuple(grads.shape)}")
    g = grads.detach().double()
    norms = g.norm(dim=1)
    unit = g / norms.clamp_min(eps).unsqueeze(1)
    cos = (unit @ unit.T).clamp(-1.0, 1.0)
    dead = norms <= eps
    cos[dead, :] = float("nan")
    cos[:, dead] = float("nan")
    return norms.float(), cos.float()


def per_task_gradients(losses: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                       params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Flattened gradient of each task loss w.r.t. ``params``: [T, D] (zeros where a task does not reach).

    The per-parameter gradients come from ``multi_task_learning.per_task_gradients`` (one pass per task,
    graph retained); ``.grad`` fields are not touched.
    """
    loss_list = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
    params = [p for p in params if p.requires_grad]
    if not loss_list or not params:
        raise ValueError(f"need at least one loss and one trainable parameter, got {len(loss_list)} losses "
                         f"and {len(params)} parameters")
    for loss in loss_list:
        if loss.dim() != 0:
            raise ValueError(f"each task loss must be a scalar, got shape {tuple(loss.shape)}")
    T = len(loss_list)
    grads = _per_task_gradients(loss_list, params, batched=False, retain_graph=True)
    return torch.cat([(p.new_zeros((T, p.numel())) if g is None else g.reshape(T, -1))
                      for g, p in zip(grads, params)], dim=1)


def _as_tensor(value) -> torch.Tensor:
    return value.detach().float().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value).float()


def stats_from_rgb_diagnostics(diagnostics: Mapping[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
    """(norms [T], cosines [T, T]) from an aggregator's ``backward`` diagnostics dict.

    Looks for the usual key names (``grad_norms``/``norms``..., ``cosines``/``pairwise_cosines``...);
    when only a ``grads [T, D]`` matrix is there, computes both from it. Tasks marked inactive
    (``active [T]`` False, or a zero norm) get NaN cosines.
    """
    norms = next((diagnostics[k] for k in _NORM_KEYS if k in diagnostics), None)
    cos = next((diagnostics[k] for k in _COS_KEYS if k in diagnostics), None)
    if (norms is None or cos is None) and "grads" in diagnostics:
        return gradient_norms_and_cosines(_as_tensor(diagnostics["grads"]))
    if norms is None or cos is None:
        raise ValueError(f"diagnostics dict has no per-task norms and cosines; keys: {sorted(diagnostics)}; "
                         f"expected one of {_NORM_KEYS} and one of {_COS_KEYS}")
    norms, cos = _as_tensor(norms).flatten(), _as_tensor(cos).clone()
    if cos.shape != (norms.numel(), norms.numel()):
        raise ValueError(f"cosines must be [T, T] with T={norms.numel()} tasks, got {tuple(cos.shape)}")
    # RGB reports 0 as the cosine of a task without gradient; that is "no direction", not "orthogonal".
    active = diagnostics.get("active")
    inactive = ~torch.as_tensor(active, dtype=torch.bool).flatten().cpu() if active is not None \
        else norms <= 0
    if inactive.numel() == norms.numel():
        cos[inactive, :] = float("nan")
        cos[:, inactive] = float("nan")
    return norms, cos


class GradDiagnostics:
    """Running accumulator of per-task gradient norms and pairwise cosines between logging steps.

    ``update*`` adds one observation; ``log_dict()`` returns the means since the last call (flat keys for
    ``metrics.jsonl``, non-finite values left out) and starts a new window. ``history`` holds
    ``(step, cosines [T, T])`` of every logged window, for plotting.
    """

    def __init__(self, task_names: Sequence[str] = TASK_NAMES) -> None:
        if len(task_names) < 1 or len(set(task_names)) != len(task_names):
            raise ValueError(f"task_names must be distinct and non-empty, got {list(task_names)}")
        self.task_names = tuple(task_names)
        self.history: list[tuple[int, torch.Tensor]] = []
        self._reset()

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def _reset(self) -> None:
        t = self.num_tasks
        self._norm_sum = torch.zeros(t, dtype=torch.float64)
        self._norm_count = torch.zeros(t, dtype=torch.float64)
        self._cos_sum = torch.zeros(t, t, dtype=torch.float64)
        self._cos_count = torch.zeros(t, t, dtype=torch.float64)
        self._last_step: int | None = None

    def update(self, step: int, norms: torch.Tensor, cosines: torch.Tensor) -> None:
        """Add one observation: norms [T], cosines [T, T] (NaN entries are ignored)."""
        norms, cosines = _as_tensor(norms).double().flatten(), _as_tensor(cosines).double()
        t = self.num_tasks
        if norms.numel() != t or cosines.shape != (t, t):
            raise ValueError(f"expected norms [{t}] and cosines [{t}, {t}] for tasks {self.task_names}, "
                             f"got {tuple(norms.shape)} and {tuple(cosines.shape)}")
        ok_n = torch.isfinite(norms)
        self._norm_sum += torch.where(ok_n, norms, 0.0)
        self._norm_count += ok_n.double()
        ok_c = torch.isfinite(cosines)
        self._cos_sum += torch.where(ok_c, cosines, 0.0)
        self._cos_count += ok_c.double()
        self._last_step = int(step)

    def update_from_grads(self, step: int, grads: torch.Tensor) -> None:
        """Add one observation from a per-task gradient matrix [T, D]."""
        self.update(step, *gradient_norms_and_cosines(grads))

    def update_from_rgb(self, step: int, diagnostics: Mapping[str, object]) -> None:
        """Add one observation from an aggregator's ``backward`` diagnostics dict."""
        self.update(step, *stats_from_rgb_diagnostics(diagnostics))

    def mean_cosines(self) -> torch.Tensor:
        """Mean cosine matrix [T, T] of the current window (NaN where never observed)."""
        return torch.where(self._cos_count > 0, self._cos_sum / self._cos_count.clamp_min(1), float("nan"))

    def log_dict(self, step: int | None = None) -> dict[str, float]:
        """Flat dict of the current window's means, then reset; empty when nothing was added."""
        if self._last_step is None:
            return {}
        step = self._last_step if step is None else int(step)
        out: dict[str, float] = {}
        norms = self._norm_sum / self._norm_count.clamp_min(1)
        for i, name in enumerate(self.task_names):
            if self._norm_count[i] > 0:
                out[f"{NORM_PREFIX}{name}"] = float(norms[i])
        cos = self.mean_cosines()
        pair_values = []
        for i, j in itertools.combinations(range(self.num_tasks), 2):
            value = float(cos[i, j])
            if math.isfinite(value):
                out[f"{COS_PREFIX}{self.task_names[i]}{PAIR_SEP}{self.task_names[j]}"] = value
                pair_values.append(value)
        if pair_values:
            out["grad_conflict_frac"] = sum(v < 0 for v in pair_values) / len(pair_values)
            out["grad_cos_mean"] = sum(pair_values) / len(pair_values)
        self.history.append((step, cos.float()))
        self._reset()
        return out


def cosine_records_from_metrics(records: Iterable[Mapping[str, object]]) -> dict[str, tuple[list, list]]:
    """Pairwise cosine series from metrics.jsonl rows: ``{"a__b": (steps, values)}`` (rows need ``step``)."""
    return {key[len(COS_PREFIX):]: value for key, value in metric_series(records).items()
            if key.startswith(COS_PREFIX)}


def plot_gradient_cosines(source: GradDiagnostics | Iterable[Mapping[str, object]], path: str | Path,
                          title: str = "Pairwise cosine between task gradients") -> Path | None:
    """PNG of every task pair's gradient cosine against the training step; None when there is no data.

    ``source``: a ``GradDiagnostics`` (its ``history``) or metrics.jsonl rows (``grad_cos/...`` keys).
    """
    if isinstance(source, GradDiagnostics):
        series: dict[str, tuple[list, list]] = {}
        for step, cos in source.history:
            for i, j in itertools.combinations(range(source.num_tasks), 2):
                value = float(cos[i, j])
                if math.isfinite(value):
                    key = f"{source.task_names[i]}{PAIR_SEP}{source.task_names[j]}"
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(step)
                    values.append(value)
    else:
        series = cosine_records_from_metrics(source)
    if not series:
        logger.info("no gradient cosines to plot")
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key.replace(PAIR_SEP, " / "))
    ax.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cosine")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
