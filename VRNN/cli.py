"""The one argument parser every script shares.

Defaults come from the chosen preset: ``--preset`` is read first, then the full parser is built with that
preset's values as defaults, so ``--help`` shows the numbers that will actually be used. A misspelt flag
is an error (argparse's ``allow_abbrev`` is off so that a prefix is not silently taken for a flag).

Usage in a script::

    parser = build_parser("Train AIME on DMC pixels.", argv)
    add_training_flags(parser)           # only the flags this script needs
    args = parser.parse_args(argv)
    config = config_from_args(args)
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from VRNN.aime_config import PRESETS, AIMEConfig, parse_overrides

__all__ = [
    "RESUME_CHANGEABLE",
    "add_training_flags",
    "build_parser",
    "config_from_args",
    "default_data_dir",
    "explicit_config_flags",
    "given_flags",
    "set_overrides",
]

# Command-line flag -> AIMEConfig field. Flags not listed here are run options, not hyperparameters.
CONFIG_FLAGS: dict[str, tuple[str, type, str]] = {
    "--batch-size": ("batch_size", int, "sequences per optimiser step (global, split across ranks)"),
    "--sequence-length": ("sequence_length", int, "frames per training window (T)"),
    "--latent-dim": ("latent_dim", int, "size of z_t (D)"),
    "--max-components": ("max_components", int, "truncation level K of the stick-breaking mixture"),
    "--hidden-dim": ("hidden_dim", int, "LSTM state size (H)"),
    "--learning-rate": ("learning_rate", float, "peak AdamW learning rate"),
    "--aggregator": ("aggregator", str, "multi-task gradient aggregation: rgb | sum | pcgrad"),
    "--likelihood": ("likelihood", str, "pixel likelihood: mdl (logistic mixture) | gaussian"),
    "--episodes": ("train_episodes", int, "training episodes of the dataset (collected when missing; a folder "
                   "holding fewer is extended)"),
    "--eval-episodes": ("eval_episodes", int, "held-out episodes to collect when the dataset is missing"),
    "--episode-length": ("episode_length", int, "agent steps per collected episode"),
    "--policy": ("policy", str, "behaviour policy for collection: random | ou | sine"),
    "--action-repeat": ("action_repeat", int, "physics steps per agent step"),
    "--eval-every": ("eval_every", int, "evaluate every N optimiser steps"),
    "--checkpoint-every": ("checkpoint_every", int, "write a checkpoint every N optimiser steps"),
    "--log-every": ("log_every", int, "append to metrics.jsonl every N optimiser steps"),
    "--eval-windows": ("eval_windows", int, "held-out windows used per evaluation"),
    "--beta": ("beta", float, "final KL weight after warm-up"),
    "--overshoot-weight": ("overshoot_weight", float,
                           "weight of the open-loop (overshooting) reconstruction of each window after "
                           "--overshoot-context filtered frames; 0 disables"),
    "--overshoot-context": ("overshoot_context", int, "filtered frames before the open-loop part of a window"),
    "--seed": ("seed", int, "random seed (data order, initialisation, sampling)"),
    "--max-steps": ("max_steps", int, "stop after this many optimiser steps"),
    "--warmup-steps": ("warmup_steps", int, "linear learning-rate warm-up steps before the cosine decay"),
    "--lr-follows-budget": ("lr_follows_budget", bool,
                            "with --minutes, the learning-rate cosine also follows the fraction of the budget "
                            "spent, so it reaches its floor when the budget ends; --no-lr-follows-budget: on "
                            "the step alone (step / --max-steps)"),
    "--beta-warmup-steps": ("beta_warmup_steps", int, "steps of the linear KL-weight (beta) warm-up"),
    "--adversarial-warmup-steps": ("adversarial_warmup_steps", int, "steps of the adversarial-loss warm-up"),
    "--adversarial-start-steps": ("adversarial_start_steps", int,
                                  "optimiser step at which the adversarial task and the discriminator start"),
    "--disc-learning-rate": ("disc_learning_rate", float, "peak AdamW learning rate of the discriminator"),
    "--n-critic": ("n_critic", int, "discriminator steps per generator step"),
    "--grad-clip": ("grad_clip", float, "global gradient-norm clipping threshold"),
    "--ema-decay": ("ema_decay", float, "decay of the EMA copy used for evaluation and Gram anchoring"),
    "--keep-checkpoints": ("keep_checkpoints", int, "numbered checkpoints kept beside latest.pt and best.pt"),
    "--max-nonfinite-steps": ("max_nonfinite_steps", int, "stop after this many non-finite steps in a row"),
    "--num-workers": ("num_workers", int, "DataLoader worker processes per rank"),
    # The pillars, as switches (--no-discriminator, ...): the ablations of benchmarks/quality.py
    "--discriminator": ("use_discriminator", bool,
                        "the temporal discriminator and the adversarial task; --no-discriminator removes both "
                        "(the cpu preset trains without it: docs/MODEL_CHANGES.md 16)"),
    "--perceiver": ("use_perceiver", bool, "the Perceiver context c_t and its task; --no-perceiver removes both"),
    "--attention": ("use_attention", bool, "the attention schema and its task; --no-attention removes both"),
}


# Flags that ``--resume`` accepts with values other than the run's own. None of them changes the weights
# the run trains to (the data order, the schedules and the random streams are those of the checkpoint);
# they say where and how long this session runs, where the dataset now is, and how often it logs,
# evaluates and saves. Every other flag typed with --resume must equal the run's value (config.json / the
# checkpoint), or the resume is refused with the list of differing fields.
RESUME_CHANGEABLE: dict[str, str] = {
    "--minutes": "the budget of this session (default: the run's own --minutes, counted afresh); with "
                 "lr_follows_budget the learning-rate cosine goes on from where it stopped to its floor at "
                 "the end of this budget",
    "--device": "where this session runs",
    "--threads": "CPU threads of this session",
    "--stop-file": "the stop file of this session",
    "--data-dir": "where the run's dataset is now (default: the run's own; a warning when it differs)",
    "--tensorboard": "also log to TensorBoard (default: as the run did)",
    "--visualize-attention": "attention plots at each evaluation (default: as the run did)",
    "--save-visualizations": "keep every evaluation's plots (default: as the run did)",
    "--log-every": "metrics.jsonl interval",
    "--eval-every": "evaluation interval",
    "--checkpoint-every": "checkpoint interval",
    "--keep-checkpoints": "numbered checkpoints kept",
    "--max-nonfinite-steps": "non-finite steps in a row before the run stops",
    "--load-checkpoint": "ignored once the run has a checkpoint of its own (a warm start otherwise)",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, and flag names in help texts never split at their hyphens."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _preset_from_argv(argv: Sequence[str] | None) -> str:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    known, _ = pre.parse_known_args(argv)
    return known.preset


def build_parser(description: str, argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The common flags of all scripts, with defaults taken from the preset named in ``argv``."""
    preset = _preset_from_argv(argv)
    base = AIMEConfig.preset(preset)
    parser = argparse.ArgumentParser(
        description=description, allow_abbrev=False,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--env", default=base.env,
                        help="DMC task, any spelling: cheetah-run, cheetah_run, dmc_cheetah_run")
    parser.add_argument("--preset", default=preset, choices=sorted(PRESETS),
                        help="size preset; every other default below comes from it")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data folder holding the train/ val/ test/ splits, or the old train.h5 and eval.h5 "
                             "(default: data/<env>)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="output folder (default: runs/<env>/<timestamp>)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget for training in minutes (stops cleanly with a checkpoint)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to train; auto picks cuda when available")
    for flag, (name, kind, help_text) in CONFIG_FLAGS.items():
        if kind is bool:   # --flag / --no-flag
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=getattr(base, name),
                                help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=getattr(base, name), help=help_text)
    parser.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                        help="any AIMEConfig field by name (repeatable), e.g. --set residual_cell_max_side=0; values "
                             "read as int, float or bool where they can. A field that has a flag of its own "
                             "(--batch-size ...) is set with that flag; the run's config.json records the result")
    return parser


def add_training_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of the scripts that train the world model (main.py, training_vrnn.py)."""
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its newest intact checkpoint, with the run's own "
                             "config (config.json, the checkpoint) and launch options (run.json: preset, data dir, "
                             "budget); no other flag is needed. Flags that may differ from the run's: "
                             + ", ".join(RESUME_CHANGEABLE) + ". Any other flag given with a different value is "
                             "refused (exit 2) with the list of differing fields. A run dir without a checkpoint "
                             "or config.json starts from step 0 with the flags given")
    parser.add_argument("--eval-only", action="store_true",
                        help="skip training; evaluate the checkpoint given by --load-checkpoint")
    parser.add_argument("--load-checkpoint", type=Path, default=None,
                        help="checkpoint to evaluate (with --eval-only) or to start from")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast of the training step, on CUDA or on a CPU with native bf16 (AVX512-BF16 "
                             "or AMX; elsewhere it falls back to float32 with a warning); --no-amp: float32. "
                             "Default: the preset's (cpu: on, paper and smoke: off)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also log to TensorBoard (when the tensorboard package is installed)")
    parser.add_argument("--visualize-attention", action="store_true",
                        help="plot attention and slot maps at each evaluation")
    parser.add_argument("--save-visualizations", action="store_true",
                        help="keep the plots of every evaluation, not only the last (plots/step_<N>/)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per process for torch (0: torch's default, i.e. OMP_NUM_THREADS or all "
                             "cores); on a shared or busy machine 1 is often much faster")
    parser.add_argument("--stop-file", type=Path, default=None,
                        help="if this file appears, every rank saves a checkpoint and stops at the next step "
                             "(used by run_VRNN_minimum.sh, whose preemption signal may not reach torchrun's "
                             "workers); removed when training starts")
    return parser


def set_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The fields of ``--set KEY=VALUE`` (``{}`` without any). ``ValueError`` names a malformed item, an
    unknown field (with close matches) and a field that has a flag of its own (``--set batch_size=4``:
    use ``--batch-size``), so that one field has one spelling on the command line and in run.json."""
    overrides = parse_overrides(list(getattr(args, "set", None) or []))
    own_flag = {name: flag for flag, (name, _, _) in CONFIG_FLAGS.items()}
    own_flag.update(env="--env", amp="--amp/--no-amp")
    taken = {key: own_flag[key] for key in overrides if key in own_flag}
    if taken:
        raise ValueError("--set " + ", ".join(f"{k} is invalid: that field has its own flag {f}"
                                              for k, f in sorted(taken.items())))
    return overrides


def explicit_config_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, object]:
    """The config fields whose command-line value differs from the preset default (set by the user),
    ``--set`` fields included."""
    explicit = {name: getattr(args, name) for name, _, _ in CONFIG_FLAGS.values()
                if getattr(args, name) != parser.get_default(name)}
    explicit.update(set_overrides(args))
    return explicit


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> dict[str, str]:
    """``{dest: option string}`` of every flag typed in ``argv`` (default ``sys.argv[1:]``), whatever its
    value: unlike ``explicit_config_flags``, a flag typed with its default value counts."""
    argv = sys.argv[1:] if argv is None else list(argv)
    by_option = {option: action.dest for action in parser._actions for option in action.option_strings}
    found: dict[str, str] = {}
    for token in argv:
        if token == "--":
            break
        option = token.split("=", 1)[0]
        if option.startswith("--") and option in by_option:
            found[by_option[option]] = option
    return found


def config_from_args(args: argparse.Namespace, **extra: object) -> AIMEConfig:
    """The preset with the command-line overrides applied (``extra`` wins over both)."""
    overrides = {name: getattr(args, name) for name, _, _ in CONFIG_FLAGS.values()}
    overrides["env"] = args.env
    if getattr(args, "amp", None) is not None:
        overrides["amp"] = bool(args.amp)
    overrides.update(set_overrides(args))
    overrides.update(extra)
    return AIMEConfig.preset(args.preset, **overrides)


def default_data_dir(env_name: str) -> Path:
    """``data/<canonical env name>`` relative to the working directory."""
    return Path("data") / env_name
