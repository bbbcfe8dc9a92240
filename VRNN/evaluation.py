"""Held-out evaluation of the world model: numbers (``evaluate``), figures (``make_evaluation_plots``) and
the run's ``report.md`` (``write_report``). docs/EVALUATION.md explains every number and gives its formula;
the scoring itself (baselines, moving-pixel PSNR, standard errors, the verdict) is in
``VRNN/eval_scoring.py`` and works on any predictor's output; the report is written by
``VRNN/eval_report.py`` (``write_report`` is re-exported here).

Protocol (SYSTEM.md section 4)
------------------------------
Windows of L = ``eval_sequence_length(config)`` >= T0 + F consecutive rows, T0 = ``eval_context_frames``,
F = ``eval_horizon``. From a ``DMCVBDataset`` the windows do not overlap: rows 0..L-1, L..2L-1, ... of
every episode; at most ``eval_windows`` of them, evenly spaced over that list (so every episode
contributes). Every figure is a mean over windows with its standard error.

* ELBO terms, bits/dim, K_eff and the reconstructions come from ONE call of ``model.compute_total_loss``
  (the same function as in training, ``beta=1, adversarial_weight=1``) on the first
  ``min(L, config.sequence_length)`` frames.
* Open-loop prediction: ``model.generate_future_sequence(obs[:, :T0], actions[:, :T0],
  actions[:, T0:T0+F], temperature=0)`` compared with ``obs[:, T0:T0+F]`` step by step, beside three
  baselines on the same windows: copy-last-frame, the mean of the context frames and the mean training
  frame (a constant image, ``compute_mean_frame`` on the training split).
* Controls: the same rollout with another window's actions (action-shuffle ratio); the reconstruction
  NLL with another window's z, and h (``model.reconstruction_nats``); the spread of posterior means
  across windows; KL_z per frame; the Perceiver's next-token accuracy beside copying the current tokens.
  "Another window" is the previous one in the batch (a cyclic shift); windows are put into batches in
  an order shuffled once with ``config.seed``, so the pairs are unrelated windows.

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

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from VRNN.advanced_metrics import lpips_available, lpips_per_image, psnr_per_image, ssim_per_image
from VRNN.eval_report import write_report  # re-exported: the report has its own module
from VRNN.eval_scoring import (
    DATA_RANGE,
    MOVING_THRESHOLD,
    PSNR_CAP_DB,
    SIGNIFICANCE,
    USAGE_THRESHOLD,
    mean_and_se,
    score_open_loop,
    spread_ratio,
    summarize_open_loop,
    verdict,
)

__all__ = [
    "DATA_RANGE",
    "MEAN_FRAME_FILE",
    "MEAN_FRAME_MAX_FRAMES",
    "MOVING_THRESHOLD",
    "PSNR_CAP_DB",
    "USAGE_THRESHOLD",
    "compute_mean_frame",
    "eval_sequence_length",
    "evaluate",
    "evaluation_windows",
    "load_or_compute_mean_frame",
    "make_evaluation_plots",
    "scalar_metrics",
    "training_window_summary",
    "write_report",
]

logger = logging.getLogger(__name__)

MEAN_FRAME_FILE = "mean_frame.npy"
MEAN_FRAME_MAX_FRAMES = 2048   # frames averaged for the mean training frame (evenly spread over the split)

# Loss keys promoted to the top level of the evaluation dict (MODEL.md section 3); all scalar losses are
# also kept under "losses".
ELBO_KEYS = ("recon_loss", "kl_z", "kl_sticks", "kl_alpha", "hierarchical_kl", "cluster_entropy",
             "bits_per_dim", "K_eff", "total_vae_loss", "perceiver_loss", "attention_loss",
             "adversarial_loss", "attention_kl", "active_components", "attention_map_entropy",
             "attention_slot_recon")
# Per-step terms of forward_sequence, nats per frame [B, T], that make up the negative ELBO.
ELBO_STEP_KEYS = ("recon_nats", "kl_z", "kl_sticks", "kl_alpha")


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
# Windows and the mean training frame
def _episode_windows(data) -> list[tuple[int, int, int]] | None:
    """(dataset index, episode, start) of the non-overlapping windows of a dataset that exposes
    ``window_index`` [(episode, start)] and ``sequence_length`` (a ``DMCVBDataset``); None otherwise."""
    index = getattr(data, "window_index", None)
    length = getattr(data, "sequence_length", None)
    if not isinstance(index, (list, tuple)) or not isinstance(length, int) or len(index) != len(data):
        return None
    out, next_free = [], {}
    for i, (episode, start) in enumerate(index):
        if start >= next_free.get(episode, 0):
            out.append((i, int(episode), int(start)))
            next_free[episode] = start + length
    return out


def evaluation_windows(data, max_windows: int, generator: torch.Generator | None = None) -> tuple[list[int], dict]:
    """Dataset indices of the evaluation windows and a description {non_overlapping, num_episodes,
    available}.

    For a ``DMCVBDataset``: the non-overlapping windows of every episode (starts 0, L, 2L, ...), at most
    ``max_windows`` of them evenly spaced over that list (a random subset drawn with ``generator`` when
    one is given). For other datasets: ``max_windows`` indices evenly spaced over the dataset (overlap
    unknown).
    """
    n = len(data)
    if n == 0:
        raise ValueError("the evaluation dataset is empty")
    windows = _episode_windows(data)
    if windows is None:
        candidates, episodes = list(range(n)), None
    else:
        candidates, episodes = [w[0] for w in windows], {w[0]: w[1] for w in windows}
    k = min(max_windows, len(candidates))
    if generator is not None:
        pick = torch.randperm(len(candidates), generator=generator)[:k].sort().values.tolist()
    else:
        pick = torch.linspace(0, len(candidates) - 1, k).round().long().unique().tolist()
    chosen = [candidates[j] for j in pick]
    info = {"non_overlapping": windows is not None, "available_windows": len(candidates),
            "num_episodes": len({episodes[i] for i in chosen}) if episodes is not None else None}
    return chosen, info


def _batches(data, max_windows: int, batch_size: int, generator: torch.Generator | None,
             seed: int) -> tuple[Iterable, int, dict]:
    """(batches, expected windows, window description) from a map-style dataset or an iterable of batch dicts.

    Dataset windows are put into batches in an order shuffled with ``seed`` (the controls pair each window
    with its neighbour in the batch), in floor(N / batch_size) batches of near-equal size (so none holds a
    single window when there are two or more; a batch may hold up to 2 * batch_size - 1 windows).
    """
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        idx, info = evaluation_windows(data, max_windows, generator)
        order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed)).tolist()
        idx = [idx[o] for o in order]
        batch_size = max(2, int(batch_size))
        groups = [g.tolist() for g in torch.tensor_split(torch.tensor(idx), max(1, len(idx) // batch_size))]
        subset = Subset(data, [i for g in groups for i in g])
        # A private generator: iterating a DataLoader otherwise draws its base seed from the global RNG.
        loader = DataLoader(subset, batch_sampler=_FixedBatches([len(g) for g in groups]), num_workers=0,
                            generator=torch.Generator())
        return loader, len(idx), info
    if isinstance(data, Iterable):
        return data, max_windows, {"non_overlapping": None, "num_episodes": None, "available_windows": None}
    raise ValueError(f"expected a Dataset or an iterable of batch dicts, got {type(data).__name__}")


class _FixedBatches:
    """Batch sampler over 0..sum(sizes)-1 in order, in batches of the given sizes."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes

    def __iter__(self):
        start = 0
        for size in self.sizes:
            yield list(range(start, start + size))
            start += size

    def __len__(self) -> int:
        return len(self.sizes)


def compute_mean_frame(dataset, max_frames: int = MEAN_FRAME_MAX_FRAMES) -> torch.Tensor:
    """The mean training frame [3,H,W] (float32 in [-1,1]): the pixel-wise mean of at most ``max_frames``
    frames of ``dataset`` (a dataset of window dicts with ``observations`` [T,3,H,W], uint8 or float).

    The frames are the whole windows of ceil(max_frames / T) windows, taken without overlap when the
    dataset tells its episodes (``DMCVBDataset``) and evenly spaced over the split. A ``DMCVBDataset``
    with augmentation is read again without it (the shifts would blur the image).
    """
    if not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
    if getattr(dataset, "augment", False) and hasattr(dataset, "path"):
        from VRNN.dmc_dataset import DMCVBDataset

        if isinstance(dataset, DMCVBDataset):
            dataset = DMCVBDataset(dataset.path, dataset.sequence_length, scale="float", augment=False)
    if len(dataset) == 0:
        raise ValueError("cannot compute a mean frame from an empty dataset")
    length = int(dataset[0]["observations"].shape[0])
    idx, _ = evaluation_windows(dataset, max(1, math.ceil(max_frames / length)))
    total, count = None, 0
    for i in idx:
        frames = _to_unit_range(dataset[i]["observations"]).double()
        frames = frames[: max_frames - count]
        total = frames.sum(0) if total is None else total + frames.sum(0)
        count += frames.shape[0]
        if count >= max_frames:
            break
    logger.info("mean training frame from %d frames of %d windows", count, len(idx))
    return (total / count).float()


def load_or_compute_mean_frame(path: str | Path, dataset=None, max_frames: int = MEAN_FRAME_MAX_FRAMES,
                               write: bool = True) -> torch.Tensor:
    """The mean training frame stored at ``path`` (a .npy of float32 [3,H,W]); computed from ``dataset``
    with ``compute_mean_frame`` and written there (atomically, when ``write``) if the file is missing."""
    path = Path(path)
    if path.is_file():
        frame = torch.from_numpy(np.load(path)).float()
        if frame.dim() != 3 or frame.shape[0] != 3:
            raise ValueError(f"{path} holds an array of shape {tuple(frame.shape)}, expected a [3,H,W] frame")
        return frame
    if dataset is None:
        raise FileNotFoundError(f"no mean training frame at {path} and no training dataset to compute it from")
    frame = compute_mean_frame(dataset, max_frames)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, frame.numpy())
        os.replace(tmp, path)
    return frame


# --------------------------------------------------------------------------------------------------
# Evaluation
@torch.no_grad()
def evaluate(model: nn.Module, dataset_or_loader, config=None, device: torch.device | str | None = None,
             max_windows: int | None = None, generator: torch.Generator | None = None,
             ema: nn.Module | None = None, progress: bool | None = None,
             mean_frame: torch.Tensor | None = None, split: str | None = None) -> dict[str, Any]:
    """Evaluate on held-out windows; returns a JSON-serialisable dict (keys in docs/EVALUATION.md).

    model: the world model (``ema``, a ``ModelEMA`` or its ``.module``, is evaluated instead when given).
    dataset_or_loader: a dataset of window dicts (``observations [L,3,64,64]``, ``actions [L,A]``) or an
    iterable of batches of them ([B,L,...]); L >= T0 + F. config: an ``AIMEConfig`` (default: the model's).
    device: where to run (default: the model's device). max_windows: default ``config.eval_windows``.
    generator: picks a random subset of the windows and seeds the model's sampling.
    mean_frame: the mean training frame [3,H,W] in [-1,1] (``load_or_compute_mean_frame``); without it
    the mean of the evaluation windows' own frames stands in (logged; ``mean_frame_source`` says so).
    split: recorded as ``split`` (e.g. "validation", "test").

    Per-horizon lists have length F, entry j being j+1 steps after the last observed frame; PSNR in dB,
    SSIM in [-1, 1], every figure with a ``*_se`` standard error over windows.
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
    batches, expected, window_info = _batches(dataset_or_loader, max_windows, int(config.batch_size), generator,
                                              int(config.seed))
    if mean_frame is None:
        batches = list(batches) if not isinstance(batches, DataLoader) else batches
        mean_frame, n_frames = _mean_of_batches(batches, max_windows)
        source = f"evaluation windows ({n_frames} frames; no training mean was given)"
        logger.warning("evaluate: no mean training frame given; the mean of the %d evaluated frames stands in",
                       n_frames)
    else:
        source = "training split"
    mean_frame = mean_frame.float().cpu()

    n_seen = 0
    loss_sums: dict[str, float] = {}
    scores: dict[str, list[torch.Tensor]] = {}
    windows: dict[str, list[torch.Tensor]] = {}
    z_means: list[torch.Tensor] = []
    z_vars: list[torch.Tensor] = []
    lpips_sum = torch.zeros(horizon, dtype=torch.float64) if lpips_available() else None
    usage_sum: torch.Tensor | None = None
    usage_count = 0
    pixel_dims = None
    # The weights come from the model's config; no warm-up factors at evaluation.
    loss_kwargs = {"beta": 1.0, "adversarial_weight": 1.0}

    def keep(name: str, value: torch.Tensor) -> None:
        windows.setdefault(name, []).append(value.detach().double().cpu())

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
            pixel_dims = int(obs[0, 0].numel())
            other = torch.roll(torch.arange(b, device=device), 1)     # window i is paired with window i-1

            # ELBO terms and reconstructions, on the training window length.
            t_loss = min(length, int(config.sequence_length))
            obs_l, act_l = obs[:, :t_loss], actions[:, :t_loss]
            losses, outputs = net.compute_total_loss(obs_l, act_l, **loss_kwargs)
            for key, value in losses.items():
                v = _scalar(value)
                if v is not None:
                    loss_sums[key] = loss_sums.get(key, 0.0) + v * b
            recon = outputs["reconstructions"].float().clamp(-1, 1)
            keep("recon_psnr", psnr_per_image(recon, obs_l, DATA_RANGE).clamp(max=PSNR_CAP_DB).mean(1))
            keep("recon_ssim", ssim_per_image(recon, obs_l, DATA_RANGE).mean(1))
            steps = {k: outputs[k] for k in ELBO_STEP_KEYS
                     if isinstance(outputs.get(k), torch.Tensor) and tuple(outputs[k].shape) == (b, t_loss)}
            if len(steps) == len(ELBO_STEP_KEYS):
                nats = sum(steps[k].double() for k in ELBO_STEP_KEYS).mean(1)
                keep("neg_elbo_nats_per_frame", nats)
                keep("kl_z_nats_per_frame", steps["kl_z"].double().mean(1))
                keep("recon_nats_per_frame", steps["recon_nats"].double().mean(1))
            z_means.append(outputs["z_means"].detach().double().cpu())
            z_vars.append(outputs["z_logvars"].detach().double().exp().cpu())
            pi = outputs["pi"].float()                                          # [B,T,K]
            usage_sum = pi.sum((0, 1)).cpu().double() + (0 if usage_sum is None else usage_sum)
            usage_count += pi.shape[0] * pi.shape[1]
            _perceiver_accuracies(net, obs_l, keep)

            # Context dependence: decode window i's frames from window i-1's z (and, separately, h); the
            # three decodings (own, z swapped, h swapped) in one batch of 3B.
            if b >= 2 and hasattr(net, "reconstruction_nats"):
                z, h, att = outputs["latents"], outputs["hidden_states"], outputs["attention_prior_maps"]
                nll = net.reconstruction_nats(obs_l.repeat(3, 1, 1, 1, 1), torch.cat([z, z[other], z]),
                                              torch.cat([h, h, h[other]]), att.repeat(3, 1, 1, 1)).double()
                own, z_swapped, h_swapped = nll.split(b)
                keep("z_swap_gap", (z_swapped - own).mean(1))
                keep("h_swap_gap", (h_swapped - own).mean(1))

            # Open-loop prediction, and the same rollout driven by window i-1's actions (one batch of 2B).
            context_actions, future_actions = actions[:, :t0], actions[:, t0:t0 + horizon]
            if b >= 2:
                shuffled_context = context_actions.clone()
                shuffled_context[:, -1] = actions[other, t0 - 1]   # the action after frame T0 leads to step +1
                context_actions = torch.cat([context_actions, shuffled_context])
                future_actions = torch.cat([future_actions, future_actions[other]])
            rollout_obs = obs[:, :t0].repeat(2 if b >= 2 else 1, 1, 1, 1, 1)
            frames = net.generate_future_sequence(rollout_obs, context_actions, future_actions,
                                                  temperature=0.0)["frames"].float()
            pred = frames[:b].clamp(-1, 1)
            shuffled = frames[b:] if b >= 2 else None
            target = obs[:, t0:t0 + horizon]
            batch_scores = score_open_loop(target, obs[:, :t0], pred, mean_frame.to(device), shuffled)
            if shuffled is None:       # a batch of one window has no other window's actions
                batch_scores["shuffled_mse"] = torch.full((b, horizon), math.nan, dtype=torch.float64)
            for key, value in batch_scores.items():
                scores.setdefault(key, []).append(value)
            if lpips_sum is not None:
                lpips_sum += lpips_per_image(pred, target).sum(0).cpu().double()
            n_seen += b
            bar.update(b)
    bar.close()
    if n_seen == 0:
        raise ValueError("no evaluation window was read from dataset_or_loader")

    summary = summarize_open_loop({k: torch.cat(v) for k, v in scores.items()})
    win = {k: torch.cat(v) for k, v in windows.items()}
    losses_mean = {k: v / n_seen for k, v in loss_sums.items()}
    usage = (usage_sum / usage_count).tolist()

    result: dict[str, Any] = {
        "split": split,
        "num_windows": n_seen,
        "num_episodes": window_info.get("num_episodes"),
        "non_overlapping": window_info.get("non_overlapping"),
        "available_windows": window_info.get("available_windows"),
        "context_frames": t0,
        "horizon": horizon,
        "used_ema": ema is not None,
        "mean_frame_source": source,
        "moving_threshold": MOVING_THRESHOLD,
        "significance_se": SIGNIFICANCE,
    }
    for key in ("recon_psnr", "recon_ssim"):
        result[key], result[f"{key}_se"] = _mean_se(win[key])
    result.update(summary)
    if lpips_sum is not None:
        result["pred_lpips"] = (lpips_sum / n_seen).tolist()
    for key in ELBO_KEYS:
        if key in losses_mean:
            result[key] = losses_mean[key]
    if "neg_elbo_nats_per_frame" in win:
        nats, nats_se = _mean_se(win["neg_elbo_nats_per_frame"])
        result["neg_elbo_nats_per_dim"], result["neg_elbo_nats_per_dim_se"] = nats / pixel_dims, nats_se / pixel_dims
        result["bits_per_dim"] = nats / pixel_dims / math.log(2.0)
        result["bits_per_dim_se"] = nats_se / pixel_dims / math.log(2.0)
        result["kl_z_nats_per_frame"], result["kl_z_nats_per_frame_se"] = _mean_se(win["kl_z_nats_per_frame"])
        result["kl_z_se"] = result["kl_z_nats_per_frame_se"] / pixel_dims
        result["kl_z_nats_per_latent_dim"] = result["kl_z_nats_per_frame"] / int(z_means[0].shape[-1])
        result["recon_nats_per_frame"], result["recon_nats_per_frame_se"] = _mean_se(win["recon_nats_per_frame"])
    elif all(k in losses_mean for k in ("recon_loss", "kl_z", "kl_sticks", "kl_alpha")):
        result["neg_elbo_nats_per_dim"] = sum(losses_mean[k] for k in ("recon_loss", "kl_z", "kl_sticks",
                                                                       "kl_alpha"))
        result["kl_z_nats_per_frame"] = losses_mean["kl_z"] * pixel_dims
    for name in ("z", "h"):
        if f"{name}_swap_gap" in win:
            gap, se = _mean_se(win[f"{name}_swap_gap"])
            result[f"{name}_swap_gap_nats_per_frame"], result[f"{name}_swap_gap_nats_per_frame_se"] = gap, se
    spread = spread_ratio(torch.cat(z_means), torch.cat(z_vars))
    result.update({"z_mean_spread": spread["spread"], "z_posterior_std": spread["posterior_std"],
                   "z_spread_ratio": spread["ratio"], "z_spread_ratio_se": spread["ratio_se"]})
    if "perceiver_accuracy" in win:
        for key in ("perceiver_accuracy", "perceiver_copy_accuracy"):
            result[key], result[f"{key}_se"] = _mean_se(win[key])
        gain = win["perceiver_accuracy"] - win["perceiver_copy_accuracy"]
        result["perceiver_accuracy_gain"], result["perceiver_accuracy_gain_se"] = _mean_se(gain)
    else:
        result["perceiver_accuracy"] = losses_mean.get("perceiver_accuracy")
        logger.warning("the model has no Perceiver with next_token_logits: no copy-token accuracy")
    if result.get("attention_map_entropy") is not None:
        # ln(R*R): the entropy of the uniform map, the one the attention schema collapsed to (issue 9)
        result["attention_map_entropy_uniform"] = math.log(int(config.attention_resolution) ** 2)
    result["component_usage"] = usage
    result["components_used"] = int(sum(u > USAGE_THRESHOLD for u in usage))
    result["losses"] = losses_mean
    result = _clean(result)
    result["verdict"] = verdict(result, controls=result)
    return result


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    mean, se, _ = mean_and_se(x)
    return float(mean), float(se)


def _perceiver_accuracies(net: nn.Module, obs: torch.Tensor, keep) -> None:
    """Per window: the Perceiver's next-token accuracy and the accuracy of copying frame t's tokens as the
    guess for frame t+1, over the same T-1 transitions of ``obs`` [B,T,3,H,W]."""
    perceiver = getattr(net, "perceiver", None)
    if perceiver is None or not hasattr(perceiver, "next_token_logits") or obs.shape[1] < 2:
        return
    features = net.perceiver_features(obs) if hasattr(net, "perceiver_features") else None
    logits, indices = perceiver.next_token_logits(obs, features)       # [B,T,hw,K], [B,T,h,w]
    b, t = indices.shape[:2]
    codes = indices.reshape(b, t, -1)
    target = codes[:, 1:]
    keep("perceiver_accuracy", (logits[:, :-1].argmax(-1) == target).double().mean((1, 2)))
    keep("perceiver_copy_accuracy", (codes[:, :-1] == target).double().mean((1, 2)))


def _mean_of_batches(batches: Iterable, max_windows: int) -> tuple[torch.Tensor, int]:
    """Pixel-wise mean of every frame of the first ``max_windows`` windows of ``batches``."""
    total, count, seen = None, 0, 0
    for batch in batches:
        obs = _to_unit_range(batch["observations"])[: max_windows - seen].double().cpu()
        frames = obs.flatten(0, 1)
        total = frames.sum(0) if total is None else total + frames.sum(0)
        count += frames.shape[0]
        seen += obs.shape[0]
        if seen >= max_windows:
            break
    if total is None:
        raise ValueError("no evaluation window was read from dataset_or_loader")
    return (total / count).float(), count


def _clean(value):
    """Floats that JSON can hold (non-finite -> None), recursively."""
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# Figures of an evaluation kept when it is compared with another split's (``training_window_summary``).
SUMMARY_KEYS = ("split", "num_windows", "num_episodes", "recon_psnr", "recon_psnr_se", "pred_psnr_mean",
                "pred_psnr_mean_se", "train_mean_psnr_mean", "train_mean_psnr_mean_se",
                "action_shuffle_ratio_mean", "action_shuffle_ratio_mean_se", "bits_per_dim", "bits_per_dim_se")


def training_window_summary(train_eval: Mapping[str, Any], held_out: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The figures of an evaluation on *training* windows beside the held-out one, to tell learning from
    memorising (eval.json's ``training_windows``; docs/EVALUATION.md).

    train_eval: ``evaluate`` on windows of the training split (same protocol, same mean frame).
    held_out: the held-out (test) evaluation, or None. Returns the keys of ``SUMMARY_KEYS`` that
    ``train_eval`` has (PSNR in dB over the horizon F, shuffle ratio pooled over it), ``lead_over_mean_frame``
    and ``_se`` (paired model − mean-training-frame PSNR, dB, mean over the horizon) and, with ``held_out``,
    ``memorisation_gap_db``: the training windows' lead over the mean frame minus the held-out windows'
    (dB; 0 for a model that generalises, large for one that replays its training episodes) with the
    standard error of the difference of two independent means.
    """
    out = {k: train_eval[k] for k in SUMMARY_KEYS if k in train_eval}
    lead = (train_eval.get("gaps") or {}).get("train_mean") or {}
    out["lead_over_mean_frame"], out["lead_over_mean_frame_se"] = lead.get("psnr_mean"), lead.get("psnr_mean_se")
    other = ((held_out or {}).get("gaps") or {}).get("train_mean") or {}
    if out["lead_over_mean_frame"] is not None and other.get("psnr_mean") is not None:
        out["memorisation_gap_db"] = out["lead_over_mean_frame"] - other["psnr_mean"]
        ses = (out["lead_over_mean_frame_se"], other.get("psnr_mean_se"))
        out["memorisation_gap_db_se"] = math.hypot(*ses) if None not in ses else None
    return _clean(out)


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
    psnr_vs_horizon, mixture_weights, component_gallery (the frames each mixture component claims most
    strongly, over all windows of ``batch``), dominant_component (over the first window: observed, then
    imagined), attention and attention_imagined (``visualize_attention``), and the
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
    all_obs = _to_unit_range(batch["observations"]).to(device)
    all_actions = batch["actions"].float().to(device)
    with _eval_mode(net), _forked_rng(device, seed):
        # Every window of the batch once: the gallery reads them all, the other figures window 0.
        outputs = net.forward_sequence(all_obs[:, :t_loss], all_actions[:, :t_loss])
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
    # What the mixture components mean: each frame's posterior latent, assigned to the prior's components.
    resp = plots.component_responsibilities(outputs["z_means"], outputs["pi"].clamp_min(1e-12).log(),
                                            outputs["prior_means"], outputs["prior_logvars"])
    paths["component_gallery"] = plots.plot_component_gallery(
        all_obs[:, :t_loss].flatten(0, 1).cpu(), resp.flatten(0, 1), out_dir / "component_gallery.png")
    seen = min(t0, t_loss)  # the observed steps before the imagined ones
    paths["dominant_component"] = plots.plot_dominant_component(
        resp[0, :seen], out_dir / "dominant_component.png", imagined_pi=future["pi"][0].cpu(),
        frames=torch.cat([obs[0, :seen].cpu(), pred]))
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

