"""`DMCVBTrainer`: optimisation of the AIME world model (MODEL.md section 5, SYSTEM.md sections 4-6).

One optimiser step:

1. the step's batch (``ResumableBatchSampler``: data order is a function of (seed, batch position)) and
   the step's random seed (a function of (seed, batch position, rank)), so a resumed run replays exactly;
2. ``model.compute_total_loss`` with the scheduled beta and adversarial warm-up factor, and the EMA copy
   for Gram anchoring;
3. the four task losses go to the multi-task aggregator (RGB by default) over the generator parameters;
   under data parallelism its [T, D] gradient matrix is averaged across ranks first;
4. gradient clipping, AdamW step, learning-rate schedule;
5. ``n_critic`` discriminator steps (own AdamW; gradients averaged across ranks);
6. EMA update.

A non-finite loss or gradient skips the step (counted; the run stops after ``max_nonfinite_steps`` in a
row with ``NonFiniteTrainingError``). Rank 0 logs ``metrics.jsonl``, evaluates and writes checkpoints.
SIGTERM / SIGINT / SIGUSR1, the ``--minutes`` budget and the stop file end training at the next step
boundary with a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from VRNN.aime_config import AIMEConfig
from VRNN.ddp_utils import (
    DistContext,
    all_reduce_flag,
    all_reduce_gradients,
    all_reduce_mean_,
    barrier,
    broadcast_buffers,
    broadcast_module,
    install_statistics_hooks,
    make_grad_reduce_hook,
)
from VRNN.dmc_dataset import DMCVBDataset
from VRNN.fault_points import fault_point
from VRNN.grad_diagnostics import TASK_LOSS_KEYS, GradDiagnostics
from VRNN.metrics_log import MetricsLogger, to_jsonable
from VRNN.resumable_sampler import ResumableBatchSampler
from VRNN.schedules import adversarial_weight_at, beta_at, kl_warmup_at, make_lr_scheduler
from VRNN.stop_control import StopController, StopRequested
from VRNN.training_checkpoints import (
    CheckpointManager,
    CheckpointWriteError,
    all_finite,
    check_compatible,
    require_training_state,
)
from VRNN.vrnn_utilities import get_rng_state, keep_large_blocks_mapped, load_checkpoint, set_rng_state

__all__ = [
    "AGGREGATOR_KWARGS",
    "DMCVBDataset",
    "DMCVBTrainer",
    "NonFiniteTrainingError",
    "TrainResult",
    "make_plots",
    "step_seed",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

# Aggregator name -> its keyword arguments from the config (registry; the hook is added by the trainer).
AGGREGATOR_KWARGS: dict[str, Callable[[AIMEConfig], dict[str, Any]]] = {
    "rgb": lambda c: {"mu": c.rgb_mu, "lam": c.rgb_lambda, "alpha_steps": c.rgb_alpha_steps,
                      "inner_lr": c.rgb_inner_lr, "scale": c.rgb_scale},
    "sum": lambda c: {},
    "pcgrad": lambda c: {"seed": c.seed},
}


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row."""


@dataclass
class TrainResult:
    """How ``train`` ended: ``reason`` is ``max_steps``, ``until``, ``budget``, ``stop_file``,
    ``signal:<NAME>`` or ``peer_stop`` (another rank was asked to stop); ``evaluation`` is the last
    evaluation's metrics (``None`` if none ran)."""

    step: int
    reason: str
    checkpoint: Path | None
    evaluation: dict[str, Any] | None
    nonfinite_steps: int

    @property
    def interrupted(self) -> bool:
        return self.reason.startswith("signal") or self.reason in ("stop_file", "peer_stop")


def step_seed(seed: int, position: int, rank: int) -> int:
    """The global torch seed of the step that consumes batch ``position`` on ``rank`` (63-bit)."""
    return int(np.random.SeedSequence([seed, position, rank]).generate_state(1, dtype=np.uint64)[0]) >> 1


def amp_supported(amp: bool, device: torch.device) -> bool:
    """Whether ``config.amp`` (bf16 autocast) takes effect on ``device``: on CUDA, and on a CPU whose oneDNN
    has native bf16 kernels (AVX512-BF16 or AMX). A CPU without them would emulate bf16 more slowly than
    float32, so amp is then off, with a warning."""
    if not amp or device.type == "cuda":
        return amp
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return True
    logger.warning("amp (bf16 autocast) is not supported natively on this %s; training in float32", device.type)
    return False


class DMCVBTrainer:
    """Owns optimisers, aggregator, discriminator steps, schedules, EMA, AMP, checkpoints, logs, evaluation.

    Args:
        model: a ``DPGMMVariationalRecurrentAutoencoder`` already on ``device`` (identical on all ranks
            is enforced by a broadcast from rank 0).
        train_data, eval_data: ``DMCVBDataset`` (or any dataset of the same item dicts); ``eval_data`` is
            the validation split: the periodic evaluations and the choice of ``best.pt`` use it.
        config: the run's ``AIMEConfig``; its ``action_dim`` must equal the model's.
        run_dir: output folder (``metrics.jsonl``, ``eval.json``, ``checkpoints/``, ``plots/``).
        device: defaults to the model's device.
        dist: this process's ``DistContext`` (single process when ``None``).
        tensorboard: also log to ``<run_dir>/tensorboard`` when the package is installed.
        progress: tqdm bar; ``None`` = only on rank 0 attached to a terminal.
        minutes: wall-clock budget of ``train``; ``stop_file``: a path whose existence stops training.
        visualize_attention, save_visualizations: passed to the evaluation plots.
        test_data: the test split, evaluated once at the end of training for ``eval.json`` (default:
            ``eval_data``, for data with no separate test split).
    """

    def __init__(self, model: torch.nn.Module, train_data, eval_data, config: AIMEConfig, run_dir: str | Path,
                 device: torch.device | str | None = None, dist: DistContext | None = None,
                 tensorboard: bool = False, progress: bool | None = None, minutes: float | None = None,
                 stop_file: Path | None = None, visualize_attention: bool = False,
                 save_visualizations: bool = False, test_data=None) -> None:
        from multi_task_learning import get_aggregator
        from VRNN.ema import ModelEMA

        self.model = model
        self.train_data, self.eval_data = train_data, eval_data
        self.test_data = test_data if test_data is not None else eval_data
        self._mean_frame: torch.Tensor | None = None
        self._training_windows = None  # the training split in evaluation windows (``training_windows``)
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dist = dist or DistContext(device=self.device)
        self.minutes, self.stop_file = minutes, stop_file
        self.visualize_attention, self.save_visualizations = visualize_attention, save_visualizations
        self.action_dim = int(getattr(model, "action_dim", config.action_dim))
        data_action = getattr(train_data, "action_dim", self.action_dim)
        if data_action != self.action_dim:
            raise ValueError(f"the dataset's action size is {data_action} but the model takes {self.action_dim}")
        if config.aggregator not in AGGREGATOR_KWARGS:
            raise ValueError(f"aggregator {config.aggregator!r} is unknown; expected one of {sorted(AGGREGATOR_KWARGS)}")

        broadcast_module(self.model)  # identical initialisation on every rank
        self.gen_params = [p for p in model.generator_parameters() if p.requires_grad]
        self.task_params = model.task_parameters() if hasattr(model, "task_parameters") else None
        self.disc_params = [p for p in model.discriminator_parameters() if p.requires_grad]
        c = config
        # The fused AdamW kernel (CPU and CUDA): the same update as the default per-tensor loop, to float
        # rounding, in one call over all tensors; 3 ms against 11 ms per cpu-preset step on two cores.
        fused = True if self.device.type in ("cpu", "cuda") else None
        self.optimizer = torch.optim.AdamW(model.parameter_groups(c.learning_rate, c.weight_decay),
                                           lr=c.learning_rate, betas=tuple(c.adam_betas),
                                           weight_decay=c.weight_decay, fused=fused)
        # Without a discriminator (use_discriminator=False) its optimiser holds one unused placeholder, so
        # that checkpoints keep one layout.
        self._disc_placeholder = torch.nn.Parameter(torch.zeros(1, device=self.device), requires_grad=False)
        self.disc_optimizer = torch.optim.AdamW(self.disc_params or [self._disc_placeholder],
                                                lr=c.disc_learning_rate, betas=tuple(c.adam_betas),
                                                weight_decay=c.weight_decay, fused=fused)
        self.scheduler = make_lr_scheduler(self.optimizer, c.warmup_steps, c.max_steps, c.min_lr_ratio)
        self.disc_scheduler = make_lr_scheduler(self.disc_optimizer, c.warmup_steps, c.max_steps, c.min_lr_ratio)
        # Per-task gradients by one vmapped backward pass only on GPU: on CPU it measured 3-4x slower than
        # T separate passes (cpu preset, B=8: 11 s vs 3 s per step on one core).
        self.aggregator = get_aggregator(c.aggregator, grad_reduce_hook=make_grad_reduce_hook(),
                                         batched_grads=self.device.type == "cuda",
                                         **AGGREGATOR_KWARGS[c.aggregator](c))
        self.ema = ModelEMA(model, c.ema_decay)
        if self.device.type == "cpu" and keep_large_blocks_mapped():
            logger.debug("glibc malloc keeps freed blocks up to 1 GiB mapped (vrnn_utilities.keep_large_blocks_mapped)")
        self._amp = amp_supported(c.amp, self.device)
        install_statistics_hooks(self.model)  # VQ codebook statistics of the global batch (not in the EMA copy)
        self.grad_diag = GradDiagnostics()
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep=c.keep_checkpoints)

        self.step = 0             # optimiser steps taken
        self.position = 0         # batches consumed (>= step: skipped non-finite steps consume a batch)
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self._buffers_before: dict[str, torch.Tensor] = {}
        self.best_bits_per_dim = math.inf
        self.last_checkpoint: Path | None = None
        self.last_evaluation: dict[str, Any] | None = None
        self._progress = progress
        self._tensorboard = tensorboard
        self._window: dict[str, list[float]] = {}

    # ----------------------------------------------------------------------------------------------
    # Checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (SYSTEM.md section 6)."""
        return {
            "config": self.config.to_dict(), "action_dim": self.action_dim,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "ema_updates": self.ema.num_updates,
            "optimizer": self.optimizer.state_dict(), "disc_optimizer": self.disc_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "disc_scheduler": self.disc_scheduler.state_dict(),
            "aggregator": self.aggregator.state_dict(),
            "step": self.step, "position": self.position, "nonfinite_total": self.nonfinite_total,
            "best_bits_per_dim": self.best_bits_per_dim, "world_size": self.dist.world_size,
            "rng": get_rng_state(),
        }

    def save_checkpoint(self, best: bool = False) -> Path | None:
        """Write the checkpoint of the current step on rank 0; refuses (returns None) if the model or its
        EMA holds a non-finite value, so a good checkpoint is never replaced by a broken one.

        Raises ``CheckpointWriteError`` (one line: the step, the folder, the reason, the last complete
        checkpoint) when the file cannot be written, e.g. on a full disk; the earlier files stay intact.
        """
        path = None
        if self.dist.is_main:
            if not (all_finite(self.model.state_dict()) and all_finite(self.ema.module.state_dict())):
                logger.error("step %d: the model holds non-finite values; checkpoint NOT written "
                             "(the last good one is %s)", self.step, self.last_checkpoint)
            else:
                try:
                    path = self.checkpoints.save(self.state_dict(), self.step, best=best)
                except OSError as exc:
                    raise CheckpointWriteError(
                        exc.errno, f"the checkpoint of step {self.step} could not be written "
                        f"({exc.strerror or exc}); the last complete checkpoint "
                        f"{self.last_checkpoint or '(none yet)'} is intact") from exc
                self.last_checkpoint = path
        barrier()
        self._checkpoint_step = self.step  # on every rank, so that all of them skip or repeat a save alike
        return path

    def load_checkpoint(self, path: str | Path, training_state: bool = True) -> dict[str, Any]:
        """Load a checkpoint of this config and action size (``CheckpointError`` naming the differing
        fields otherwise). ``training_state=False`` loads only the model and EMA weights (warm start);
        resuming (``training_state=True``) a file without optimiser state, such as ``model.save()``
        writes, is a ``CheckpointError`` that says so."""
        payload = load_checkpoint(path, map_location=self.device)
        check_compatible(payload, self.config, self.action_dim, source=f"checkpoint {path}")
        if training_state:
            require_training_state(payload, path)
        self.model.load_state_dict(payload["model"])
        if payload.get("ema") is not None:
            self.ema.load_state_dict(payload["ema"])
        if training_state:
            self.optimizer.load_state_dict(payload["optimizer"])
            self.disc_optimizer.load_state_dict(payload["disc_optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
            self.disc_scheduler.load_state_dict(payload["disc_scheduler"])
            self.aggregator.load_state_dict(payload["aggregator"])
            self.step, self.position = int(payload["step"]), int(payload["position"])
            self.ema.num_updates = int(payload.get("ema_updates", self.step))
            self.nonfinite_total = int(payload.get("nonfinite_total", 0))
            self.best_bits_per_dim = float(payload.get("best_bits_per_dim", math.inf))
            set_rng_state(payload["rng"])
            self.last_checkpoint = Path(path)
            self._checkpoint_step = self.step
            if payload.get("world_size", 1) != self.dist.world_size:
                logger.warning("checkpoint was written by %d processes, resuming on %d: the data order "
                               "continues but per-rank sampling noise differs", payload.get("world_size", 1),
                               self.dist.world_size)
        logger.info("loaded %s (step %d)", path, int(payload.get("step", 0)))
        return payload

    # ----------------------------------------------------------------------------------------------
    # One step
    def _autocast(self):
        if self._amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _loader(self) -> DataLoader:
        sampler = ResumableBatchSampler(len(self.train_data), self.config.batch_size, self.config.seed,
                                        self.dist.rank, self.dist.world_size, start=self.position)
        # A private generator: the loader must not draw from the global RNG (exact resume).
        return DataLoader(self.train_data, batch_sampler=sampler, num_workers=self.config.num_workers,
                          pin_memory=self.device.type == "cuda", generator=torch.Generator())

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """One generator + discriminator update on this rank's share of a batch ([B_local, T, ...]).

        Returns the step's scalars, or ``None`` when the step was skipped as non-finite.
        """
        c = self.config
        torch.manual_seed(step_seed(c.seed, self.position, self.dist.rank))
        self.position += 1
        obs = batch["observations"].to(self.device, non_blocking=True)
        actions = batch["actions"].to(self.device, non_blocking=True)
        beta = beta_at(self.step, c.beta, c.beta_warmup_steps)
        adv = adversarial_weight_at(self.step, c.adversarial_warmup_steps, c.adversarial_start_steps)
        self.model.train()
        t0 = time.perf_counter()
        # The forward pass updates statistics buffers (the VQ codebook's EMA); a skipped step restores them
        # so that a non-finite batch cannot poison them.
        self._buffers_before = {k: b.detach().clone() for k, b in self.model.named_buffers()}
        with self._autocast():
            losses, outputs = self.model.compute_total_loss(
                obs, actions, beta=kl_warmup_at(self.step, c.beta_warmup_steps), adversarial_weight=adv,
                ema_model=self.ema.module if c.lambda_gram > 0 else None)
        task = {k: losses[k].float() for k in TASK_LOSS_KEYS}
        # Every scalar in one device-to-host copy (one synchronisation per step on a GPU).
        names = [k for k, v in losses.items() if isinstance(v, torch.Tensor) and v.numel() == 1]
        values = dict(zip(names, torch.stack([losses[k].detach().float().reshape(()) for k in names]).tolist()))
        bad = [k for k in TASK_LOSS_KEYS if not math.isfinite(values[k])]
        if not all_reduce_flag(not bad, "all"):
            return self._skip(f"non-finite loss ({', '.join(f'{k}={values[k]}' for k in bad) or 'on another rank'})")

        self.optimizer.zero_grad(set_to_none=True)
        try:
            # Each task's gradient over the parameters it trains; only the shared ones are aggregated.
            diag = self.aggregator.backward(task, self.gen_params, task_params=self.task_params,
                                            min_relative_norm=c.aggregator_min_relative_norm)
        except ValueError as exc:
            if "non-finite" not in str(exc):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(f"non-finite gradient ({exc})")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.gen_params, c.grad_clip))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(f"non-finite gradient norm ({grad_norm})")
        self.optimizer.step()
        self.scheduler.step()

        disc_scalars: dict[str, float] = {}
        for _ in range(c.n_critic if self.disc_params and self.step >= c.adversarial_start_steps else 0):
            with self._autocast():
                d = self.model.discriminator_loss(obs, outputs)
            self.disc_optimizer.zero_grad(set_to_none=True)
            d["disc_loss"].float().backward()
            all_reduce_gradients(self.disc_params)
            disc_norm = float(torch.nn.utils.clip_grad_norm_(self.disc_params, c.grad_clip))
            if math.isfinite(disc_norm):
                self.disc_optimizer.step()
            else:
                logger.warning("step %d: non-finite discriminator gradient; discriminator step skipped", self.step)
            disc_names = [k for k, v in d.items() if isinstance(v, torch.Tensor) and v.numel() == 1]
            disc_values = torch.stack([d[k].detach().float().reshape(()) for k in disc_names]).tolist()
            disc_scalars = {f"disc/{k}": v for k, v in zip(disc_names, disc_values)}
            disc_scalars["disc/grad_norm"] = disc_norm
        if disc_scalars:   # the discriminator's schedule counts its own steps (none before adversarial_start_steps)
            self.disc_scheduler.step()
        broadcast_buffers(self.model)
        self.ema.update(self.model)
        self.step += 1
        self.nonfinite_in_row = 0

        self.grad_diag.update_from_rgb(self.step, diag)
        scalars = dict(values)
        scalars.update(disc_scalars)
        scalars.update({"beta": beta, "adversarial_weight": adv, "grad_norm": grad_norm,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "disc_lr": self.disc_optimizer.param_groups[0]["lr"],
                        "step_time_s": time.perf_counter() - t0})
        return scalars

    def _skip(self, why: str) -> None:
        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                if name in self._buffers_before:
                    buf.copy_(self._buffers_before[name])
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        logger.warning("step %d skipped: %s [%d in a row, %d in total]", self.step, why,
                       self.nonfinite_in_row, self.nonfinite_total)
        if self.nonfinite_in_row >= self.config.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"training stopped at step {self.step}: {self.nonfinite_in_row} non-finite steps in a row "
                f"(max_nonfinite_steps={self.config.max_nonfinite_steps}); last: {why}. The last good "
                f"checkpoint is {self.last_checkpoint or 'none (nothing was saved yet)'} and was not "
                "overwritten. Try a lower --learning-rate or check the data.")

    # ----------------------------------------------------------------------------------------------
    # Logging and evaluation
    def _accumulate(self, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self._window.setdefault(k, []).append(v)

    def _log(self, metrics: MetricsLogger, started: float, steps_done: int) -> dict[str, Any]:
        keys = sorted(self._window)
        means = torch.tensor([float(np.mean(self._window[k])) for k in keys], dtype=torch.float64)
        all_reduce_mean_(means)  # losses averaged over ranks (every rank logs the same step)
        row: dict[str, Any] = {"step": self.step}
        row.update({k: float(v) for k, v in zip(keys, means)})
        row.update(self.grad_diag.log_dict(self.step))
        elapsed = time.perf_counter() - started
        row.update({"steps_per_s": steps_done / elapsed if elapsed > 0 else 0.0,
                    "nonfinite_steps": self.nonfinite_total, "position": self.position,
                    "epoch": self.position // max(1, len(self.train_data) // self.config.batch_size),
                    "time": time.time()})
        self._window.clear()
        metrics.log(row)
        return row

    def mean_frame(self) -> torch.Tensor:
        """The mean training frame [3,H,W] of the evaluation's constant baseline: ``<run_dir>/mean_frame.npy``,
        computed from the training split at the first call of a run (rank 0 writes it)."""
        from VRNN.evaluation import MEAN_FRAME_FILE, load_or_compute_mean_frame

        if self._mean_frame is None:
            self._mean_frame = load_or_compute_mean_frame(self.run_dir / MEAN_FRAME_FILE, self.train_data,
                                                          write=self.dist.is_main)
        return self._mean_frame

    def evaluate(self, write: bool = True, metrics: MetricsLogger | None = None, split: str = "validation",
                 plots: bool = True) -> dict[str, Any]:
        """Evaluate the EMA model on ``split`` ("validation": ``eval_data``, or "test": ``test_data``) on
        rank 0 (the others wait).

        When ``write``: the validation result goes to ``eval_validation.json``, the test result to
        ``eval.json`` (both with ``step`` and ``split``). Appends the scalar metrics to ``metrics.jsonl``
        as an ``eval/...`` (validation) or ``test/...`` row, and draws the figures (``plots``): to
        ``plots/step_<N>/`` with ``save_visualizations``, to ``plots/`` (latest only) with
        ``visualize_attention``. Evaluation samples from a forked, seeded RNG, so it never changes the
        training run.
        """
        from VRNN.evaluation import evaluate, scalar_metrics

        if split not in ("validation", "test", "train"):
            raise ValueError(f"split must be 'validation', 'test' or 'train', got {split!r}")
        result: dict[str, Any] = {}
        if self.dist.is_main:
            data = self.training_windows() if split == "train" else (
                self.eval_data if split == "validation" else self.test_data)
            last = self.last_evaluation or {}
            if (split == "test" and self.test_data is self.eval_data and last.get("step") == self.step
                    and last.get("split") == "validation"):
                # One split serves as both (old two-split data): the same windows were just evaluated.
                result = {**last, "split": "test"}
            else:
                result = {"step": self.step, **evaluate(self.model, data, self.config, device=self.device,
                                                         ema=self.ema.module, progress=self._progress,
                                                         mean_frame=self.mean_frame(), split=split)}
            if write:
                name = {"validation": "eval_validation.json", "test": "eval.json", "train": "eval_train.json"}[split]
                write_json_atomic(self.run_dir / name, result)
            prefix = {"validation": "eval/", "test": "test/", "train": "train_windows/"}[split]
            (metrics or MetricsLogger(self.run_dir)).log({"step": self.step, **scalar_metrics(result, prefix)})
            if plots and self.save_visualizations:
                self.make_plots(self.run_dir / "plots" / f"step_{self.step:08d}", result, split)
            elif plots and self.visualize_attention:
                self.make_plots(self.run_dir / "plots", result, split)
            self.last_evaluation = result
        barrier()
        return result

    def training_windows(self):
        """The training split cut into evaluation windows (``eval_sequence_length`` rows, the test protocol),
        built on first use from ``train_data.path``; None when the training data has no such path or its
        episodes are shorter than one evaluation window."""
        if self._training_windows is None and getattr(self.train_data, "path", None) is not None:
            from VRNN.run_setup import load_eval_dataset

            try:
                self._training_windows = load_eval_dataset(self.config, self.train_data.path)
            except ValueError as exc:  # episodes shorter than T0 + F: no training-window evaluation
                logger.info("no evaluation on training windows: %s", exc)
                self._training_windows = False
        return self._training_windows or None

    def make_plots(self, plots_dir: Path, evaluation: dict[str, Any], split: str = "validation") -> dict[str, Path]:
        """Every evaluation figure of the EMA model into ``plots_dir`` (rank 0), drawn on ``split``'s windows."""
        return make_plots(self.ema.module, self.eval_data if split == "validation" else self.test_data, self.config,
                          plots_dir, evaluation, self.run_dir / "metrics.jsonl")

    def set_budget_fraction(self, fraction: float) -> None:
        """Tell both learning-rate schedules (generator and discriminator) that ``fraction`` in [0, 1] of
        the wall-clock budget is spent; their cosines then stand at least that far along
        (``WarmupCosine.set_budget_fraction``; ``train`` calls it each step when ``config.lr_follows_budget``
        and a ``minutes`` budget is set)."""
        for scheduler in (self.scheduler, self.disc_scheduler):
            scheduler.lr_lambdas[0].set_budget_fraction(fraction)

    # ----------------------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> TrainResult:
        """Train to ``config.max_steps`` (or to step ``until``), evaluating every ``eval_every`` steps and
        at the end, checkpointing every ``checkpoint_every`` steps, at each evaluation and on any stop.

        Raises ``NonFiniteTrainingError`` after ``max_nonfinite_steps`` non-finite steps in a row.
        """
        c = self.config
        target = c.max_steps if until is None else min(until, c.max_steps)
        if self.dist.is_main and self.stop_file is not None:
            Path(self.stop_file).unlink(missing_ok=True)
        barrier()
        metrics = MetricsLogger(self.run_dir, enabled=self.dist.is_main, tensorboard=self._tensorboard,
                                resume_step=self.step)
        show = self._progress if self._progress is not None else (self.dist.is_main and sys.stderr.isatty())
        bar = tqdm(total=target, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not show)
        stop = StopController(self.minutes, self.stop_file).start()
        reason, started, steps_done = "max_steps" if until is None or until >= c.max_steps else "until", \
            time.perf_counter(), 0
        evaluated_at = -1
        # With a wall-clock budget the learning-rate cosine also follows the fraction of it spent (resumed
        # runs go on from the fraction they had reached), so it ends at its floor when the budget ends.
        budget_s = self.minutes * 60.0 if (self.minutes and c.lr_follows_budget) else None
        spent_before = self.scheduler.lr_lambdas[0].budget_fraction
        try:
            loader = self._loader()
            batches, per_epoch = iter(loader), loader.batch_sampler.batches_per_epoch
            while self.step < target:
                asked = stop.reason()
                if all_reduce_flag(asked is not None, "any"):
                    reason = asked or "peer_stop"
                    break
                if c.num_workers == 0 and hasattr(self.train_data, "set_epoch"):
                    # new augmentation draws each epoch (items are fetched lazily, in this process)
                    self.train_data.set_epoch(self.position // per_epoch)
                if budget_s is not None:
                    self.set_budget_fraction(
                        spent_before + (1.0 - spent_before) * (time.perf_counter() - started) / budget_s)
                scalars = self.train_step(next(batches))
                if scalars is None:
                    continue
                steps_done += 1
                self._accumulate(scalars)
                bar.update(1)
                bar.set_postfix(loss=f"{scalars['total_vae_loss']:.4f}", K_eff=f"{scalars.get('K_eff', float('nan')):.2f}")
                if self.step % c.log_every == 0 or self.step == target:
                    self._log(metrics, started, steps_done)
                if self.step % c.eval_every == 0:
                    self._evaluate_and_checkpoint(metrics)
                    evaluated_at = self.step
                elif self.step % c.checkpoint_every == 0 and self.step != target:  # the end saves anyway
                    self.save_checkpoint()
        finally:
            pending = stop.signal_name  # a stop signal that arrived during the last step
            stop.close()
            bar.close()
            metrics.close()
        if self._window:
            metrics = MetricsLogger(self.run_dir, enabled=self.dist.is_main)
            self._log(metrics, started, max(1, steps_done))
        finished = reason in ("max_steps", "until", "budget")
        if finished and all_reduce_flag(pending is not None, "any"):
            # Honour it like a stop inside the loop: checkpoint and return; a resume does the evaluation.
            reason, finished = (f"signal:{pending}" if pending else "peer_stop"), False
        if evaluated_at != self.step and getattr(self, "_checkpoint_step", None) != self.step:
            # Before the final evaluation, so that a kill or a signal during it loses no training.
            self.save_checkpoint()
        if finished and evaluated_at != self.step:
            try:
                fault_point("final_evaluation", self.step)
                self._evaluate_and_checkpoint()
            except StopRequested as stop:  # a script's raise_on_stop_signals(); the checkpoint is saved
                stop.phase = stop.phase or "the final evaluation"
                raise
        logger.info("training ended at step %d (%s)", self.step, reason)
        return TrainResult(self.step, reason, self.last_checkpoint, self.last_evaluation, self.nonfinite_total)

    def _evaluate_and_checkpoint(self, metrics: MetricsLogger | None = None, final: bool | None = None) -> None:
        """Evaluate on the validation split, keep ``best.pt`` by its bits/dim, checkpoint; at the end of
        training (``final``) also evaluate on the test split for ``eval.json`` (and ``last_evaluation``).

        ``final`` None: inferred as "no open metrics logger (the call after the loop) or max_steps reached".
        """
        final = (metrics is None or self.step >= self.config.max_steps) if final is None else final
        result = self.evaluate(metrics=metrics, plots=not final)
        best = False
        if self.dist.is_main:
            bpd = _bits_per_dim(result)
            if bpd is not None and bpd < self.best_bits_per_dim:
                self.best_bits_per_dim, best = bpd, True
        self.save_checkpoint(best=best or not (self.checkpoints.dir / "best.pt").exists())
        if final:
            test = self.evaluate(metrics=metrics, split="test")
            self._compare_with_training_windows(test, metrics)

    def _compare_with_training_windows(self, test: dict[str, Any], metrics: MetricsLogger | None) -> None:
        """Evaluate the training split's windows (``eval_train.json``) and add their summary to the test
        result as ``training_windows`` (eval.json, the report): a model that predicts its training
        episodes far better than held-out ones has memorised them (docs/EVALUATION.md)."""
        from VRNN.evaluation import training_window_summary

        # Only rank 0 evaluates and only it reads the split; "any" hands its answer to every rank.
        if not all_reduce_flag(self.dist.is_main and self.training_windows() is not None, "any"):
            return
        train = self.evaluate(metrics=metrics, split="train", plots=False)
        if self.dist.is_main:
            test["training_windows"] = training_window_summary(train, test)
            write_json_atomic(self.run_dir / "eval.json", test)
            self.last_evaluation = test


def make_plots(model: torch.nn.Module, eval_data, config: AIMEConfig, plots_dir: Path, evaluation: dict[str, Any],
               metrics_path: Path | None = None) -> dict[str, Path]:
    """``evaluation.make_evaluation_plots`` on the first ``batch_size`` held-out windows."""
    from VRNN.evaluation import make_evaluation_plots

    loader = DataLoader(eval_data, batch_size=min(config.batch_size, len(eval_data)), shuffle=False)
    batch = next(iter(loader))
    return make_evaluation_plots(model, batch, evaluation, plots_dir, visualize_attention=True,
                                 metrics_path=metrics_path if metrics_path and Path(metrics_path).is_file() else None,
                                 seed=config.seed)


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    """JSON file written to a temporary name and renamed (never half written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def _bits_per_dim(result: dict[str, Any]) -> float | None:
    value = result.get("bits_per_dim")
    if isinstance(value, dict):
        value = value.get("model", value.get("mean"))
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None

