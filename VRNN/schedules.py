"""Training schedules of MODEL.md section 5: KL (beta) warm-up, learning-rate warm-up + cosine decay, and
the adversarial warm-up factor.

Every schedule is a pure function of the optimiser step (0-based: the value used BY step ``step``), so a
resumed run reproduces them from the step counter alone; the one exception is the learning rate of a run
with a wall-clock budget (``WarmupCosine.budget_fraction``), whose cosine also follows the fraction of the
budget spent, so that it reaches its floor when the budget ends even if ``max_steps`` is never reached.
The learning-rate schedule is wrapped in a ``torch.optim.lr_scheduler.LambdaLR`` whose multiplier is a
picklable object (its state is plain numbers, saved with the scheduler's ``state_dict``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["WarmupCosine", "adversarial_weight_at", "beta_at", "linear_warmup", "make_lr_scheduler"]


def linear_warmup(step: int, warmup_steps: int) -> float:
    """Factor in [0, 1]: ``(step + 1) / warmup_steps`` capped at 1; 1 when there is no warm-up."""
    if step < 0:
        raise ValueError(f"step={step} is invalid: expected a non-negative integer")
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def beta_at(step: int, beta: float, warmup_steps: int) -> float:
    """KL weight used at ``step``: linear ramp to ``beta`` over ``warmup_steps`` (avoids posterior collapse)."""
    return beta * linear_warmup(step, warmup_steps)


def kl_warmup_at(step: int, warmup_steps: int) -> float:
    """The factor in [0, 1] that ``compute_total_loss(beta=...)`` multiplies ``config.beta`` by at ``step``."""
    return linear_warmup(step, warmup_steps)


def adversarial_weight_at(step: int, warmup_steps: int, start: int = 0) -> float:
    """Factor in [0, 1] that multiplies the generator's adversarial loss: 0 before step ``start`` (the
    adversarial task is off), then a linear warm-up over ``warmup_steps``."""
    if step < start:
        return 0.0
    return linear_warmup(step - start, warmup_steps)


class WarmupCosine:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``max_steps``.

    ``LambdaLR`` calls it with the number of scheduler steps taken so far, which equals the optimiser
    step about to be taken. Past ``max_steps`` it stays at ``min_ratio``.

    ``budget_fraction`` (in [0, 1], default 0; set by a trainer with a wall-clock budget through
    ``set_budget_fraction``): the fraction of that budget spent. After the warm-up the cosine's progress is
    the larger of the step fraction and this, so a run that stops on its budget before ``max_steps`` ends
    at ``min_ratio`` too instead of part-way down the cosine (``AIMEConfig.lr_follows_budget``).
    """

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float = 0.1) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} is invalid: expected a positive integer")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_ratio={min_ratio} is invalid: expected a value in [0, 1]")
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.min_ratio = float(min_ratio)
        self.budget_fraction = 0.0

    def set_budget_fraction(self, fraction: float) -> None:
        """Record the fraction of the wall-clock budget spent (clipped to [0, 1]; it never decreases)."""
        if not math.isfinite(fraction):
            raise ValueError(f"fraction={fraction} is invalid: expected a finite number")
        self.budget_fraction = max(self.budget_fraction, min(1.0, max(0.0, float(fraction))))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return linear_warmup(step, self.warmup_steps)
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, max((step - self.warmup_steps) / span, getattr(self, "budget_fraction", 0.0)))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                      min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` applying ``WarmupCosine`` to every parameter group's own base learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, max_steps, min_ratio))
