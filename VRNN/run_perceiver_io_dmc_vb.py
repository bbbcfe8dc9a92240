"""Train the causal Perceiver IO video predictor (perceiver_io, MODEL.md §2.1) alone on DMC pixels.

    python VRNN/run_perceiver_io_dmc_vb.py --env walker-walk                       # cpu preset, data/walker-walk
    python VRNN/run_perceiver_io_dmc_vb.py --env walker-walk --minutes 20 --run-dir runs/pio-walker
    python VRNN/run_perceiver_io_dmc_vb.py --env walker-walk --resume --run-dir runs/pio-walker

The dataset (``train/`` and ``test/``, or the old ``train.h5`` / ``eval.h5``, in ``--data-dir``) is collected first when
missing. The model is `CausalPerceiverIO(PerceiverIOConfig.from_aime_config(preset))`, trained on
tokenizer reconstruction + commitment + next-frame token cross-entropy with AdamW, warm-up + cosine
learning rate and gradient clipping.

Outputs in the run directory: ``config.json`` (AIMEConfig), ``perceiver_config.json``, ``metrics.jsonl``
(training rows and periodic held-out evaluations), ``checkpoints/latest.pt`` (every ``--checkpoint-every``
steps and on exit, written atomically), ``eval.json`` (final held-out evaluation) and
``predictions.png`` (truth / one-step prediction / open-loop rollout of one held-out window).

Held-out metrics: next-token accuracy beside the copy-last-frame token baseline, next-frame PSNR of the
decoded argmax predictions beside the copy-last-frame baseline, the tokenizer's reconstruction PSNR (an
upper bound for the predictions) and open-loop PSNR of ``generate`` after ``eval_context_frames`` observed
frames beside repeating the last observed frame. PSNR is computed per image on frames mapped from [-1,1]
to [0,1] (data range 1), capped at 100 dB (identical frames), then averaged.

Exit codes: 0 when done or stopped by the --minutes budget / a signal (resume with --resume); 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from perceiver_io import CausalPerceiverIO, PerceiverIOConfig
from VRNN.aime_config import AIMEConfig
from VRNN.cli import build_parser
from VRNN.ddp_utils import DistContext
from VRNN.dmc_dataset import DMCVBDataset
from VRNN.run_setup import ensure_dataset, prepare_config, resolve_run_dir, write_config
from VRNN.schedules import WarmupCosine, make_lr_scheduler
from VRNN.stop_control import StopController
from VRNN.vrnn_utilities import (
    get_rng_state,
    load_checkpoint,
    resolve_device,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    setup_logging,
)

logger = logging.getLogger("run_perceiver_io_dmc_vb")

CHECKPOINT_KIND = "perceiver_io"
PSNR_CAP_DB = 100.0


# --------------------------------------------------------------------------------------------------
# Command line
def build_script_parser(argv: list[str] | None) -> argparse.ArgumentParser:
    parser = build_parser("Train the causal Perceiver IO video predictor alone on DMC pixels "
                          "(collects the dataset when missing). World-model-only flags of the shared "
                          "parser (latent size, mixture, likelihood, aggregator, beta) are ignored.", argv)
    parser.add_argument("--resume", action="store_true",
                        help="continue from <run-dir>/checkpoints/latest.pt (needs --run-dir)")
    parser.add_argument("--recon-loss", choices=["l1", "mse"], default="l1",
                        help="tokenizer reconstruction loss on pixels in [-1,1]")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="label smoothing of the next-token cross-entropy")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--plot-columns", type=int, default=12,
                        help="most frames shown per row of predictions.png")
    return parser


def perceiver_config(config: AIMEConfig, args: argparse.Namespace) -> PerceiverIOConfig:
    return PerceiverIOConfig.from_aime_config(config, recon_loss=args.recon_loss,
                                              label_smoothing=args.label_smoothing)


def eval_lengths(config: AIMEConfig) -> tuple[int, int]:
    """(L, T0): held-out window length and observed frames before the open-loop rollout."""
    length = min(max(config.sequence_length, config.eval_context_frames + config.eval_horizon),
                 config.perceiver_max_seq_len)
    return length, max(1, min(config.eval_context_frames, length - 1))


# --------------------------------------------------------------------------------------------------
# Evaluation
def _psnr01(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [...,3,H,W] frames in [-1,1], mapped to [0,1]; capped at PSNR_CAP_DB."""
    from VRNN.advanced_metrics import psnr_per_image

    values = psnr_per_image((pred + 1) / 2, (target + 1) / 2, data_range=1.0)
    return values.clamp(max=PSNR_CAP_DB).flatten()


def _window_indices(dataset: DMCVBDataset, count: int) -> list[int]:
    """``count`` windows spread evenly over the dataset (deterministic)."""
    count = max(1, min(count, len(dataset)))
    return sorted({round(i * (len(dataset) - 1) / max(1, count - 1)) for i in range(count)})


@torch.no_grad()
def evaluate(model: CausalPerceiverIO, dataset: DMCVBDataset, config: AIMEConfig, device: torch.device,
             context_frames: int) -> dict[str, Any]:
    """Held-out metrics over ``config.eval_windows`` windows (eval mode: the codebook does not move)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    psnr: dict[str, list[torch.Tensor]] = {k: [] for k in ("prediction", "copy_last_frame", "tokenizer_recon",
                                                            "open_loop", "open_loop_copy_last_frame")}
    side = model.config.tokens_per_side

    def add(name: str, value: torch.Tensor, n: int) -> None:
        sums[name] = sums.get(name, 0.0) + float(value) * n
        counts[name] = counts.get(name, 0) + n

    indices = _window_indices(dataset, config.eval_windows)
    for start in range(0, len(indices), config.batch_size):
        chunk = indices[start:start + config.batch_size]
        video = torch.stack([dataset[i]["observations"] for i in chunk]).to(device)       # [B,L,3,H,W]
        b, t = video.shape[:2]
        losses = model.compute_loss(video)
        for key in ("total", "recon", "commitment", "next_token_ce", "codebook_perplexity"):
            add(key, losses[key], b)
        logits, codes = model.next_token_logits(video)                                     # [B,L,hw,K], [B,L,h,w]
        predicted = logits.argmax(-1)                                                      # [B,L,hw]
        target, current = codes[:, 1:].flatten(2), codes[:, :-1].flatten(2)                # [B,L-1,hw]
        n_tokens = target.numel()
        add("token_accuracy", (predicted[:, :-1] == target).float().mean(), n_tokens)
        add("copy_token_accuracy", (current == target).float().mean(), n_tokens)
        frames = model.decode_tokens(predicted.view(b, t, side, side))                     # row s: x_{s+1}
        psnr["prediction"].append(_psnr01(frames[:, :-1], video[:, 1:]))
        psnr["copy_last_frame"].append(_psnr01(video[:, :-1], video[:, 1:]))
        psnr["tokenizer_recon"].append(_psnr01(model.decode_tokens(codes), video))
        future = video[:, context_frames:]
        rollout = model.generate(video[:, :context_frames], future.shape[1])
        psnr["open_loop"].append(_psnr01(rollout, future))
        psnr["open_loop_copy_last_frame"].append(
            _psnr01(video[:, context_frames - 1:context_frames].expand_as(future), future))
    model.train(was_training)
    result: dict[str, Any] = {name: sums[name] / counts[name] for name in sums}
    for name, parts in psnr.items():
        result[f"psnr_{name}"] = float(torch.cat(parts).mean())
    result.update(eval_windows=len(indices), window_length=int(dataset.sequence_length),
                  context_frames=context_frames, chance_token_accuracy=1.0 / model.config.num_codes)
    return result


# --------------------------------------------------------------------------------------------------
# Plot
@torch.no_grad()
def save_prediction_plot(model: CausalPerceiverIO, video: torch.Tensor, context_frames: int, path: Path,
                         max_columns: int) -> Path:
    """PNG of one window video [1,L,3,H,W]: truth, one-step predictions (column s shows x_s predicted from
    x_{<s}) and the open-loop rollout after ``context_frames`` observed frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = model.training
    model.eval()
    video = video[:, :max(2, min(video.shape[1], max_columns))]
    t = video.shape[1]
    context_frames = min(context_frames, t - 1)
    one_step = model.predict_next_frames(video)[:, :-1]                                    # x_2..x_L
    rollout = model.generate(video[:, :context_frames], t - context_frames)
    model.train(was_training)

    def image(frame: torch.Tensor):
        return ((frame.float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()

    rows = [("truth", [image(f) for f in video[0]]),
            ("one-step prediction", [None] + [image(f) for f in one_step[0]]),
            ("open loop", [image(f) if i < context_frames else None for i, f in enumerate(video[0])])]
    for i, frame in enumerate(rollout[0]):
        rows[2][1][context_frames + i] = image(frame)
    fig, axes = plt.subplots(len(rows), t, figsize=(1.3 * t, 1.5 * len(rows)), squeeze=False)
    for r, (label, frames) in enumerate(rows):
        for c in range(t):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if frames[c] is not None:
                ax.imshow(frames[c])
            if r == 2 and c < context_frames:
                ax.set_title("context", fontsize=7)
            if r == 0:
                ax.set_title(f"t={c + 1}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Training
def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices and conv kernels only (not on biases, norms or embeddings' rows)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(args: argparse.Namespace) -> int:
    if args.resume and args.run_dir is None:
        raise ValueError("--resume needs --run-dir (the folder holding checkpoints/latest.pt)")
    config = prepare_config(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sampler = seed_everything(config.seed)
    ctx = DistContext(device=device)
    train_path, _, eval_path = ensure_dataset(config, args.data_dir, ctx)
    pcfg = perceiver_config(config, args)
    train_data = DMCVBDataset(train_path, config.sequence_length, scale="float", augment=config.augment,
                              seed=config.seed)
    eval_length, context_frames = eval_lengths(config)
    eval_data = DMCVBDataset(eval_path, eval_length, scale="float", seed=config.seed)

    run_dir = resolve_run_dir(config.env, args.run_dir, ctx)
    ckpt_path = run_dir / "checkpoints" / "latest.pt"
    model = CausalPerceiverIO(pcfg).to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.learning_rate,
                                  betas=tuple(config.adam_betas))
    step = 0
    if args.resume and ckpt_path.is_file():
        payload = load_checkpoint(ckpt_path, map_location=device)
        if payload.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{ckpt_path} is not a Perceiver IO checkpoint (kind={payload.get('kind')!r})")
        if payload["perceiver_config"] != pcfg.to_dict():
            diff = {k: (v, pcfg.to_dict().get(k)) for k, v in payload["perceiver_config"].items()
                    if pcfg.to_dict().get(k) != v}
            raise ValueError(f"{ckpt_path} was trained with another Perceiver config (checkpoint, now): {diff}")
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        step = int(payload["step"])
        set_rng_state(payload["rng"])
        sampler.set_state(payload["sampler"])
        logger.info("resumed from %s at step %d", ckpt_path, step)
    elif args.resume:
        logger.info("--resume: no checkpoint at %s yet; starting from step 0", ckpt_path)
    # The learning rate is a pure function of the step and the current config (so a resumed run may
    # extend --max-steps); the optimiser's groups carry `initial_lr` from the checkpoint when resuming.
    if step > 0:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosine(config.warmup_steps, config.max_steps, config.min_lr_ratio), last_epoch=step - 1)
    else:
        scheduler = make_lr_scheduler(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    write_config(run_dir, config, ctx)
    _write_json(run_dir / "perceiver_config.json", pcfg.to_dict())
    from VRNN.metrics_log import MetricsLogger

    metrics = MetricsLogger(run_dir, resume_step=step)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Perceiver IO: %.2fM parameters, %d train windows, %d eval windows (L=%d), device %s",
                n_params / 1e6, len(train_data), len(eval_data), eval_length, device)

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "kind": CHECKPOINT_KIND, "config": config.to_dict(), "perceiver_config": pcfg.to_dict(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "rng": get_rng_state(),
            "sampler": sampler.get_state(),
        })

    model.train()
    reason = "max_steps"
    started = time.monotonic()
    stop = StopController(minutes=args.minutes).start()
    bar = tqdm(total=config.max_steps, initial=step, desc="perceiver", unit="step", disable=None)
    try:
        while step < config.max_steps:
            reason_now = stop.reason()
            if reason_now is not None:
                reason = reason_now
                break
            # Windows drawn with our own generator (its state is in the checkpoint: exact resume).
            idx = torch.randint(len(train_data), (config.batch_size,), generator=sampler).tolist()
            video = torch.stack([train_data[i]["observations"] for i in idx]).to(device)   # [B,T,3,H,W]
            losses = model.compute_loss(video)
            if not torch.isfinite(losses["total"]):
                raise FloatingPointError(f"non-finite loss at step {step}: {losses['total'].item()}")
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == 1:
                row = {k: float(v.detach()) for k, v in losses.items()}
                row.update(step=step, grad_norm=float(grad_norm), lr=scheduler.get_last_lr()[0])
                metrics.log(row)
                bar.set_postfix(loss=f"{row['total']:.3f}", acc=f"{row['accuracy']:.3f}")
            if step % config.eval_every == 0 and step < config.max_steps:
                metrics.log({"step": step, "eval": evaluate(model, eval_data, config, device, context_frames)})
            if step % config.checkpoint_every == 0:
                checkpoint()
    finally:
        bar.close()
        stop.close()
    checkpoint()
    result = evaluate(model, eval_data, config, device, context_frames)
    result.update(step=step, env=config.env, preset=args.preset, stopped_by=reason,
                  train_minutes=(time.monotonic() - started) / 60.0, parameters=n_params)
    metrics.log({"step": step, "eval": result})
    metrics.close()
    _write_json(run_dir / "eval.json", result)
    plot = save_prediction_plot(model, eval_data[0]["observations"][None].to(device), context_frames,
                                run_dir / "predictions.png", args.plot_columns)
    print(f"step {step} ({reason}): token accuracy {result['token_accuracy']:.3f} "
          f"(copy-last-frame {result['copy_token_accuracy']:.3f}, chance {result['chance_token_accuracy']:.4f}); "
          f"next-frame PSNR {result['psnr_prediction']:.2f} dB (copy-last-frame {result['psnr_copy_last_frame']:.2f}, "
          f"tokenizer {result['psnr_tokenizer_recon']:.2f}); open-loop {result['psnr_open_loop']:.2f} dB "
          f"(copy {result['psnr_open_loop_copy_last_frame']:.2f})")
    print(f"run directory: {run_dir}  (eval.json, {plot.name}, checkpoints/latest.pt)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_script_parser(argv)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return train(args)
    except ValueError as exc:  # bad flags, data or checkpoint: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
