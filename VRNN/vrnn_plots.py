"""Figures of a run: loss curves, reconstructions, open-loop rollouts, mixture weights, attention, a GIF.

Every function takes plain tensors or arrays (frames in [-1, 1], ``[T, 3, H, W]``), writes one PNG (or a
GIF) with matplotlib's non-interactive Agg backend, creates the parent folder, closes its figure and
returns the path it wrote (``None`` when there is nothing to draw, e.g. an empty metrics file). They
do not touch any model: ``evaluation.make_evaluation_plots`` computes what they draw.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from VRNN.metrics_log import metric_series, read_metrics

__all__ = [
    "component_responsibilities",
    "plot_component_gallery",
    "plot_dominant_component",
    "plot_attention_maps",
    "plot_loss_curves",
    "plot_mixture_weights",
    "plot_open_loop_grid",
    "plot_psnr_vs_horizon",
    "plot_reconstruction_grid",
    "save_rollout_gif",
    "to_uint8_frames",
]

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def to_uint8_frames(frames) -> np.ndarray:
    """Frames in [-1, 1] (float) or uint8, [..., 3, H, W] -> uint8 [..., H, W, 3] for display."""
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.ndim < 3 or arr.shape[-3] != 3:
        raise ValueError(f"expected frames [..., 3, H, W], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip((arr.astype(np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.moveaxis(arr, -3, -1)


def _as_sequence(frames, name: str) -> np.ndarray:
    """[T,3,H,W] or [B,T,3,H,W] (first sequence taken) -> uint8 [T,H,W,3]."""
    img = to_uint8_frames(frames)
    if img.ndim == 5:
        img = img[0]
    if img.ndim != 4:
        raise ValueError(f"{name} must be [T,3,H,W] or [B,T,3,H,W], got {np.shape(frames)}")
    return img


def _frame_indices(t: int, max_frames: int) -> np.ndarray:
    if t <= max_frames:
        return np.arange(t)
    return np.unique(np.linspace(0, t - 1, max_frames).round().astype(int))


# --------------------------------------------------------------------------------------------------
# Loss curves
# Panels of the loss figure: title -> metric keys (drawn when present in the rows).
LOSS_PANELS: dict[str, tuple[str, ...]] = {
    "task losses": ("total_vae_loss", "perceiver_loss", "attention_loss", "adversarial_loss"),
    "ELBO terms (nats/dim)": ("recon_loss", "kl_z", "kl_sticks", "kl_alpha"),
    "bits per dim": ("bits_per_dim", "eval/bits_per_dim"),
    "mixture": ("K_eff", "cluster_entropy", "eval/K_eff"),
    "attention": ("attention_kl", "attention_dynamics_loss", "attention_diversity", "attention_slot_recon"),
    "discriminator": ("disc_loss", "real_score", "fake_score"),
    "schedules": ("beta", "lr", "learning_rate", "adversarial_weight"),
    "prediction PSNR (dB), validation": ("eval/pred_psnr_mean", "eval/recon_psnr", "eval/copy_last_psnr_mean",
                                         "eval/train_mean_psnr_mean", "eval/pred_moving_psnr_mean",
                                         "eval/train_mean_moving_psnr_mean"),
    "controls, validation": ("eval/action_shuffle_ratio_mean", "eval/z_spread_ratio", "eval/perceiver_accuracy",
                             "eval/perceiver_copy_accuracy"),
}


def plot_loss_curves(metrics: str | Path | Iterable[Mapping], path: str | Path,
                     panels: Mapping[str, Sequence[str]] = LOSS_PANELS) -> Path | None:
    """One subplot per panel of metric keys against ``step``; metrics: a metrics.jsonl path or its rows."""
    rows = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    series = metric_series(rows)
    used = [(title, [k for k in keys if k in series]) for title, keys in panels.items()]
    used = [(title, keys) for title, keys in used if keys]
    if not used:
        logger.info("no metrics to plot")
        return None
    plt = _pyplot()
    cols = min(3, len(used))
    rows_n = math.ceil(len(used) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, used):
        for key in keys:
            steps, values = series[key]
            ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(used):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Frame grids
def _grid(rows: Sequence[tuple[str, np.ndarray, str]], path: str | Path, title: str,
          col_labels: Sequence[str]) -> Path:
    """rows: (label, images [N,H,W,3] uint8 or maps [N,H,W] float, cmap)."""
    plt = _pyplot()
    n_cols = len(col_labels)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.3 * n_cols + 0.8, 1.4 * len(rows) + 0.4),
                             squeeze=False)
    for r, (label, images, cmap) in enumerate(rows):
        vmax = float(np.nanmax(images)) if images.ndim == 3 and np.isfinite(images).any() else None
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c], cmap=cmap, vmin=0 if cmap else None, vmax=vmax if cmap else None,
                          interpolation="nearest")
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title(col_labels[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_reconstruction_grid(truth, reconstruction, path: str | Path, max_frames: int = 8,
                             title: str = "Reconstruction (posterior)") -> Path:
    """Rows: truth, reconstruction. truth, reconstruction: [T,3,H,W] or [B,T,3,H,W] (first sequence), in [-1,1]."""
    x = _as_sequence(truth, "truth")
    y = _as_sequence(reconstruction, "reconstruction")
    if x.shape != y.shape:
        raise ValueError(f"truth {x.shape} and reconstruction {y.shape} differ in shape")
    idx = _frame_indices(len(x), max_frames)
    return _grid([("truth", x[idx], None), ("recon", y[idx], None)], path, title, [f"t={i}" for i in idx])


def plot_open_loop_grid(truth, prediction, path: str | Path, context=None, max_frames: int = 10,
                        title: str = "Open-loop prediction") -> Path:
    """Rows: truth, model, |error| (mean over channels, in [-1,1] units: 0..2).

    truth, prediction: the imagined steps [F,3,H,W] (or [B,F,...], first sequence); context: the observed
    frames [T0,3,H,W] shown first in the truth row (model and error rows blank there).
    """
    x = _as_sequence(truth, "truth")
    y = _as_sequence(prediction, "prediction")
    if x.shape != y.shape:
        raise ValueError(f"truth {x.shape} and prediction {y.shape} differ in shape")
    xt = _np(truth)
    yt = _np(prediction)
    if xt.ndim == 5:
        xt, yt = xt[0], yt[0]
    err = np.abs(xt - yt).mean(axis=1)                                    # [F,H,W]
    idx = _frame_indices(len(x), max_frames)
    labels = [f"+{i + 1}" for i in idx]
    truth_row, model_row, err_row = x[idx], y[idx], err[idx]
    if context is not None:
        ctx = _as_sequence(context, "context")
        t0 = len(ctx)
        cidx = _frame_indices(t0, 3)
        labels = [f"obs {i + 1}/{t0}" for i in cidx] + labels
        truth_row = np.concatenate([ctx[cidx], truth_row])
        blank = np.full((len(cidx),) + y.shape[1:], 255, dtype=np.uint8)
        model_row = np.concatenate([blank, model_row])
        err_row = np.concatenate([np.full((len(cidx),) + err.shape[1:], np.nan, dtype=err.dtype), err_row])
    return _grid([("truth", truth_row, None), ("model", model_row, None), ("|error|", err_row, "magma")],
                 path, title, labels)


# --------------------------------------------------------------------------------------------------
# Numbers against the horizon
def plot_psnr_vs_horizon(eval_dict: Mapping[str, object], path: str | Path) -> Path | None:
    """Open-loop quality per imagined step: full-frame PSNR, moving-pixel PSNR and SSIM panels (those present),
    the model against the copy-last-frame, context-mean and mean-training-frame baselines, each curve with
    a band of +-1 standard error (``<key>_se`` in ``eval_dict``). Keys as ``evaluation.evaluate`` writes them
    (``pred_psnr``, ``copy_last_moving_psnr``, ...)."""
    predictors = [("model", "pred"), ("copy last frame", "copy_last"), ("context mean", "context_mean"),
                  ("mean training frame", "train_mean")]
    metrics = [("psnr", "full-frame PSNR (dB)"), ("moving_psnr", "moving-pixel PSNR (dB)"), ("ssim", "SSIM")]
    panels = []
    for metric, ylabel in metrics:
        lines = [(label, eval_dict[f"{p}_{metric}"], eval_dict.get(f"{p}_{metric}_se")) for label, p in predictors
                 if eval_dict.get(f"{p}_{metric}")]
        if lines:
            panels.append((ylabel, lines))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    styles = {"model": {"marker": "o", "linewidth": 2, "color": "C0"},
              "copy last frame": {"linestyle": "--", "marker": "s", "color": "C1"},
              "context mean": {"linestyle": ":", "marker": "^", "color": "C2"},
              "mean training frame": {"linestyle": "-.", "marker": "v", "color": "C3"}}
    for ax, (ylabel, lines) in zip(axes.flat, panels):
        for label, values, errors in lines:
            y = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
            x = np.arange(1, len(y) + 1)
            ax.plot(x, y, label=label, **styles[label])
            if errors:
                e = np.array([np.nan if v is None else v for v in errors], dtype=np.float64)
                ax.fill_between(x, y - e, y + e, color=styles[label]["color"], alpha=0.15, linewidth=0)
        ax.set_xlabel("steps into the future")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    verdict = eval_dict.get("verdict")
    title = "Open-loop prediction against horizon (bands: ±1 standard error over windows)"
    if isinstance(verdict, Mapping) and verdict.get("code"):
        title += f"\nverdict: {verdict['code'].replace('_', ' ')}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Mixture components
def component_responsibilities(z, log_pi, means, logvars) -> torch.Tensor:
    """Posterior responsibility of each prior component for the latent it explains.

    z [..., D] (posterior draws or means), log_pi [..., K], means / logvars [..., K, D] (the prior's
    components at the same steps) -> r [..., K] with r_k = pi_k N(z; mu_k, sigma_k^2) / sum_j (...)."""
    z, means, logvars = torch.as_tensor(z).double(), torch.as_tensor(means).double(), torch.as_tensor(logvars).double()
    log_n = -0.5 * (((z.unsqueeze(-2) - means) ** 2) / logvars.exp() + logvars + math.log(2 * math.pi)).sum(-1)
    return (log_n + torch.as_tensor(log_pi).double()).softmax(-1)


def plot_component_gallery(frames, responsibilities, path: str | Path, per_component: int = 6,
                           min_frames: int = 1) -> Path | None:
    """For each mixture component, the frames it claims most strongly (highest responsibility among the
    frames whose most responsible component it is). frames [N,3,H,W] in [-1,1], responsibilities [N,K].
    Components that claim fewer than ``min_frames`` frames are left out; None when none qualifies."""
    f = to_uint8_frames(frames)
    r = _np(responsibilities)
    if r.ndim != 2 or r.shape[0] != f.shape[0]:
        raise ValueError(f"responsibilities must be [N={f.shape[0]}, K], got shape {r.shape}")
    owner = r.argmax(1)
    rows = []
    for k in range(r.shape[1]):
        mine = np.nonzero(owner == k)[0]
        if len(mine) >= min_frames:
            best = mine[np.argsort(-r[mine, k])][:per_component]
            rows.append((k, best, len(mine)))
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), per_component, figsize=(1.3 * per_component, 1.4 * len(rows)), squeeze=False)
    for i, (k, best, count) in enumerate(rows):
        for j in range(per_component):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(best):
                ax.imshow(f[best[j]])
                ax.set_title(f"r={r[best[j], k]:.2f}", fontsize=6)
        axes[i, 0].text(-0.1, 0.5, f"k={k}\n{count} fr.", transform=axes[i, 0].transAxes, ha="right", va="center",
                        fontsize=7)
    fig.suptitle("Frames each mixture component claims most strongly (posterior responsibility)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_dominant_component(observed_resp, path: str | Path, imagined_pi=None, frames=None) -> Path:
    """The dominant component over a window: argmax responsibility on the observed steps (observed_resp
    [T,K]) and, when given, argmax of the prior's weights on the imagined steps (imagined_pi [F,K]);
    frames [T+F,3,H,W] (optional) are shown above the strip."""
    r = _np(observed_resp)
    k = r.shape[-1]
    dominant = list(r.argmax(-1))
    strength = list(r.max(-1))
    n_obs = len(dominant)
    if imagined_pi is not None:
        p = _np(imagined_pi)
        dominant += list(p.argmax(-1))
        strength += list(p.max(-1))
    plt = _pyplot()
    has_frames = frames is not None
    fig, axes = plt.subplots(2 if has_frames else 1, 1, figsize=(max(6, 0.55 * len(dominant)), 3.2 if has_frames else 2.2),
                             squeeze=False, gridspec_kw={"height_ratios": [1, 1.2]} if has_frames else None)
    if has_frames:
        f = to_uint8_frames(frames)[:len(dominant)]
        axes[0, 0].imshow(np.concatenate(list(f), axis=1))
        axes[0, 0].axis("off")
    ax = axes[-1, 0]
    colors = plt.get_cmap("tab20")(np.array(dominant) % 20)
    ax.bar(np.arange(len(dominant)), strength, color=colors, width=0.9)
    for t, c in enumerate(dominant):
        ax.text(t, 0.02, str(c), ha="center", va="bottom", fontsize=7)
    ax.axvline(n_obs - 0.5, color="k", lw=1, ls="--")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.5, len(dominant) - 0.5)
    ax.set_xlabel(f"step (left of the dashed line: observed, responsibility; right: imagined, prior weight); K = {k}")
    ax.set_ylabel("dominant\ncomponent")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Mixture weights
def plot_mixture_weights(pi, path: str | Path, usage: Sequence[float] | None = None,
                         threshold: float = 0.01) -> Path:
    """Left: stacked area of the prior's weights pi_k over time for one sequence; right: component usage.

    pi: [T,K] or [B,T,K] (first sequence drawn; usage defaults to the mean over all B*T).
    usage: mean pi per component [K] (e.g. from the evaluation), bars above ``threshold`` highlighted.
    """
    p = _np(pi)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3:
        raise ValueError(f"pi must be [T,K] or [B,T,K], got shape {np.shape(pi)}")
    k = p.shape[-1]
    u = np.asarray(usage, dtype=np.float64) if usage is not None else p.reshape(-1, k).mean(0)
    if u.shape != (k,):
        raise ValueError(f"usage must have one value per component ({k}), got shape {u.shape}")
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    t = np.arange(p.shape[1])
    colors = plt.get_cmap("tab20")(np.arange(k) % 20)
    ax1.stackplot(t, p[0].T, labels=[f"k={i}" for i in range(k)], colors=colors)
    ax1.set_xlim(0, max(1, len(t) - 1))
    ax1.set_ylim(0, 1)
    ax1.set_xlabel("time step t")
    ax1.set_ylabel("prior weight pi_k")
    ax1.set_title("mixture weights over time (one sequence)", fontsize=10)
    if k <= 20:
        ax1.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax2.bar(np.arange(k), u, color=[colors[i] if u[i] > threshold else "lightgrey" for i in range(k)])
    ax2.axhline(threshold, color="black", linestyle="--", linewidth=0.8)
    ax2.set_xlabel("component k")
    ax2.set_ylabel("mean pi_k")
    ax2.set_title(f"usage: {(u > threshold).sum()} of {k} above {threshold}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Attention
def _upsample_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """[N,R,R] -> [N,size,size] bilinear, each map scaled to [0,1] for display."""
    t = torch.as_tensor(maps, dtype=torch.float32)[:, None]
    up = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    return ((up - lo) / (hi - lo).clamp_min(1e-12)).numpy()


def plot_attention_maps(frames, attention_maps, path: str | Path, slot_maps=None, max_frames: int = 8,
                        title: str = "Attention schema") -> Path:
    """Rows: frames; attention map A_t over the frame; one row per slot map (when given).

    frames: [T,3,H,W]; attention_maps: [T,R,R]; slot_maps: [T,S,R,R] (or the same with a leading B: the
    first sequence is drawn). Maps are upsampled to the frame size and drawn over a dimmed frame.
    """
    img = _as_sequence(frames, "frames")
    att = _np(attention_maps)
    att = att[0] if att.ndim == 4 else att
    if att.ndim != 3 or len(att) != len(img):
        raise ValueError(f"attention_maps must be [T,R,R] with T={len(img)}, got {np.shape(attention_maps)}")
    slots = None
    if slot_maps is not None:
        slots = _np(slot_maps)
        slots = slots[0] if slots.ndim == 5 else slots
        if slots.ndim != 4 or len(slots) != len(img):
            raise ValueError(f"slot_maps must be [T,S,R,R] with T={len(img)}, got {np.shape(slot_maps)}")
    idx = _frame_indices(len(img), max_frames)
    size = img.shape[1]
    rows = [("frame", img[idx], None, None), ("attention", img[idx], _upsample_maps(att[idx], size), "jet")]
    if slots is not None:
        for s in range(slots.shape[1]):
            rows.append((f"slot {s}", img[idx], _upsample_maps(slots[idx, s], size), "viridis"))
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), len(idx), figsize=(1.3 * len(idx) + 0.8, 1.4 * len(rows) + 0.4),
                             squeeze=False)
    for r, (label, images, overlay, cmap) in enumerate(rows):
        for c in range(len(idx)):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if overlay is None:
                ax.imshow(images[c])
            else:
                ax.imshow((images[c] * 0.5).astype(np.uint8))
                ax.imshow(overlay[c], cmap=cmap, alpha=0.55, vmin=0, vmax=1)
            if r == 0:
                ax.set_title(f"t={idx[c]}", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Animated rollout
def save_rollout_gif(truth, prediction, path: str | Path, context=None, scale: int = 2,
                     frame_ms: int = 250) -> Path:
    """Animated GIF, truth | model side by side, one GIF frame per step (context steps first).

    truth, prediction: imagined steps [F,3,H,W] in [-1,1] (or [B,F,...], first sequence); context: observed
    frames [T0,3,H,W], shown in both panels. A bar under the panels marks progress: green while observing,
    red while imagining (it also keeps consecutive GIF frames distinct, so none are merged).
    Frames: T0 + F when context is given, else F.
    """
    from PIL import Image

    x = _as_sequence(truth, "truth")
    y = _as_sequence(prediction, "prediction")
    if x.shape != y.shape:
        raise ValueError(f"truth {x.shape} and prediction {y.shape} differ in shape")
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    ctx = _as_sequence(context, "context") if context is not None else x[:0]
    left = np.concatenate([ctx, x])
    right = np.concatenate([ctx, y])
    n, h, w, _ = left.shape
    gap, bar = 4, 4
    frames = []
    for i in range(n):
        canvas = np.full((h + gap + bar, 2 * w + gap, 3), 255, dtype=np.uint8)
        canvas[:h, :w] = left[i]
        canvas[:h, w + gap:] = right[i]
        filled = max(1, round((i + 1) / n * canvas.shape[1]))
        canvas[h + gap:, :filled] = (40, 170, 60) if i < len(ctx) else (210, 50, 40)
        im = Image.fromarray(canvas)
        if scale > 1:
            im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        frames.append(im)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0, optimize=False)
    return path
