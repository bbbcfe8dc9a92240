"""Held-out evaluation of the world model: numbers (``evaluate``), figures (``make_evaluation_plots``) and
the run's ``report.md`` (``write_report``). docs/EVALUATION.md explains every number and figure.

Protocol (SYSTEM.md section 4)
------------------------------
Windows of L >= T0 + F consecutive rows of the held-out split, T0 = ``config.eval_context_frames``,
F = ``config.eval_horizon`` (build the eval dataset with ``eval_sequence_length(config)``).

* ELBO terms, bits/dim, K_eff, Perceiver next-token accuracy and the reconstructions come from ONE call
  of ``model.compute_total_loss`` (the same function as in training) on the first
  ``min(L, config.sequence_length)`` frames, so the numbers are on the same footing as the training
  curves. Loss scalars are batch means, averaged here weighted by the windows in each batch.
* Open-loop prediction: ``model.generate_future_sequence(obs[:, :T0], actions[:, :T0],
  actions[:, T0:T0+F], temperature=0)`` (the action of row t is the one taken after frame t, so
  ``actions[:, T0-1]`` leads to the first imagined frame ``obs[:, T0]``); compared with
  ``obs[:, T0:T0+F]`` step by step.
* Baselines on the same windows and steps: copy-last-frame (every future frame = ``obs[:, T0-1]``) and
  mean-frame (every future frame = the mean of the T0 observed frames of that window).
* PSNR and SSIM per image with data range 2 (frames in [-1, 1]), averaged over windows; a per-image PSNR
  is capped at ``PSNR_CAP_DB`` so that an exact copy (MSE 0) does not turn the mean into infinity.

Safety: the model (or the EMA copy when ``ema`` is given) is run in eval mode under ``torch.no_grad``;
the train/eval flag of every submodule is restored afterwards, so neither weights, BatchNorm statistics nor
the Perceiver's VQ codebook change. Sampling inside the model uses a forked RNG seeded from
``generator`` (or ``config.seed``), so evaluation is reproducible and leaves the global RNG streams of
the training run untouched.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from VRNN.advanced_metrics import lpips_available, lpips_per_image, psnr_per_image, ssim_per_image

__all__ = [
    "DATA_RANGE",
    "PSNR_CAP_DB",
    "USAGE_THRESHOLD",
    "eval_sequence_length",
    "evaluate",
    "make_evaluation_plots",
    "scalar_metrics",
    "write_report",
]

logger = logging.getLogger(__name__)

DATA_RANGE = 2.0          # frames live in [-1, 1]
PSNR_CAP_DB = 100.0       # per-image cap; MSE 0 would give +inf
USAGE_THRESHOLD = 0.01    # a component counts as used when its mean prior weight exceeds this

# Loss keys promoted to the top level of the evaluation dict (MODEL.md section 3); all scalar losses are
# also kept under "losses".
ELBO_KEYS = ("recon_loss", "kl_z", "kl_sticks", "kl_alpha", "hierarchical_kl", "cluster_entropy",
             "bits_per_dim", "K_eff", "total_vae_loss", "perceiver_loss", "attention_loss",
             "adversarial_loss", "attention_kl", "active_components")
# Where the Perceiver's next-token accuracy may sit in the losses dict (first present wins).
ACCURACY_KEYS = ("perceiver_accuracy", "perceiver_next_token_accuracy", "next_token_accuracy", "accuracy")
HORIZON_KEYS = ("pred_psnr", "pred_ssim", "copy_last_psnr", "copy_last_ssim", "mean_frame_psnr",
                "mean_frame_ssim")


def eval_sequence_length(config) -> int:
    """Rows per evaluation window: enough for the training window and for T0 observed + F imagined steps."""
    return max(int(config.sequence_length), int(config.eval_context_frames) + int(config.eval_horizon))


# --------------------------------------------------------------------------------------------------
# Helpers
def _unwrap(model: nn.Module) -> nn.Module:
    """The world model inside a ModelEMA / DistributedDataParallel wrapper (or the model itself)."""
    while not hasattr(model, "compute_total_loss") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if not hasattr(model, "compute_total_loss"):
        raise ValueError(f"expected the AIME world model (or a wrapper of it), got {type(model).__name__}")
    return model


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode inside, and every submodule's own train/eval flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in flags:
            m.training = was_training


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int):
    """Private RNG streams (CPU and the model's GPU), seeded with ``seed``; the caller's are restored after."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)      # this device only: other GPUs' streams are not forked
        yield


def _to_unit_range(obs: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] or float [-1,1] frames -> float32 in [-1,1]."""
    if obs.dtype == torch.uint8:
        return obs.float() / 127.5 - 1.0
    return obs.float()


def _batches(data, max_windows: int, batch_size: int, generator: torch.Generator | None) -> tuple[Iterable, int]:
    """Batches of at most ``max_windows`` windows from a map-style dataset or an iterable of batch dicts.

    From a dataset: ``max_windows`` windows evenly spaced over the dataset (the same ones at every
    evaluation), or a random subset drawn with ``generator`` when one is given.
    """
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        n = len(data)
        if n == 0:
            raise ValueError("the evaluation dataset is empty")
        k = min(max_windows, n)
        if generator is not None:
            idx = torch.randperm(n, generator=generator)[:k].sort().values.tolist()
        else:
            idx = torch.linspace(0, n - 1, k).round().long().unique().tolist()
        loader = DataLoader(Subset(data, idx), batch_size=batch_size, shuffle=False, num_workers=0)
        return loader, len(idx)
    if isinstance(data, Iterable):
        return data, max_windows
    raise ValueError(f"expected a Dataset or an iterable of batch dicts, got {type(data).__name__}")


def _progress_enabled(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return sys.stderr.isatty() and int(os.environ.get("RANK", "0")) == 0


def _scalar(value) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.detach().float().item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------------
# Evaluation
@torch.no_grad()
def evaluate(model: nn.Module, dataset_or_loader, config=None, device: torch.device | str | None = None,
             max_windows: int | None = None, generator: torch.Generator | None = None,
             ema: nn.Module | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Evaluate on held-out windows; returns a JSON-serialisable dict (keys in docs/EVALUATION.md).

    model: the world model (``ema``, a ``ModelEMA`` or its ``.module``, is evaluated instead when given).
    dataset_or_loader: a dataset of window dicts (``observations [L,3,64,64]``, ``actions [L,A]``) or an
    iterable of batches of them ([B,L,...]); L >= T0 + F. config: an ``AIMEConfig`` (default: the model's).
    device: where to run (default: the model's device). max_windows: default ``config.eval_windows``.
    generator: picks the windows (see ``_batches``) and seeds the model's sampling.

    Per-horizon lists (``pred_psnr``, ``pred_ssim``, ``copy_last_*``, ``mean_frame_*``) have length F,
    entry j being j+1 steps after the last observed frame; PSNR in dB, SSIM in [-1, 1].
    """
    net = _unwrap(ema if ema is not None else model)
    config = config if config is not None else net.config
    device = torch.device(device) if device is not None else next(net.parameters()).device
    max_windows = int(max_windows if max_windows is not None else config.eval_windows)
    if max_windows < 1:
        raise ValueError(f"max_windows must be a positive integer, got {max_windows}")
    t0, horizon = int(config.eval_context_frames), int(config.eval_horizon)
    if t0 < 1 or horizon < 1:
        raise ValueError(f"eval_context_frames and eval_horizon must be >= 1, got {t0} and {horizon}")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item()) if generator is not None \
        else int(config.seed)
    batches, expected = _batches(dataset_or_loader, max_windows, int(config.batch_size), generator)

    n_seen = 0
    loss_sums: dict[str, float] = {}
    sums = {key: torch.zeros(horizon, dtype=torch.float64) for key in HORIZON_KEYS}
    lpips_sum = torch.zeros(horizon, dtype=torch.float64) if lpips_available() else None
    recon_psnr = recon_ssim = 0.0
    recon_frames = 0
    usage_sum: torch.Tensor | None = None
    usage_count = 0
    # The weights come from the model's config; no warm-up factors at evaluation.
    loss_kwargs = {"beta": 1.0, "adversarial_weight": 1.0}

    bar = tqdm(total=expected, desc="eval", unit="win", disable=not _progress_enabled(progress), leave=False)
    with _eval_mode(net), _forked_rng(device, seed):
        for batch in batches:
            if n_seen >= max_windows:
                break
            obs = _to_unit_range(batch["observations"])
            actions = batch["actions"].float()
            take = min(obs.shape[0], max_windows - n_seen)
            obs, actions = obs[:take].to(device), actions[:take].to(device)
            b, length = obs.shape[:2]
            if length < t0 + horizon:
                raise ValueError(f"evaluation windows have {length} frames but eval_context_frames + "
                                 f"eval_horizon = {t0} + {horizon} are needed; build the eval dataset with "
                                 f"sequence_length=eval_sequence_length(config) = {eval_sequence_length(config)}")

            # ELBO terms and reconstructions, on the training window length.
            t_loss = min(length, int(config.sequence_length))
            losses, outputs = net.compute_total_loss(obs[:, :t_loss], actions[:, :t_loss], **loss_kwargs)
            for key, value in losses.items():
                v = _scalar(value)
                if v is not None:
                    loss_sums[key] = loss_sums.get(key, 0.0) + v * b
            recon = outputs["reconstructions"].float().clamp(-1, 1)
            truth = obs[:, :t_loss]
            recon_psnr += psnr_per_image(recon, truth, DATA_RANGE).clamp(max=PSNR_CAP_DB).sum().item()
            recon_ssim += ssim_per_image(recon, truth, DATA_RANGE).sum().item()
            recon_frames += b * t_loss
            pi = outputs["pi"].float()                                          # [B,T,K]
            usage_sum = pi.sum((0, 1)).cpu().double() + (0 if usage_sum is None else usage_sum)
            usage_count += pi.shape[0] * pi.shape[1]

            # Open-loop prediction and the baselines on the same windows.
            future = net.generate_future_sequence(obs[:, :t0], actions[:, :t0], actions[:, t0:t0 + horizon],
                                                  temperature=0.0)
            pred = future["frames"].float().clamp(-1, 1)
            target = obs[:, t0:t0 + horizon]
            copy_last = obs[:, t0 - 1:t0].expand_as(target)
            mean_frame = obs[:, :t0].mean(1, keepdim=True).expand_as(target)
            for name, guess in (("pred", pred), ("copy_last", copy_last), ("mean_frame", mean_frame)):
                sums[f"{name}_psnr"] += psnr_per_image(guess, target, DATA_RANGE).clamp(max=PSNR_CAP_DB) \
                    .sum(0).cpu().double()
                sums[f"{name}_ssim"] += ssim_per_image(guess, target, DATA_RANGE).sum(0).cpu().double()
            if lpips_sum is not None:
                lpips_sum += lpips_per_image(pred, target).sum(0).cpu().double()
            n_seen += b
            bar.update(b)
    bar.close()
    if n_seen == 0:
        raise ValueError("no evaluation window was read from dataset_or_loader")

    losses_mean = {k: v / n_seen for k, v in loss_sums.items()}
    usage = (usage_sum / usage_count).tolist()
    result: dict[str, Any] = {
        "num_windows": n_seen,
        "context_frames": t0,
        "horizon": horizon,
        "used_ema": ema is not None,
        "recon_psnr": recon_psnr / recon_frames,
        "recon_ssim": recon_ssim / recon_frames,
    }
    for key in HORIZON_KEYS:
        per_step = (sums[key] / n_seen).tolist()
        result[key] = per_step
        result[f"{key}_mean"] = sum(per_step) / horizon
    if lpips_sum is not None:
        result["pred_lpips"] = (lpips_sum / n_seen).tolist()
    for key in ELBO_KEYS:
        if key in losses_mean:
            result[key] = losses_mean[key]
    if all(k in losses_mean for k in ("recon_loss", "kl_z", "kl_sticks", "kl_alpha")):
        result["neg_elbo_nats_per_dim"] = sum(losses_mean[k] for k in ("recon_loss", "kl_z", "kl_sticks",
                                                                       "kl_alpha"))
    accuracy_key = next((k for k in ACCURACY_KEYS if k in losses_mean), None)
    result["perceiver_accuracy"] = losses_mean[accuracy_key] if accuracy_key else None
    if accuracy_key is None:
        logger.warning("the model's losses hold no Perceiver accuracy (looked for %s)", ", ".join(ACCURACY_KEYS))
    result["component_usage"] = usage
    result["components_used"] = int(sum(u > USAGE_THRESHOLD for u in usage))
    result["losses"] = losses_mean
    return _clean(result)


def _clean(value):
    """Floats that JSON can hold (non-finite -> None), recursively."""
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def scalar_metrics(eval_dict: Mapping[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The scalar entries of an evaluation dict, prefixed, for one metrics.jsonl row."""
    return {f"{prefix}{k}": v for k, v in eval_dict.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------------------
# Figures
def _first(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x[0].detach().float().cpu()


def _plot_batch(batch) -> Mapping[str, torch.Tensor]:
    """A batch dict as it is, or the first window of a dataset / first batch of a loader."""
    if isinstance(batch, Mapping):
        return batch
    if isinstance(batch, Dataset) and hasattr(batch, "__len__"):
        if len(batch) == 0:
            raise ValueError("cannot plot from an empty dataset")
        return {k: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v for k, v in batch[0].items()}
    if isinstance(batch, Iterable):
        first = next(iter(batch), None)
        if isinstance(first, Mapping):
            return first
    raise ValueError(f"expected a batch dict, a dataset or a loader of batch dicts, got {type(batch).__name__}")


@torch.no_grad()
def make_evaluation_plots(model: nn.Module, batch: Mapping[str, torch.Tensor], eval_dict: Mapping[str, Any],
                          out_dir: str | Path, visualize_attention: bool = True,
                          metrics_path: str | Path | None = None, seed: int = 0) -> dict[str, Path]:
    """Write every evaluation figure for the first window of ``batch``; returns {name: path}.

    model: the world model (or a ModelEMA / DDP wrapper). batch: ``observations [B,L,3,64,64]``,
    ``actions [B,L,A]`` with L >= T0 + F (e.g. one batch of the eval loader), or the eval dataset / loader
    itself (its first window / batch is drawn). eval_dict: the result of
    ``evaluate`` (PSNR-vs-horizon figure, component usage). metrics_path: the run's metrics.jsonl for
    the loss and gradient-cosine curves (default: ``out_dir/../metrics.jsonl`` when it exists).
    Figures: loss_curves, grad_cosines (when the metrics have them), reconstruction, open_loop,
    psnr_vs_horizon, mixture_weights, attention and attention_imagined (``visualize_attention``), and the
    animated rollout_gif (T0 + F frames). Same eval-mode and RNG guarantees as ``evaluate``.
    """
    from VRNN import vrnn_plots as plots
    from VRNN.grad_diagnostics import plot_gradient_cosines
    from VRNN.metrics_log import read_metrics

    net = _unwrap(model)
    config = net.config
    device = next(net.parameters()).device
    batch = _plot_batch(batch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, horizon = int(config.eval_context_frames), int(config.eval_horizon)
    obs = _to_unit_range(batch["observations"][:1]).to(device)
    actions = batch["actions"][:1].float().to(device)
    length = obs.shape[1]
    if length < t0 + horizon:
        raise ValueError(f"the plotting batch has {length} frames, {t0} + {horizon} are needed")
    t_loss = min(length, int(config.sequence_length))
    with _eval_mode(net), _forked_rng(device, seed):
        outputs = net.forward_sequence(obs[:, :t_loss], actions[:, :t_loss])
        future = net.generate_future_sequence(obs[:, :t0], actions[:, :t0], actions[:, t0:t0 + horizon],
                                              temperature=0.0)
    truth = obs[0, t0:t0 + horizon].cpu()
    pred = future["frames"][0].float().clamp(-1, 1).cpu()
    context = obs[0, :t0].cpu()

    paths: dict[str, Path | None] = {}
    metrics_path = Path(metrics_path) if metrics_path is not None else out_dir.parent / "metrics.jsonl"
    rows = read_metrics(metrics_path)
    if rows:
        paths["loss_curves"] = plots.plot_loss_curves(rows, out_dir / "loss_curves.png")
        paths["grad_cosines"] = plot_gradient_cosines(rows, out_dir / "grad_cosines.png")
    paths["reconstruction"] = plots.plot_reconstruction_grid(
        obs[0, :t_loss].cpu(), outputs["reconstructions"][0].float().clamp(-1, 1).cpu(),
        out_dir / "reconstruction.png")
    paths["open_loop"] = plots.plot_open_loop_grid(truth, pred, out_dir / "open_loop.png", context=context)
    paths["psnr_vs_horizon"] = plots.plot_psnr_vs_horizon(eval_dict, out_dir / "psnr_vs_horizon.png")
    paths["mixture_weights"] = plots.plot_mixture_weights(
        _first(outputs["pi"]), out_dir / "mixture_weights.png", usage=eval_dict.get("component_usage"),
        threshold=USAGE_THRESHOLD)
    if visualize_attention:
        paths["attention"] = plots.plot_attention_maps(
            obs[0, :t_loss].cpu(), _first(outputs["attention_maps"]), out_dir / "attention.png",
            slot_maps=_first(outputs.get("slot_maps")), title="Attention (posterior) and slot maps")
        imagined = future.get("attention_maps")
        if isinstance(imagined, torch.Tensor) and imagined.dim() == 4 and imagined.shape[1] == horizon:
            paths["attention_imagined"] = plots.plot_attention_maps(
                pred, _first(imagined), out_dir / "attention_imagined.png",
                title="Attention while imagining (over the model's frames)")
    paths["rollout_gif"] = plots.save_rollout_gif(truth, pred, out_dir / "rollout.gif", context=context)
    return {name: p for name, p in paths.items() if p is not None}


# --------------------------------------------------------------------------------------------------
# Report
def _fmt(value, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _image(run_dir: Path, plot_paths: Mapping[str, Path], name: str, caption: str) -> list[str]:
    if name not in plot_paths:
        return []
    rel = Path(os.path.relpath(Path(plot_paths[name]).resolve(), run_dir.resolve())).as_posix()
    return [f"![{caption}]({rel})", ""]


def write_report(run_dir: str | Path, eval_dict: Mapping[str, Any], plot_paths: Mapping[str, Path],
                 config) -> Path:
    """Write ``run_dir/report.md``: the evaluation numbers as tables beside the figures (relative links)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    e = eval_dict
    lines = ["# AIME evaluation report", ""]
    step = e.get("step")
    lines += [f"Environment `{config.env}`" + (f", after {step} optimiser steps" if step is not None else "")
              + f"; {e.get('num_windows')} held-out windows"
              + (" (EMA weights)" if e.get("used_ema") else "") + ".",
              "",
              (f"Model: latent D={config.latent_dim}, K={config.max_components} components, hidden "
              f"H={config.hidden_dim}, context C={config.context_dim}, likelihood `{config.likelihood}`, "
              f"trained on windows of T={config.sequence_length}. Open loop: observe T0="
              f"{e.get('context_frames')} frames, imagine F={e.get('horizon')} from the recorded actions "
              "(temperature 0). Full config: `config.json`."), ""]

    lines += ["## Open-loop prediction", "",
              ("PSNR in dB and SSIM (data range 2, frames in [-1, 1]) at each step after the last observed "
              "frame, against two baselines on the same windows. Bold: best of the three."), "",
              ("| step | model PSNR | copy-last PSNR | mean-frame PSNR | model SSIM | copy-last SSIM "
              "| mean-frame SSIM |"), "|---:|---:|---:|---:|---:|---:|---:|"]

    def cells(j, metric, spec):
        values = [e[f"{name}_{metric}"][j] if j is not None else e[f"{name}_{metric}_mean"]
                  for name in ("pred", "copy_last", "mean_frame")]
        shown = [_fmt(v, spec) for v in values]
        finite = [float(t) for t in shown if t != "n/a"]
        best = max(finite) if finite else None
        return [f"**{t}**" if t != "n/a" and float(t) == best else t for t in shown]

    for j in range(int(e.get("horizon", 0))):
        lines.append(f"| +{j + 1} | " + " | ".join(cells(j, "psnr", ".2f") + cells(j, "ssim", ".3f")) + " |")
    lines.append("| mean | " + " | ".join(cells(None, "psnr", ".2f") + cells(None, "ssim", ".3f")) + " |")
    lines.append("")
    if e.get("pred_lpips"):
        lines += ["LPIPS per step: " + ", ".join(_fmt(v, ".3f") for v in e["pred_lpips"]), ""]
    lines += _image(run_dir, plot_paths, "psnr_vs_horizon", "PSNR and SSIM against horizon")
    lines += _image(run_dir, plot_paths, "open_loop", "Open-loop grid: truth, model, error")
    lines += _image(run_dir, plot_paths, "rollout_gif", "Open-loop rollout, truth | model")

    lines += ["## Reconstruction and the ELBO", "",
              (f"Posterior reconstruction: PSNR {_fmt(e.get('recon_psnr'), '.2f')} dB, SSIM "
              f"{_fmt(e.get('recon_ssim'), '.3f')}."), "",
              "| term | value (nats per dimension) |", "|---|---:|"]
    for key, label in (("recon_loss", "reconstruction −log p(x \\| z)"), ("kl_z", "KL_z"),
                       ("kl_sticks", "KL sticks (Kumaraswamy ‖ Beta)"), ("kl_alpha", "KL α (Gamma)"),
                       ("neg_elbo_nats_per_dim", "negative ELBO"), ("bits_per_dim", "bits/dim (−ELBO / ln 2)"),
                       ("attention_kl", "attention KL"), ("cluster_entropy", "entropy H(π)")):
        if key in e:
            lines.append(f"| {label} | {_fmt(e[key])} |")
    lines.append("")
    lines += _image(run_dir, plot_paths, "reconstruction", "Reconstructions")

    usage = e.get("component_usage") or []
    lines += ["## Mixture components", "",
              (f"K_eff = {_fmt(e.get('K_eff'), '.3f')}; {e.get('components_used')} of {len(usage)} components "
              f"have mean prior weight above {USAGE_THRESHOLD}."), ""]
    if usage:
        lines += ["| component | " + " | ".join(str(k) for k in range(len(usage))) + " |",
                  "|---|" + "---:|" * len(usage),
                  "| mean π | " + " | ".join(_fmt(u, ".3f") for u in usage) + " |", ""]
    lines += _image(run_dir, plot_paths, "mixture_weights", "Mixture weights and component usage")

    lines += ["## Perceiver context", "",
              f"Next-token accuracy of the causal Perceiver: {_fmt(e.get('perceiver_accuracy'), '.3f')}.", ""]
    if "attention" in plot_paths or "attention_imagined" in plot_paths:
        lines += ["## Attention", ""]
        lines += _image(run_dir, plot_paths, "attention", "Attention and slot maps")
        lines += _image(run_dir, plot_paths, "attention_imagined", "Attention while imagining")
    if "loss_curves" in plot_paths or "grad_cosines" in plot_paths:
        lines += ["## Training", ""]
        lines += _image(run_dir, plot_paths, "loss_curves", "Loss curves")
        lines += _image(run_dir, plot_paths, "grad_cosines", "Cosine between task gradients")
    known = {"psnr_vs_horizon", "open_loop", "rollout_gif", "reconstruction", "mixture_weights", "attention",
             "attention_imagined", "loss_curves", "grad_cosines"}
    extra = [name for name in plot_paths if name not in known]
    if extra:
        lines += ["## Other figures", ""]
        for name in extra:
            lines += _image(run_dir, plot_paths, name, name)
    lines += ["The meaning of every number and figure: docs/EVALUATION.md.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
