"""Scoring of open-loop predictions against baselines, error bars, controls and the verdict.

Pure tensor functions: nothing here touches a model, so any predictor's output can be scored (the
tests score hand-made predictors: a constant image, copy-last-frame and an oracle). ``VRNN/evaluation.py``
runs the world model and feeds its outputs here. docs/EVALUATION.md gives every formula.

Conventions
-----------
Frames are float in [-1, 1] (data range 2). A batch of evaluation windows gives ``truth`` [B,F,3,H,W]
(the F frames after the T0 observed ones), ``context`` [B,T0,3,H,W] and a prediction [B,F,3,H,W].
Per-window results are tensors [B,F] (one value per window and horizon step, float64); a run
concatenates them over batches to [N,F] and ``summarize_open_loop`` turns them into means with standard
errors over the N windows. A value that is undefined for a window (moving-pixel PSNR when no pixel
moves) is NaN and left out of that step's mean and count.

Predictors and baselines (names used as key prefixes)
-----------------------------------------------------
``pred``          the model (or whatever predictor is scored)
``copy_last``     every future frame = the last observed frame x_{T0}
``context_mean``  every future frame = the mean of the T0 observed frames of that window
``train_mean``    every future frame = the mean training frame (one constant image for every window)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from VRNN.advanced_metrics import psnr_per_image, ssim_per_image

__all__ = [
    "BASELINES",
    "DATA_RANGE",
    "FRAME_METRICS",
    "MOVING_THRESHOLD",
    "PREDICTORS",
    "PSNR_CAP_DB",
    "SIGNIFICANCE",
    "baseline_predictions",
    "jackknife_ratio_of_means",
    "mean_and_se",
    "moving_mask",
    "moving_psnr_per_image",
    "score_open_loop",
    "spread_ratio",
    "summarize_open_loop",
    "verdict",
]

DATA_RANGE = 2.0          # frames live in [-1, 1]
PSNR_CAP_DB = 100.0       # per-image cap; MSE 0 would give +inf
# A pixel "moves" in a true frame when one of its channels differs from the mean training frame by more
# than this (in [-1, 1] units: 0.1 = 12.75 of 255 grey levels). On cheetah-run 64x64 this flags about 15%
# of the pixels: the body and the floor's scrolling grid, never the sky.
MOVING_THRESHOLD = 0.1
SIGNIFICANCE = 2.0        # a difference counts when it exceeds this many standard errors
RATIO_EPS = 1e-12         # added to both MSEs of the action-shuffle ratio (MSE 1e-12 is 126 dB, above the cap)
PREDICTORS = ("pred", "copy_last", "context_mean", "train_mean")
BASELINES = ("copy_last", "context_mean", "train_mean")
FRAME_METRICS = ("psnr", "moving_psnr", "ssim")
BASELINE_NAMES = {"copy_last": "copy-last-frame", "context_mean": "context mean", "train_mean": "mean training frame"}
USAGE_THRESHOLD = 0.01    # a component counts as used when its mean prior weight exceeds this
# Controls whose failure the verdict line names (the ratio must exceed 1, the gaps 0, by SIGNIFICANCE SE).
# A swap gap below this many nats per frame counts as "no effect" whatever its SE. The per-frame NLL is a
# float32 sum of ~7e4 nats for a 64x64 frame, so gaps are resolved to about 0.01 nats; 0.1 is well above that.
NEGLIGIBLE_SWAP_NATS = 0.1


# --------------------------------------------------------------------------------------------------
# Baselines and per-window scores
def _check_frames(name: str, x: torch.Tensor, ndim: int = 5) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != ndim or x.shape[-3] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of {'[B,T,3,H,W]' if ndim == 5 else '[3,H,W]'} frames, got {shape}")


def baseline_predictions(context: torch.Tensor, horizon: int, mean_frame: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three baselines for F = ``horizon`` future steps, each [B,F,3,H,W] (expanded views, no copy).

    context: the T0 observed frames [B,T0,3,H,W] in [-1,1]; mean_frame: the mean training frame [3,H,W].
    """
    _check_frames("context", context)
    _check_frames("mean_frame", mean_frame, ndim=3)
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
    b, _, c, h, w = context.shape
    if tuple(mean_frame.shape) != (c, h, w):
        raise ValueError(f"mean_frame has shape {tuple(mean_frame.shape)} but the frames are {(c, h, w)}")
    shape = (b, horizon, c, h, w)
    return {"copy_last": context[:, -1:].expand(shape),
            "context_mean": context.mean(1, keepdim=True).expand(shape),
            "train_mean": mean_frame.to(context)[None, None].expand(shape)}


def moving_mask(truth: torch.Tensor, mean_frame: torch.Tensor, threshold: float = MOVING_THRESHOLD) -> torch.Tensor:
    """[B,F,H,W] bool: pixels of ``truth`` [B,F,3,H,W] where some channel differs from ``mean_frame``
    [3,H,W] by more than ``threshold`` (in [-1,1] units)."""
    _check_frames("truth", truth)
    return (truth - mean_frame.to(truth)).abs().amax(dim=-3) > threshold


def moving_psnr_per_image(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor,
                          data_range: float = DATA_RANGE) -> torch.Tensor:
    """PSNR over the masked pixels only, [B,F] in dB (capped at ``PSNR_CAP_DB``; NaN where the mask is empty).

    pred, truth [B,F,3,H,W]; mask [B,F,H,W] bool. MSE = sum over masked pixels and the 3 channels of the
    squared error / (3 * number of masked pixels); PSNR = 10 log10(data_range^2 / MSE).
    """
    if pred.shape != truth.shape or tuple(mask.shape) != tuple(truth.shape[:2] + truth.shape[3:]):
        raise ValueError(f"pred {tuple(pred.shape)}, truth {tuple(truth.shape)} and mask {tuple(mask.shape)} "
                         "do not fit: expected [B,F,3,H,W], [B,F,3,H,W] and [B,F,H,W]")
    m = mask.unsqueeze(-3).to(torch.float64)
    count = m.sum((-3, -2, -1)) * pred.shape[-3]
    sq = ((pred.double() - truth.double()) ** 2 * m).sum((-3, -2, -1))
    mse = sq / count.clamp(min=1)
    psnr = (10.0 * torch.log10(data_range ** 2 / mse)).clamp(max=PSNR_CAP_DB)
    return torch.where(count > 0, psnr, torch.full_like(psnr, math.nan))


def _frame_scores(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    pred = pred.float()
    return {"psnr": psnr_per_image(pred, truth, DATA_RANGE).clamp(max=PSNR_CAP_DB).double(),
            "moving_psnr": moving_psnr_per_image(pred, truth, mask),
            "ssim": ssim_per_image(pred, truth, DATA_RANGE).double(),
            "mse": ((pred.double() - truth.double()) ** 2).mean((-3, -2, -1))}


def score_open_loop(truth: torch.Tensor, context: torch.Tensor, prediction: torch.Tensor, mean_frame: torch.Tensor,
                    shuffled_prediction: torch.Tensor | None = None,
                    threshold: float = MOVING_THRESHOLD) -> dict[str, torch.Tensor]:
    """Per-window scores of one batch: ``{f"{p}_{m}": [B,F]}`` for p in ``PREDICTORS``, m in psnr,
    moving_psnr, ssim, mse; plus ``moving_fraction`` [B,F] (share of moving pixels in the true frame)
    and, when ``shuffled_prediction`` is given, ``shuffled_mse`` [B,F] (MSE of the prediction made with
    another window's future actions; the action-shuffle control).

    truth [B,F,3,H,W], context [B,T0,3,H,W], prediction (and shuffled_prediction) [B,F,3,H,W], all in
    [-1,1]; mean_frame [3,H,W], the mean training frame. All outputs float64 on the CPU.
    """
    _check_frames("truth", truth)
    _check_frames("prediction", prediction)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction has shape {tuple(prediction.shape)} but truth has {tuple(truth.shape)}")
    truth = truth.float()
    horizon = truth.shape[1]
    guesses = {"pred": prediction.float().clamp(-1, 1),
               **baseline_predictions(context.float(), horizon, mean_frame.float())}
    mask = moving_mask(truth, mean_frame, threshold)
    out: dict[str, torch.Tensor] = {}
    for name, guess in guesses.items():
        for metric, value in _frame_scores(guess, truth, mask).items():
            out[f"{name}_{metric}"] = value.cpu()
    out["moving_fraction"] = mask.double().mean((-2, -1)).cpu()
    if shuffled_prediction is not None:
        if shuffled_prediction.shape != truth.shape:
            raise ValueError(f"shuffled_prediction has shape {tuple(shuffled_prediction.shape)} but truth has "
                             f"{tuple(truth.shape)}")
        sp = shuffled_prediction.float().clamp(-1, 1)
        out["shuffled_mse"] = ((sp.double() - truth.double()) ** 2).mean((-3, -2, -1)).cpu()
    return out


# --------------------------------------------------------------------------------------------------
# Means, standard errors, ratios
def mean_and_se(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over dim 0, its standard error and the count, ignoring NaN: x [N,...] -> three [...] tensors.

    SE = sample std (ddof 1) / sqrt(n); NaN when n < 2 (no error estimate), mean NaN when n = 0.
    """
    x = x.double()
    finite = torch.isfinite(x)
    n = finite.sum(0).double()
    safe = torch.where(finite, x, torch.zeros_like(x))
    mean = safe.sum(0) / n.clamp(min=1)
    var = (torch.where(finite, x - mean, torch.zeros_like(x)) ** 2).sum(0) / (n - 1).clamp(min=1)
    se = (var / n.clamp(min=1)).sqrt()
    nan = torch.full_like(mean, math.nan)
    return torch.where(n > 0, mean, nan), torch.where(n > 1, se, nan), n


def jackknife_ratio_of_means(a: torch.Tensor, b: torch.Tensor, eps: float = RATIO_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """R = (mean(a) + eps) / (mean(b) + eps) over dim 0 and its jackknife standard error: a, b [N,...] -> two [...].

    Leave-one-out ratios R_(i) = ((S_a - a_i)/(N-1) + eps) / ((S_b - b_i)/(N-1) + eps);
    SE = sqrt((N-1)/N * sum_i (R_(i) - mean R_(.))^2). NaN SE when N < 2. ``eps`` keeps a perfect
    predictor's ratio finite (MSE 0 with the recorded actions) and leaves a ratio of equal means at 1.
    """
    a, b = a.double(), b.double()
    n = a.shape[0]
    sa, sb = a.sum(0), b.sum(0)
    ratio = (sa / n + eps) / (sb / n + eps)
    if n < 2:
        return ratio, torch.full_like(ratio, math.nan)
    loo = ((sa - a) / (n - 1) + eps) / ((sb - b) / (n - 1) + eps)
    se = ((n - 1) / n * ((loo - loo.mean(0)) ** 2).sum(0)).sqrt()
    return ratio, se


def spread_ratio(means: torch.Tensor, variances: torch.Tensor) -> dict[str, float | None]:
    """How much posterior means vary across windows relative to the posterior's own spread.

    means, variances [N,T,D] (posterior mean and variance of z for N windows). spread = sqrt(mean over
    (t,d) of the across-window variance of the means (ddof 1)); posterior_std = sqrt(mean over (i,t,d) of
    the variances); ratio = spread / posterior_std with its jackknife SE over windows (N >= 3).
    Returns {"spread", "posterior_std", "ratio", "ratio_se"} (floats; None where undefined).
    """
    if means.shape != variances.shape or means.dim() < 2:
        raise ValueError(f"means {tuple(means.shape)} and variances {tuple(variances.shape)} must both be [N,...]")
    m = means.double().flatten(1)
    v = variances.double().flatten(1)
    n = m.shape[0]
    if n < 2:
        return {"spread": None, "posterior_std": _float(v.mean().sqrt()), "ratio": None, "ratio_se": None}

    def stats(s1, s2, sv, k):
        var_between = (s2 - s1 ** 2 / k) / (k - 1)
        return var_between.clamp(min=0).mean(-1).sqrt(), (sv / k).mean(-1).sqrt()

    s1, s2, sv = m.sum(0), (m ** 2).sum(0), v.sum(0)
    spread, post = stats(s1, s2, sv, n)
    ratio = spread / post
    se = None
    if n >= 3:
        sp_i, post_i = stats(s1 - m, s2 - m ** 2, sv - v, n - 1)
        r_i = sp_i / post_i
        se = _float(((n - 1) / n * ((r_i - r_i.mean()) ** 2).sum()).sqrt())
    return {"spread": _float(spread), "posterior_std": _float(post), "ratio": _float(ratio), "ratio_se": se}


def _float(x) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def _list(x: torch.Tensor) -> list[float | None]:
    return [_float(v) for v in x.reshape(-1)]


# --------------------------------------------------------------------------------------------------
# Summary
def summarize_open_loop(scores: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Means and standard errors over windows of the per-window scores (``score_open_loop`` concatenated
    over batches, each [N,F]); the JSON-ready part of eval.json about open-loop prediction.

    For every ``{p}_{m}`` (p in PREDICTORS, m in FRAME_METRICS): ``{p}_{m}`` [F] (mean over windows at
    each step), ``{p}_{m}_se`` [F], ``{p}_{m}_mean`` and ``{p}_{m}_mean_se`` (each window's mean over the
    horizon, then mean and SE over windows). ``gaps``: for each baseline b and metric m in psnr,
    moving_psnr: the paired per-window difference model - b, ``{m}`` [F], ``{m}_se`` [F], ``{m}_mean``,
    ``{m}_mean_se`` and ``wins`` [F] (bool: the model is better at that step; see ``_wins``), ``beats_from``
    (the first step k such that the model wins at k and every later step; None if it loses at +F).
    ``moving_fraction`` [F], ``moving_windows`` [F] (windows with at least one moving pixel),
    ``action_shuffle_ratio`` [F] and ``_se``, ``action_shuffle_ratio_mean`` and ``_se`` (pooled over the
    horizon) when ``shuffled_mse`` is present.
    """
    required = [f"{p}_{m}" for p in PREDICTORS for m in FRAME_METRICS]
    missing = [k for k in required if k not in scores]
    if missing:
        raise ValueError(f"scores lack {missing}; build them with score_open_loop")
    n_windows, horizon = scores["pred_psnr"].shape
    out: dict[str, Any] = {"num_scored_windows": int(n_windows)}
    for key in required:
        x = scores[key].double()
        mean, se, _ = mean_and_se(x)
        hmean, hse, _ = mean_and_se(_nanmean(x, 1))
        out[key], out[f"{key}_se"] = _list(mean), _list(se)
        out[f"{key}_mean"], out[f"{key}_mean_se"] = _float(hmean), _float(hse)
    _, _, moving_n = mean_and_se(scores["pred_moving_psnr"].double())
    out["moving_windows"] = [int(v) for v in moving_n]
    if "moving_fraction" in scores:
        out["moving_fraction"] = _list(mean_and_se(scores["moving_fraction"])[0])
    gaps: dict[str, Any] = {}
    for base in BASELINES:
        entry: dict[str, Any] = {}
        for metric in ("psnr", "moving_psnr"):
            diff = scores[f"pred_{metric}"].double() - scores[f"{base}_{metric}"].double()
            mean, se, n = mean_and_se(diff)
            hmean, hse, _ = mean_and_se(_nanmean(diff, 1))
            entry[metric], entry[f"{metric}_se"] = _list(mean), _list(se)
            entry[f"{metric}_mean"], entry[f"{metric}_mean_se"] = _float(hmean), _float(hse)
            entry[f"_{metric}"] = (mean, se, n)
        wins = _wins(entry.pop("_psnr"), entry.pop("_moving_psnr"))
        entry["wins"] = wins
        entry["beats_from"] = _beats_from(wins)
        gaps[base] = entry
    out["gaps"] = gaps
    if "shuffled_mse" in scores:
        # Windows without a shuffled rollout (NaN rows, e.g. a batch of one) are left out of the ratio.
        shuffled, own = scores["shuffled_mse"].double(), scores["pred_mse"].double()
        rows = torch.isfinite(shuffled).all(1) & torch.isfinite(own).all(1)
        out["action_shuffle_windows"] = int(rows.sum())
        if bool(rows.any()):
            shuffled, own = shuffled[rows], own[rows]
            ratio, se = jackknife_ratio_of_means(shuffled, own)
            out["action_shuffle_ratio"], out["action_shuffle_ratio_se"] = _list(ratio), _list(se)
            pooled, pooled_se = jackknife_ratio_of_means(shuffled.mean(1), own.mean(1))
            out["action_shuffle_ratio_mean"], out["action_shuffle_ratio_mean_se"] = _float(pooled), _float(pooled_se)
    return out


def _nanmean(x: torch.Tensor, dim: int) -> torch.Tensor:
    finite = torch.isfinite(x)
    n = finite.sum(dim)
    total = torch.where(finite, x, torch.zeros_like(x)).sum(dim)
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, math.nan))


def _significant(mean: float, se: float) -> bool:
    """mean > 0 by more than SIGNIFICANCE standard errors (a missing SE, from one window, counts as 0)."""
    if not math.isfinite(mean):
        return False
    return mean > 0 and mean > SIGNIFICANCE * (se if math.isfinite(se) else 0.0)


def _wins(full: tuple, moving: tuple) -> list[bool]:
    """Step j is won when the full-frame PSNR gap is significantly positive and so is the moving-pixel
    gap (the latter is skipped at steps where no window has a moving pixel)."""
    f_mean, f_se, _ = full
    m_mean, m_se, m_n = moving
    wins = []
    for j in range(f_mean.shape[0]):
        ok = _significant(float(f_mean[j]), float(f_se[j]))
        if int(m_n[j]) > 0:
            ok = ok and _significant(float(m_mean[j]), float(m_se[j]))
        wins.append(bool(ok))
    return wins


def _steps_text(steps: Sequence[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> '+1..+3, +7, +9..+10' (sorted 1-based steps as runs)."""
    runs: list[list[int]] = []
    for k in steps:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(f"+{a}" if a == b else f"+{a}..+{b}" for a, b in runs)


def _beats_from(wins: Sequence[bool]) -> int | None:
    """Smallest k (1-based) with wins at steps k..F; None when the last step is lost."""
    k = None
    for j in range(len(wins) - 1, -1, -1):
        if not wins[j]:
            break
        k = j + 1
    return k


# --------------------------------------------------------------------------------------------------
# Verdict
def verdict(summary: Mapping[str, Any], controls: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The one-line verdict of an evaluation, computed from ``summarize_open_loop``'s output (and the
    controls of eval.json when given). Returns {"code", "text", "beats_from" {baseline: k or None},
    "flags" [str]}.

    code: ``beats_every_baseline`` (there is a k such that every baseline is beaten at every step from
    +k), ``no_better_than_constant`` (the mean training frame is not beaten at any step), or ``partial``.
    flags: ``actions_ignored`` (no step has an action-shuffle ratio above 1 by SIGNIFICANCE SE),
    ``z_ignored`` / ``h_ignored`` (swapping z, or h, between windows does not raise the reconstruction
    NLL by SIGNIFICANCE SE, or by less than NEGLIGIBLE_SWAP_NATS nats per frame).
    """
    gaps = summary["gaps"]
    horizon = len(summary["pred_psnr"])
    beats = {b: gaps[b]["beats_from"] for b in BASELINES}

    def gap_text(base: str) -> str:
        g = gaps[base]
        parts = [f"{_pm(g['psnr_mean'], g['psnr_mean_se'])} dB full-frame"]
        if g.get("moving_psnr_mean") is not None:
            parts.append(f"{_pm(g['moving_psnr_mean'], g['moving_psnr_mean_se'])} dB on moving pixels")
        return ", ".join(parts)

    if not any(gaps["train_mean"]["wins"]):
        code = "no_better_than_constant"
        text = ("prediction does not beat the mean training frame (a constant image) at any step: model − "
                f"constant = {gap_text('train_mean')} over the horizon")
    elif all(k is not None for k in beats.values()):
        code = "beats_every_baseline"
        k = max(beats.values())
        text = f"prediction beats every baseline from +{k} (of +{horizon})"
        all_won = [j + 1 for j in range(horizon) if all(gaps[b]["wins"][j] for b in BASELINES)]
        if len(all_won) > horizon - k + 1:   # won steps before +k too, with a gap that is not significant
            text += f", and at {len(all_won)} of {horizon} steps in all ({_steps_text(all_won)})"
        weakest = min(BASELINES, key=lambda b: gaps[b]["psnr_mean"] if gaps[b]["psnr_mean"] is not None else 0)
        text += f"; closest baseline: {BASELINE_NAMES[weakest]} ({gap_text(weakest)})"
    else:
        code = "partial"
        won = [f"{BASELINE_NAMES[b]} from +{k}" for b, k in beats.items() if k is not None]
        lost = [f"{BASELINE_NAMES[b]} ({gap_text(b)})" for b, k in beats.items() if k is None]
        text = ("prediction beats " + (", ".join(won) if won else "no baseline up to the last step")
                + "; it does not beat " + "; ".join(lost))
    flags: list[str] = []
    notes: list[str] = []
    ratio, ratio_se = summary.get("action_shuffle_ratio"), summary.get("action_shuffle_ratio_se")
    if ratio:
        if not any(_significant((r or 0.0) - 1.0, s if s is not None else math.nan) for r, s in zip(ratio, ratio_se)):
            flags.append("actions_ignored")
            notes.append("the future actions make no difference (action-shuffle ratio "
                         f"{_pm(summary.get('action_shuffle_ratio_mean'), summary.get('action_shuffle_ratio_mean_se'), '.3f')})")
    for name in ("z", "h"):
        gap = (controls or {}).get(f"{name}_swap_gap_nats_per_frame")
        if gap is None:
            continue
        se = (controls or {}).get(f"{name}_swap_gap_nats_per_frame_se")
        if gap < NEGLIGIBLE_SWAP_NATS or not _significant(gap, se if se is not None else math.nan):
            flags.append(f"{name}_ignored")
            # no number here: the gap is resolved to ~0.01 nats (float32 totals) and is in the controls table
            notes.append(f"the decoder ignores {name} (another window's {name} changes the reconstruction NLL by "
                         f"less than {SIGNIFICANCE:g} SE or {NEGLIGIBLE_SWAP_NATS:g} nats/frame)")
    if notes:
        text += "; " + "; ".join(notes)
    return {"code": code, "text": text, "beats_from": beats, "flags": flags}


def _pm(mean, se, spec: str = ".2f") -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    sign = "+" if spec == ".2f" and mean > 0 else ""
    return f"{sign}{format(mean, spec)} ± {format(se, spec) if se is not None and math.isfinite(se) else 'n/a'}"
