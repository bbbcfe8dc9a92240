"""The run's ``report.md``: the evaluation of ``VRNN/evaluation.py`` as tables, the verdict line and the
figures of ``make_evaluation_plots``, with relative links. docs/EVALUATION.md explains every number."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from VRNN.eval_scoring import BASELINE_NAMES, BASELINES, SIGNIFICANCE, USAGE_THRESHOLD

__all__ = ["write_report"]


def _fmt(value, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _pm(e: Mapping[str, Any], key: str, spec: str = ".3g", se_spec: str | None = None) -> str:
    """``value ± se`` of ``key`` (and ``key_se``) in the evaluation dict."""
    value, se = e.get(key), e.get(f"{key}_se")
    if value is None:
        return "n/a"
    return _fmt(value, spec) + (f" ± {_fmt(se, se_spec or spec)}" if se is not None else "")


def _image(run_dir: Path, plot_paths: Mapping[str, Path], name: str, caption: str) -> list[str]:
    if name not in plot_paths:
        return []
    rel = Path(os.path.relpath(Path(plot_paths[name]).resolve(), run_dir.resolve())).as_posix()
    return [f"![{caption}]({rel})", ""]


REPORT_PREDICTORS = (("pred", "model"), ("copy_last", "copy-last"), ("context_mean", "context mean"),
                     ("train_mean", "mean train frame"))


def _horizon_table(e: Mapping[str, Any], metric: str, spec: str) -> list[str]:
    """Markdown rows: one per step and the horizon mean, one column per predictor (value ± SE), best bold."""
    present = [(p, label) for p, label in REPORT_PREDICTORS if e.get(f"{p}_{metric}")]
    if not present:
        return []
    lines = ["| step | " + " | ".join(label for _, label in present) + " |",
             "|---:|" + "---:|" * len(present)]

    def row(name: str, values: list, errors: list) -> str:
        finite = [v for v in values if v is not None]
        best = max(finite) if finite else None
        cells = []
        for v, s in zip(values, errors):
            text = _fmt(v, spec) + (f" ± {_fmt(s, spec)}" if s is not None else "")
            cells.append(f"**{text}**" if v is not None and v == best else text)
        return f"| {name} | " + " | ".join(cells) + " |"

    for j in range(int(e.get("horizon", 0))):
        lines.append(row(f"+{j + 1}", [e[f"{p}_{metric}"][j] for p, _ in present],
                         [(e.get(f"{p}_{metric}_se") or [None] * (j + 1))[j] for p, _ in present]))
    lines.append(row("mean", [e.get(f"{p}_{metric}_mean") for p, _ in present],
                     [e.get(f"{p}_{metric}_mean_se") for p, _ in present]))
    return lines + [""]


def _training_windows_section(e: Mapping[str, Any]) -> list[str]:
    """Markdown: the held-out figures beside the same figures on windows of the training split
    (``e["training_windows"]``, ``evaluation.training_window_summary``); [] when absent."""
    t = e.get("training_windows")
    if not isinstance(t, Mapping):
        return []
    held_lead = ((e.get("gaps") or {}).get("train_mean") or {})
    rows = [("reconstruction PSNR (dB)", _pm(e, "recon_psnr", ".2f"), _pm(t, "recon_psnr", ".2f")),
            ("open-loop PSNR, mean over the horizon (dB)", _pm(e, "pred_psnr_mean", ".2f"),
             _pm(t, "pred_psnr_mean", ".2f")),
            ("lead over the mean training frame (dB)", _pm(held_lead, "psnr_mean", ".2f"),
             _pm(t, "lead_over_mean_frame", ".2f")),
            ("action-shuffle ratio over the horizon", _pm(e, "action_shuffle_ratio_mean", ".3f"),
             _pm(t, "action_shuffle_ratio_mean", ".3f"))]
    lines = ["## Training windows against held-out windows", "",
             (f"The same protocol on {t.get('num_windows')} windows of the training split "
              f"(from {t.get('num_episodes')} of its episodes). A model that learned the dynamics scores alike on both; one "
              "that replays its training episodes leads the mean frame by far more on them."), "",
             "| figure | held-out windows | training windows |", "|---|---:|---:|"]
    lines += [f"| {name} | {held} | {train} |" for name, held, train in rows]
    gap, se = t.get("memorisation_gap_db"), t.get("memorisation_gap_db_se")
    if gap is not None:
        reading = ("the model predicts its training episodes better than new ones: it has memorised part of "
                   "them; more training episodes (`--episodes`) is the first remedy"
                   if se is not None and gap > max(0.5, SIGNIFICANCE * se) else
                   "no sign of memorising at this size of gap")
        lines += ["", f"Memorisation gap (training lead − held-out lead): {_fmt(gap, '.2f')}"
                  + (f" ± {_fmt(se, '.2f')}" if se is not None else "") + f" dB: {reading}."]
    return lines + [""]


def write_report(run_dir: str | Path, eval_dict: Mapping[str, Any], plot_paths: Mapping[str, Path],
                 config) -> Path:
    """Write ``run_dir/report.md``: the verdict line, then the evaluation numbers as tables (mean ± standard
    error over windows) beside the figures (relative links)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    e = eval_dict
    lines = ["# AIME evaluation report", ""]
    v = e.get("verdict")
    if isinstance(v, Mapping) and v.get("text"):
        lines += [f"**Verdict:** {v['text']}.", ""]
    step = e.get("step")
    split = e.get("split") or "held-out"
    episodes = e.get("num_episodes")
    lines += [f"Environment `{config.env}`" + (f", after {step} optimiser steps" if step is not None else "")
              + f"; {e.get('num_windows')} {'non-overlapping ' if e.get('non_overlapping') else ''}windows of the "
              + f"{split} split" + (f" from {episodes} episodes" if episodes else "")
              + (" (EMA weights)" if e.get("used_ema") else "") + ". Every figure is the mean over windows ± its "
              "standard error.",
              "",
              (f"Model: latent D={config.latent_dim}, K={config.max_components} components, hidden "
              f"H={config.hidden_dim}, context C={config.context_dim}, likelihood `{config.likelihood}`, "
              f"trained on windows of T={config.sequence_length}. Open loop: observe T0="
              f"{e.get('context_frames')} frames, imagine F={e.get('horizon')} from the recorded actions "
              "(temperature 0). Full config: `config.json`."), ""]

    lines += ["## Open-loop prediction", "",
              ("Model against three baselines on the same windows: copy-last-frame, the mean of the observed "
              "(context) frames, and the mean training frame (one constant image, "
              f"{e.get('mean_frame_source', 'training split')}). PSNR in dB (data range 2, frames in [-1, 1]) "
              "at each step after the last observed frame. Bold: best."), "",
              "Full-frame PSNR:", ""]
    lines += _horizon_table(e, "psnr", ".2f")
    lines += [(f"Moving-pixel PSNR (only pixels where the true frame differs from the mean training frame by "
              f"more than {_fmt(e.get('moving_threshold'), '.3g')} in some channel; "
              f"{_fmt(100 * sum(e['moving_fraction']) / len(e['moving_fraction']), '.1f') if e.get('moving_fraction') else 'n/a'}"
              "% of the pixels on average):"), ""]
    lines += _horizon_table(e, "moving_psnr", ".2f")
    lines += ["SSIM:", ""]
    lines += _horizon_table(e, "ssim", ".3f")
    gaps = e.get("gaps") or {}
    if gaps:
        lines += [(f"Model − baseline, paired over windows, mean over the horizon; a step counts as won when the "
                  f"full-frame and the moving-pixel gap both exceed {_fmt(e.get('significance_se'), 'g')} standard "
                  "errors:"), "",
                  "| baseline | full-frame Δ PSNR (dB) | moving-pixel Δ PSNR (dB) | steps won | beats from |",
                  "|---|---:|---:|---:|---:|"]
        for base in BASELINES:
            g = gaps.get(base)
            if not g:
                continue
            wins = g.get("wins") or []
            lines.append(f"| {BASELINE_NAMES[base]} | {_pm(g, 'psnr_mean', '.2f')} | {_pm(g, 'moving_psnr_mean', '.2f')} "
                         f"| {sum(bool(w) for w in wins)} of {len(wins)} | "
                         + (f"+{g['beats_from']}" if g.get("beats_from") else "never") + " |")
        lines.append("")
    if e.get("pred_lpips"):
        lines += ["LPIPS per step: " + ", ".join(_fmt(x, ".3f") for x in e["pred_lpips"]), ""]
    lines += _image(run_dir, plot_paths, "psnr_vs_horizon", "PSNR and SSIM against horizon")
    lines += _image(run_dir, plot_paths, "open_loop", "Open-loop grid: truth, model, error")
    lines += _image(run_dir, plot_paths, "rollout_gif", "Open-loop rollout, truth | model")

    lines += ["## Controls: does the model use its inputs?", "",
              "| control | value | reads |", "|---|---:|---|"]
    if e.get("action_shuffle_ratio_mean") is not None:
        lines.append(f"| action-shuffle ratio (MSE with another window's actions / with the recorded ones, over "
                     f"the horizon) | {_pm(e, 'action_shuffle_ratio_mean', '.4f')} | > 1: the actions matter; 1: ignored |")
    for name, what in (("z", "z_t"), ("h", "h_t")):
        if e.get(f"{name}_swap_gap_nats_per_frame") is not None:
            lines.append(f"| reconstruction NLL gap when {what} comes from another window (nats/frame) | "
                         f"{_pm(e, f'{name}_swap_gap_nats_per_frame')} | 0: the decoder ignores {what} |")
    if e.get("recon_nats_per_frame") is not None:
        lines.append(f"| reconstruction NLL, own states (nats/frame) | {_pm(e, 'recon_nats_per_frame', '.5g', '.3g')} | scale "
                     "of the gaps above |")
    if e.get("z_spread_ratio") is not None:
        lines.append(f"| spread of posterior means across windows / posterior std | {_pm(e, 'z_spread_ratio')} "
                     f"(spread {_fmt(e.get('z_mean_spread'), '.3g')}, std {_fmt(e.get('z_posterior_std'), '.3g')}) "
                     "| ≪ 1: z says nothing about the window |")
    if e.get("kl_z_nats_per_frame") is not None:
        lines.append(f"| KL_z (nats/frame) | {_pm(e, 'kl_z_nats_per_frame')} "
                     f"({_fmt(e.get('kl_z_nats_per_latent_dim'), '.3g')} per latent dim, {_fmt(e.get('kl_z'), '.3g')} "
                     "per pixel dim) | information each frame adds beyond the prior |")
    if e.get("perceiver_accuracy") is not None:
        lines.append(f"| Perceiver next-token accuracy | {_pm(e, 'perceiver_accuracy')} | compare with the next row |")
    if e.get("perceiver_copy_accuracy") is not None:
        lines.append(f"| copy-current-token accuracy (same windows) | {_pm(e, 'perceiver_copy_accuracy')} | gain "
                     f"{_pm(e, 'perceiver_accuracy_gain')} |")
    if e.get("action_shuffle_ratio"):
        lines += ["", "Action-shuffle ratio per step: " + ", ".join(
            f"+{j + 1}: {_fmt(r, '.3f')} ± {_fmt(s, '.3f')}"
            for j, (r, s) in enumerate(zip(e["action_shuffle_ratio"], e.get("action_shuffle_ratio_se") or [])))]
    lines.append("")

    lines += _training_windows_section(e)
    lines += ["## Reconstruction and the ELBO", "",
              (f"Posterior reconstruction: PSNR {_pm(e, 'recon_psnr', '.2f')} dB, SSIM "
              f"{_pm(e, 'recon_ssim', '.3f')}."), "",
              "| term | value (nats per dimension) |", "|---|---:|"]
    for key, label in (("recon_loss", "reconstruction −log p(x \\| z)"), ("kl_z", "KL_z"),
                       ("kl_sticks", "KL sticks (Kumaraswamy ‖ Beta)"), ("kl_alpha", "KL α (Gamma)"),
                       ("neg_elbo_nats_per_dim", "negative ELBO"), ("bits_per_dim", "bits/dim (−ELBO / ln 2)"),
                       ("attention_kl", "attention KL"), ("cluster_entropy", "entropy H(π)")):
        if key in e:
            lines.append(f"| {label} | {_pm(e, key, '.4g')} |")
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
    lines += _image(run_dir, plot_paths, "component_gallery", "Frames each component claims most strongly")
    lines += _image(run_dir, plot_paths, "dominant_component", "Dominant component over a window")

    has_entropy = e.get("attention_map_entropy") is not None and e.get("attention_map_entropy_uniform")
    if "attention" in plot_paths or "attention_imagined" in plot_paths or has_entropy:
        lines += ["## Attention", ""]
    if has_entropy:
        ent, uniform = e["attention_map_entropy"], e["attention_map_entropy_uniform"]
        if ent >= 0.99 * uniform:
            state = "the maps are uniform: the attention schema does not look anywhere"
        elif ent >= 0.9 * uniform:
            state = "the maps are nearly uniform: a little mass on a few positions, the rest spread evenly"
        else:
            state = "the maps are concentrated"
        lines += [f"Entropy of the posterior attention maps: {ent:.3f} nats against {uniform:.3f} for the "
                  f"uniform map ({ent / uniform:.3f} of it): {state}.", ""]
    lines += _image(run_dir, plot_paths, "attention", "Attention and slot maps")
    lines += _image(run_dir, plot_paths, "attention_imagined", "Attention while imagining")
    if "loss_curves" in plot_paths or "grad_cosines" in plot_paths:
        lines += ["## Training", ""]
        lines += _image(run_dir, plot_paths, "loss_curves", "Loss curves")
        lines += _image(run_dir, plot_paths, "grad_cosines", "Cosine between task gradients")
    known = {"psnr_vs_horizon", "open_loop", "rollout_gif", "reconstruction", "mixture_weights", "attention",
             "attention_imagined", "loss_curves", "grad_cosines", "component_gallery", "dominant_component"}
    extra = [name for name in plot_paths if name not in known]
    if extra:
        lines += ["## Other figures", ""]
        for name in extra:
            lines += _image(run_dir, plot_paths, name, name)
    lines += ["The meaning and formula of every number and figure: docs/EVALUATION.md.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
