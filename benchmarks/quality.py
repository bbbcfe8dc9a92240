"""Quality per wall-clock minute: the AIME ablation ladder on one DMC task, on the same data, seed and budget.

    python benchmarks/quality.py --env cheetah-run                     # the whole ladder, 25 minutes each
    python benchmarks/quality.py --env walker-walk --minutes 5 --configs full,sum
    python benchmarks/quality.py --env cheetah-run --steps 300 --configs full --set free_nats=0 --name no_free_nats

Every configuration trains from the same seed on the same training split (OU behaviour policy) with the
real trainer step (``DMCVBTrainer.train_step``: four tasks, the aggregator, discriminator steps, EMA), for
the same wall-clock budget (``--minutes``) or the same number of steps (``--steps``). It is then scored by
``VRNN.evaluation.evaluate`` (the evaluation that ``make demo`` reports: three input-ignoring baselines,
moving-pixel PSNR, the controls, standard errors) on episodes of a policy it never saw (per-joint sines,
other seeds): the EMA weights, temperature 0, and by the same protocol on windows of its OU training episodes
(eval.json's ``training_windows``; the summary's ``memorisation_gap_db``, which here also holds the change of
policy). Results go to ``<out>/<config>/eval.json`` and one
``<out>/summary.json``, and a table is printed; ``--plot`` draws PSNR against the horizon for every
configuration beside the baselines and an open-loop grid of each.

The ladder (``LADDER``): ``full`` (the preset with all four pillars on: the Perceiver, the attention
schema and the temporal discriminator, which the cpu preset leaves out), ``preset`` (the preset exactly),
``single_gaussian`` (K = 1), ``sum`` (the plain sum of task gradients instead of RGB), ``no_perceiver``,
``no_attention`` and ``no_discriminator``. ``--set key=value`` changes config fields of every configuration run (for one-off
experiments, named with ``--name``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from VRNN.aime_config import PRESETS, AIMEConfig, parse_overrides

logger = logging.getLogger("quality")

# configuration name -> config overrides (on top of the preset and --set)
_PILLARS = {"use_perceiver": True, "use_attention": True, "use_discriminator": True}
LADDER: dict[str, dict[str, Any]] = {
    "full": dict(_PILLARS),
    "preset": {},
    "single_gaussian": {**_PILLARS, "max_components": 1},
    "sum": {**_PILLARS, "aggregator": "sum"},
    "no_perceiver": {**_PILLARS, "use_perceiver": False},
    "no_attention": {**_PILLARS, "use_attention": False},
    "no_discriminator": {**_PILLARS, "use_discriminator": False},
}
SINE_TEST_DIR = "test_sine"


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["free_nats=0", "likelihood=mdl"]`` -> ``{"free_nats": 0, "likelihood": "mdl"}`` (checked by AIMEConfig)."""
    try:
        return parse_overrides(items)
    except ValueError as err:
        raise SystemExit(f"quality.py: --set: {err}") from None


def _waiting_for_other_writers(collect, wait_s: float = 1800.0, poll_s: float = 5.0):
    """``collect()``, retried while another process holds a split folder's lock (two ladders started at
    once on the same data folder: the second waits for the first's collection, then finds it complete)."""
    from VRNN.hdf5_io import DataFileError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return collect()
        except DataFileError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            logger.info("waiting for another process to finish writing the data: %s", err)
            time.sleep(poll_s)


def prepare_data(config: AIMEConfig, data_dir: Path, progress: bool):
    """Train / validation / test splits of ``config`` (OU policy), plus a test split of the sine policy with
    the test seeds (``data_dir/test_sine``). Returns (train, validation, sine test) datasets."""
    from VRNN.collect_dmc import collect_split, split_seeds
    from VRNN.ddp_utils import DistContext
    from VRNN.run_setup import ensure_dataset, load_datasets, load_eval_dataset

    splits = _waiting_for_other_writers(lambda: ensure_dataset(
        config, data_dir, DistContext(device=torch.device("cpu")), progress=progress))
    sine = data_dir / SINE_TEST_DIR
    # Seeds of run seed + 1: disjoint from every split of the training run's seed.
    _waiting_for_other_writers(lambda: collect_split(
        sine, config.env, split_seeds(config.seed + 1, config.eval_episodes, "test"), config.episode_length,
        "sine", action_repeat=config.action_repeat, image_size=config.image_size, progress=progress,
        desc="test (sine policy)", split="test"))
    train, validation, _ = load_datasets(config, *splits)
    return train, validation, load_eval_dataset(config, sine)


def train_one(config: AIMEConfig, train, validation, run_dir: Path, minutes: float | None, steps: int | None,
              progress: bool) -> dict[str, Any]:
    """Train a fresh model with ``DMCVBTrainer.train_step`` until the budget; returns timing figures."""
    from tqdm import tqdm

    from VRNN.dmc_vb_transition_dynamics_trainer import DMCVBTrainer
    from VRNN.run_setup import build_model

    torch.manual_seed(config.seed)
    model = build_model(config, train.action_dim, torch.device("cpu"))
    trainer = DMCVBTrainer(model, train, validation, config, run_dir, progress=False)
    loader = iter(trainer._loader())
    deadline = None if minutes is None else time.perf_counter() + 60.0 * minutes
    started, done, history = time.perf_counter(), 0, []
    bar = tqdm(total=steps, desc=run_dir.name, unit="step", disable=not progress, leave=False)
    while (steps is None or done < steps) and (deadline is None or time.perf_counter() < deadline):
        if deadline is not None and config.lr_follows_budget:   # as DMCVBTrainer.train does with --minutes
            trainer.set_budget_fraction((time.perf_counter() - started) / (60.0 * minutes))
        scalars = trainer.train_step(next(loader))
        done += 1
        bar.update(1)
        if scalars is not None:
            history.append({k: scalars[k] for k in ("bits_per_dim", "recon_loss", "kl_z", "step_time_s")
                            if k in scalars})
            bar.set_postfix(bpd=f"{scalars['bits_per_dim']:.3f}")
            if done % 25 == 0:
                logger.info("%s step %d: bits/dim %.3f, recon %.4f, KL_z %.5f nats/dim, %.2f s/step", run_dir.name,
                            done, scalars["bits_per_dim"], scalars["recon_loss"], scalars["kl_z"],
                            (time.perf_counter() - started) / done)
    bar.close()
    elapsed = time.perf_counter() - started
    trainer.save_checkpoint()
    frames = done * config.batch_size * config.sequence_length
    return {"trainer": trainer, "steps": done, "seconds": elapsed, "frames_per_s": frames / max(elapsed, 1e-9),
            "train_bits_per_dim_last10": float(sum(h["bits_per_dim"] for h in history[-10:]) / max(1, len(history[-10:]))),
            "history": history}


def score(trainer, config: AIMEConfig, train, test, out_dir: Path, plot: bool) -> dict[str, Any]:
    """``evaluate`` on the EMA weights, with the mean training frame; writes eval.json (and plots)."""
    from VRNN.dmc_vb_transition_dynamics_trainer import write_json_atomic
    from VRNN.evaluation import evaluate, load_or_compute_mean_frame, make_evaluation_plots, training_window_summary

    mean_frame = load_or_compute_mean_frame(out_dir.parent / "mean_frame.npy", train)
    result = evaluate(trainer.model, test, config, ema=trainer.ema.module, progress=False, mean_frame=mean_frame,
                      split="test (sine policy)")
    windows = trainer.training_windows()
    if windows is not None:  # the same protocol on training windows (OU policy): learned or replayed?
        on_train = evaluate(trainer.model, windows, config, ema=trainer.ema.module, progress=False,
                            mean_frame=mean_frame, split="train")
        result["training_windows"] = training_window_summary(on_train, result)
    write_json_atomic(out_dir / "eval.json", result)
    if plot:
        batch = next(iter(torch.utils.data.DataLoader(test, batch_size=min(4, len(test)), shuffle=False)))
        make_evaluation_plots(trainer.ema.module, batch, result, out_dir / "plots", visualize_attention=True,
                              seed=config.seed)
    return result


def _get(result: dict[str, Any], *path: str, default=float("nan")):
    node: Any = result
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def summary_row(name: str, timing: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one configuration that the table and RESULTS.md show (keys of eval.json: see
    docs/EVALUATION.md)."""
    def at(key: str, j: int) -> float:
        seq = result.get(key) or []
        return float(seq[j]) if len(seq) > j and seq[j] is not None else float("nan")

    psnr = result.get("pred_psnr") or []
    first8 = [float(v) for v in psnr[:8] if v is not None]
    row = {"config": name, "steps": timing["steps"], "seconds": round(timing["seconds"], 1),
           "frames_per_s": round(timing["frames_per_s"], 1),
           "train_bits_per_dim_last10": timing["train_bits_per_dim_last10"],
           "bits_per_dim": _get(result, "bits_per_dim"), "recon_psnr": _get(result, "recon_psnr"),
           "open_loop_psnr_mean_1_8": sum(first8) / len(first8) if first8 else float("nan"),
           "K_eff": _get(result, "K_eff"), "verdict": (result.get("verdict") or {}).get("text", "")}
    for j in sorted({0, 1, 3, 7, len(psnr) - 1}):
        if 0 <= j < len(psnr):
            row[f"psnr_+{j + 1}"] = at("pred_psnr", j)
            row[f"moving_psnr_+{j + 1}"] = at("pred_moving_psnr", j)
    shuffle = result.get("action_shuffle_ratio") or []
    if len(shuffle) >= 8:
        row["action_shuffle_+8"] = float(shuffle[7])
    for key in ("z_swap_gap_nats_per_frame", "h_swap_gap_nats_per_frame", "z_spread_ratio", "kl_z_nats_per_frame"):
        if result.get(key) is not None:
            row[key] = float(result[key])
    for base, gap in (result.get("gaps") or {}).items():
        row[f"beats_{base}_from"] = gap.get("beats_from")
    # Lead over the mean frame on training windows minus on the test windows (here another policy's, so
    # it also holds the policy shift): docs/EVALUATION.md.
    if _get(result, "training_windows", "memorisation_gap_db", default=None) is not None:
        row["memorisation_gap_db"] = float(result["training_windows"]["memorisation_gap_db"])
    return row


def baseline_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-horizon PSNR of each input-ignoring baseline, from one evaluation (they do not depend on the model)."""
    from VRNN.eval_scoring import BASELINE_NAMES

    rows = []
    for base, label in BASELINE_NAMES.items():
        psnr = result.get(f"{base}_psnr") or []
        if not psnr:
            continue
        first8 = [float(v) for v in psnr[:8] if v is not None]
        row = {"config": f"baseline: {label}", "open_loop_psnr_mean_1_8": sum(first8) / max(1, len(first8))}
        moving = result.get(f"{base}_moving_psnr") or []
        for j in sorted({0, 1, 3, 7, len(psnr) - 1} & set(range(len(psnr)))):
            row[f"psnr_+{j + 1}"] = float(psnr[j]) if psnr[j] is not None else float("nan")
            if len(moving) > j and moving[j] is not None:
                row[f"moving_psnr_+{j + 1}"] = float(moving[j])
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    keys = ["config", "steps", "frames_per_s", "bits_per_dim", "recon_psnr", "open_loop_psnr_mean_1_8",
            "psnr_+1", "psnr_+2", "psnr_+4", "psnr_+8", "psnr_+15", "moving_psnr_+8", "action_shuffle_+8",
            "z_spread_ratio", "K_eff"]
    keys = [k for k in keys if any(k in r for r in rows)]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and abs(v) < 100 else (f"{v:.1f}" if isinstance(v, float) else str(v))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |")


def plot_ladder(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """PSNR against the horizon for every configuration and the baselines of the first one."""
    if not results:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    from VRNN.eval_scoring import BASELINE_NAMES

    first = next(iter(results.values()))
    for base, label in BASELINE_NAMES.items():
        psnr = first.get(f"{base}_psnr") or []
        if psnr:
            ax.plot(range(1, len(psnr) + 1), psnr, "--", lw=1.2, label=f"baseline: {label}")
    for name, res in results.items():
        psnr = res.get("pred_psnr") or []
        ax.plot(range(1, len(psnr) + 1), psnr, "-o", ms=3, lw=1.8, label=name)
    ax.set_xlabel("steps after the last observed frame")
    ax.set_ylabel("open-loop PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--env", default="cheetah-run", help="DMC task (e.g. cheetah-run, walker-walk)")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="model size preset")
    parser.add_argument("--configs", default=",".join(LADDER),
                        help=f"comma-separated configurations of the ladder: {', '.join(LADDER)}")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock training budget per configuration (default 25 unless --steps is given)")
    parser.add_argument("--steps", type=int, default=None, help="train each configuration for this many steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config field override applied to every configuration (repeatable)")
    parser.add_argument("--name", default=None, help="suffix of the output folder names (for --set experiments)")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset folder (default data/<env>)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/quality_runs/<env>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data collection, initialisation and data order")
    parser.add_argument("--eval-windows", type=int, default=64, help="test windows scored per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--plot", action="store_true", help="evaluation plots per configuration and the ladder plot")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    if args.steps is not None and args.steps <= 0:
        parser.error(f"--steps must be positive, got {args.steps}")
    minutes = args.minutes if args.minutes is not None or args.steps is not None else 25.0
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in LADDER]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {list(LADDER)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = parse_sets(args.set)

    from VRNN.cli import default_data_dir
    from VRNN.dmc_vb_transition_dynamics_trainer import write_json_atomic
    from VRNN.run_setup import canonical_env

    env = canonical_env(args.env)
    base = AIMEConfig.preset(args.preset, env=env, seed=args.seed, eval_windows=args.eval_windows, **sets)
    data_dir = args.data_dir or default_data_dir(env)
    out = args.out or Path("benchmarks/quality_runs") / env
    out.mkdir(parents=True, exist_ok=True)
    train, validation, test = prepare_data(base, data_dir, progress=not args.quiet)

    rows, results = [], {}
    summary_path = out / "summary.json"
    for name in names:
        label = name if args.name is None else f"{name}+{args.name}"
        config = base.replace(**LADDER[name], action_dim=train.action_dim)
        run_dir = out / label
        logger.info("%s: training (%s)", label, f"{args.steps} steps" if args.steps else f"{minutes} minutes")
        timing = train_one(config, train, validation, run_dir, None if args.steps else minutes, args.steps,
                           progress=not args.quiet)
        result = score(timing["trainer"], config, train, test, run_dir, args.plot)
        results[label] = result
        row = summary_row(label, timing, result)
        rows.append(row)
        config.to_json(run_dir / "config.json")
        # Read again just before writing: another ladder may share --out and have added its rows meanwhile.
        previous = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        previous[label] = {"row": row, "config": sets | LADDER[name], "history": timing["history"]}
        write_json_atomic(summary_path, previous)
        logger.info("%s: %s", label, json.dumps({k: v for k, v in row.items() if k != "config"}, default=float))
    rows += baseline_rows(next(iter(results.values())))
    print_table(rows)
    if args.plot:
        path = plot_ladder(results, out / "psnr_vs_horizon.png")
        logger.info("ladder plot: %s", path)
    return 0 if all(math.isfinite(r.get("bits_per_dim", float("nan"))) for r in rows if "steps" in r) else 1


if __name__ == "__main__":
    sys.exit(main())
