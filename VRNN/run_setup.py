"""What ``VRNN/main.py`` and ``VRNN/training_vrnn.py`` share: from parsed flags to a ready run.

1. the environment name in any spelling -> its canonical ``domain-task`` name;
2. the dataset folder (default ``data/<env>``: ``train/``, ``val/``, ``test/``, or the old ``train.h5`` /
   ``eval.h5``), whose missing or unfinished splits rank 0 collects (the other ranks wait);
3. the run directory (default ``runs/<env>/<timestamp>``, the same on every rank) with ``config.json``;
4. the datasets and the model.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from VRNN.aime_config import AIMEConfig
from VRNN.cli import config_from_args, default_data_dir
from VRNN.ddp_utils import DistContext, barrier, is_distributed
from VRNN.dmc_dataset import DMCVBDataset
from VRNN.hdf5_io import DataFileError, DataSplits, DiskFullError, Split, find_splits

__all__ = [
    "InputError",
    "RUN_FILE",
    "build_model",
    "canonical_env",
    "check_run_options",
    "ensure_dataset",
    "load_datasets",
    "load_eval_dataset",
    "prepare_config",
    "resolve_run_dir",
    "run_job",
    "write_config",
]

logger = logging.getLogger(__name__)

TRAIN_FILE, EVAL_FILE = "train.h5", "eval.h5"
# Beside config.json: how the run was launched (preset, data folder, budget, plot flags, command line), so
# that ``--resume --run-dir R`` alone continues it.
RUN_FILE = "run.json"


def canonical_env(name: str) -> str:
    """``cheetah_run`` / ``dmc_cheetah_run`` / ``cheetah-run`` -> ``cheetah-run`` (ValueError if unknown)."""
    from VRNN.dmc_envs import resolve_env_name

    return resolve_env_name(name).name


def prepare_config(args: argparse.Namespace) -> AIMEConfig:
    """The run's config: preset + flags, with the canonical environment name.

    A value the config refuses is a ValueError that names the flag (``--checkpoint-every 0 is invalid:
    expected a positive integer``)."""
    args.env = canonical_env(args.env)
    try:
        return config_from_args(args)
    except ValueError as exc:
        raise ValueError(_as_flag_message(str(exc))) from exc


def _as_flag_message(message: str) -> str:
    """``AIMEConfig.checkpoint_every=0 is invalid: ...`` -> ``--checkpoint-every 0 is invalid: ...``."""
    from VRNN.cli import CONFIG_FLAGS

    match = re.match(r"AIMEConfig\.(\w+)=(.+?) is invalid: (.*)$", message, re.DOTALL)
    if match:
        for flag, (name, _, _) in CONFIG_FLAGS.items():
            if name == match[1]:
                return f"{flag} {match[2]} is invalid: {match[3]}"
    return message


def check_run_options(args: argparse.Namespace) -> None:
    """The flags that are not config fields: ``InputError`` naming the bad value, before anything is written."""
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise InputError(f"--minutes {args.minutes:g} is invalid: expected a positive number of minutes "
                         "(the wall-clock budget of training)")
    if args.threads < 0:
        raise InputError(f"--threads {args.threads} is invalid: expected 0 (torch's default) or a positive count")
    if args.run_dir is not None and Path(args.run_dir).exists() and not Path(args.run_dir).is_dir():
        raise InputError(f"--run-dir {args.run_dir} is a file: expected a folder (new or a run to --resume)")
    if args.resume and not args.eval_only and args.run_dir is None:
        raise InputError("--resume needs --run-dir DIR: the run directory to continue")


def ensure_dataset(config: AIMEConfig, data_dir: Path | None, ctx: DistContext,
                   progress: bool = True) -> DataSplits:
    """``DataSplits(train, validation, test)`` of ``data_dir`` (default ``data/<env>``): the split folders
    ``train/``, ``val/``, ``test/``, or the old files ``train.h5`` and ``eval.h5`` (``eval.h5`` then serves
    as both validation and test). A split folder that is missing or unfinished (an interrupted collection)
    is collected first with the config's settings (rank 0 collects, the others wait at a barrier); only a
    missing ``val/`` beside finished ``train/`` and ``test/`` is not collected: ``test/`` then serves.

    Raises ValueError in one line when ``data_dir`` is a file or its data is damaged or was made with other
    settings, InputError when the disk fills or the folder cannot be written; a signal during collection
    exits with 128 + its number after a message (finished episodes are kept).
    """
    from VRNN.collect_dmc import CollectionInterrupted, collect_dataset, unfinished_splits

    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(config.env)
    splits = find_splits(data_dir)  # DataFileError when data_dir is a file
    if splits is not None and splits.train.is_file():
        return splits  # an old two-split dataset, used as it is
    # Only rank 0 decides and collects; every rank meets at the barrier, so that no rank can see another
    # state of the folder than rank 0 did.
    todo = unfinished_splits(data_dir, config.train_episodes, config.val_episodes, config.eval_episodes) \
        if ctx.is_main else []
    if todo == ["val"] and not (data_dir / "val").exists():
        todo = []  # finished train/ and test/ without val/ (collected with 0): the test split serves, as it is
    if todo:
        logger.info("collecting the %s split(s) of %s into %s: %d train, %d validation and %d test episodes of "
                    "%d steps, %s policy", "/".join(todo), config.env, data_dir, config.train_episodes,
                    config.val_episodes, config.eval_episodes, config.episode_length, config.policy)
        try:
            collect_dataset(config.env, data_dir, episodes=config.train_episodes,
                            eval_episodes=config.eval_episodes, episode_length=config.episode_length,
                            policy=config.policy, seed=config.seed, action_repeat=config.action_repeat,
                            progress=progress, image_size=config.image_size, val_episodes=config.val_episodes)
        except DiskFullError as err:
            raise InputError(str(err)) from err
        except CollectionInterrupted as err:
            logger.error("collection stopped by %s: finished episodes are kept in %s; run the same command "
                         "again to resume", err, data_dir)
            raise SystemExit(128 + err.signum) from None
        except OSError as err:  # e.g. a read-only or unwritable folder
            raise InputError(f"cannot collect the dataset into {data_dir}: {err}") from err
    barrier()
    splits = find_splits(data_dir)
    if splits is None:
        raise DataFileError(f"{data_dir} holds no dataset after collection (expected train/ and test/)")
    if ctx.is_main and splits.train.is_dir():
        held = len(Split(splits.train))
        if held < config.train_episodes:
            logger.warning("%s holds %d finished training episodes, fewer than the %d this config collects; "
                           "training on them as they are (collect into a new --data-dir for the full set)",
                           splits.train, held, config.train_episodes)
    return splits


def resolve_run_dir(env: str, run_dir: Path | None, ctx: DistContext) -> Path:
    """``run_dir`` or ``runs/<env>/<YYYYmmdd-HHMMSS>`` (rank 0's clock, shared with every rank)."""
    if run_dir is None:
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        if is_distributed():
            torch.distributed.broadcast_object_list(stamp, src=0)
        run_dir = Path("runs") / env / stamp[0]
    run_dir = Path(run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    return run_dir


def write_config(run_dir: Path, config: AIMEConfig, ctx: DistContext, launch: dict | None = None) -> None:
    """``<run_dir>/config.json`` and, when given, ``<run_dir>/run.json`` (``launch``), each written to a
    temporary name and renamed (rank 0)."""
    if ctx.is_main:
        _write_text_atomic(Path(run_dir) / "config.json", config.to_json() + "\n")
        if launch is not None:
            _write_text_atomic(Path(run_dir) / RUN_FILE, json.dumps(launch, indent=2, sort_keys=True) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # one fixed name (rank 0 alone writes): a kill leaves no litter
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_datasets(config: AIMEConfig, train_path: Path, validation_path: Path, test_path: Path | None = None):
    """(train, validation, test) ``DMCVBDataset`` windows in [-1, 1]: ``config.sequence_length`` frames for
    training, ``evaluation.eval_sequence_length(config)`` (T0 observed + F imagined) for the other two.

    Call it with the three paths of ``ensure_dataset`` (``load_datasets(config, *splits)``); without
    ``test_path`` (the old ``(train, eval)`` call) the second split serves as both validation and test.
    When validation and test are one split, the same dataset object is returned twice and one log line
    says so. Raises ValueError when the splits disagree on the action size or their frames are not
    ``config.image_size`` pixels.
    """
    test_path = validation_path if test_path is None else test_path
    train = DMCVBDataset(train_path, config.sequence_length, scale="float", augment=config.augment,
                         seed=config.seed)
    _check_frame_size(config, train)
    test = load_eval_dataset(config, test_path)
    if Path(validation_path) == Path(test_path):
        validation = test
        logger.info("no validation split beside %s: %s serves as both validation (best.pt) and test (the "
                    "reported evaluation); collect a val/ split to keep them apart", train_path, test_path)
    else:
        validation = load_eval_dataset(config, validation_path)
    for name, data, path in (("validation", validation, validation_path), ("test", test, test_path)):
        if train.action_dim != data.action_dim:
            raise ValueError(f"{train_path} has action size {train.action_dim} but the {name} split {path} has "
                             f"{data.action_dim}: the splits come from different environments")
    env_name = getattr(train, "env_name", None)
    if env_name and env_name != config.env:
        logger.warning("dataset %s was collected on %s but --env is %s; training on the data as it is",
                       train_path, env_name, config.env)
    return train, validation, test


def load_eval_dataset(config: AIMEConfig, eval_path: Path):
    """The held-out windows of ``eval_sequence_length(config)`` frames (a validation or test split).

    Raises ValueError when the frames are not ``config.image_size`` pixels."""
    from VRNN.evaluation import eval_sequence_length

    data = DMCVBDataset(eval_path, eval_sequence_length(config), scale="float", augment=False, seed=config.seed)
    _check_frame_size(config, data)
    return data


def _check_frame_size(config: AIMEConfig, data: DMCVBDataset) -> None:
    if data.image_size != config.image_size:
        raise ValueError(f"{data.path} holds {data.image_size}x{data.image_size} frames but the model is built for "
                         f"{config.image_size}x{config.image_size} (image_size={config.image_size}); collect the "
                         f"data at that size or use another --data-dir")


def build_model(config: AIMEConfig, action_dim: int, device: torch.device) -> torch.nn.Module:
    """``DPGMMVariationalRecurrentAutoencoder.from_config`` on ``device`` (seeded by the caller)."""
    from VRNN.dpgmm_stickbreaking_prior_vrnn import DPGMMVariationalRecurrentAutoencoder

    return DPGMMVariationalRecurrentAutoencoder.from_config(config, action_dim=action_dim).to(device)


# --------------------------------------------------------------------------------------------------
# The job both scripts run
def run_job(argv: list[str] | None, description: str, report: bool) -> int:
    """Parse flags, then train (or evaluate with ``--eval-only``); ``report`` adds plots and report.md.

    Exit codes: 0 done, or stopped cleanly by a signal / the budget / the stop file with a checkpoint to
    ``--resume`` from (a SLURM requeue resumes), also when the signal came during the final evaluation or
    report; 2 bad input (flags, data, checkpoint) or a full disk, in one line, nothing written for bad
    flags; 3 stopped by non-finite training; 128 + N when signal N stopped set-up or ``--eval-only``
    before anything could be saved.
    """
    from VRNN.cli import add_training_flags, build_parser, given_flags
    from VRNN.ddp_utils import cleanup_distributed, init_distributed
    from VRNN.stop_control import StopRequested, raise_on_stop_signals
    from VRNN.vrnn_utilities import setup_logging

    parser = build_parser(description, argv)
    add_training_flags(parser)
    args = parser.parse_args(argv)
    args.command = [_script_name(), *(sys.argv[1:] if argv is None else argv)]  # recorded in run.json
    try:
        check_run_options(args)
    except InputError as exc:
        setup_logging()
        logger.error("%s", exc)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    setup_logging(rank=ctx.rank)
    try:
        # Outside the training loop a stop signal raises StopRequested: a message, never a silent death.
        with raise_on_stop_signals():
            if args.eval_only:
                try:
                    return _eval_only(parser, args, ctx, report)
                except _INPUT_ERRORS as exc:
                    raise InputError(str(exc)) from exc
            return _train(args, ctx, report, given_flags(parser, argv))
    except InputError as exc:
        logger.error("%s", exc)
        return 2
    except StopRequested as stop:
        what = "--eval-only" if args.eval_only else "the set-up, before any training step"
        logger.warning("%s during %s: stopped; nothing of this session is saved", stop.signal_name, what)
        return 128 + int(signal.Signals[stop.signal_name])
    except OSError as exc:
        if not _disk_full(exc):
            raise
        logger.error("the disk is full (%s); free some space and run the same command again", exc)
        return 2
    finally:
        cleanup_distributed()


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class InputError(Exception):
    """Bad flags, data or checkpoint found while setting a run up (exit code 2, no traceback)."""


# CheckpointError and DataFileError are ValueErrors. Errors raised once training runs are not caught:
# they are bugs and keep their traceback.
_INPUT_ERRORS = (ValueError, FileNotFoundError)


def _train(args: argparse.Namespace, ctx: DistContext, report: bool, given: dict[str, str] | None = None) -> int:
    """Set up, train, evaluate and (``report``) write the plots and report.md; the exit code."""
    from VRNN.dmc_vb_transition_dynamics_trainer import NonFiniteTrainingError
    from VRNN.fault_points import fault_point
    from VRNN.stop_control import StopRequested
    from VRNN.training_checkpoints import CheckpointWriteError

    try:
        trainer, run_dir, eval_data, config = _setup_training(args, ctx, given or {})
    except _INPUT_ERRORS as exc:
        raise InputError(str(exc)) from exc
    again = f"python {_script_name()} --resume --run-dir {run_dir}"
    try:
        result = trainer.train()
    except NonFiniteTrainingError as exc:
        logger.error("%s", exc)
        return 3
    except StopRequested as stop:
        # The loop handles signals itself; this one came after it (final evaluation) or just before it.
        logger.warning("%s at step %d, during %s: stopped, no eval.json or report this time; the last complete "
                       "checkpoint is %s. Finish with: %s", stop.signal_name, trainer.step,
                       stop.phase or "the start of training", trainer.last_checkpoint or "(none yet)", again)
        return 0
    except OSError as exc:
        if not (_disk_full(exc) or isinstance(exc, CheckpointWriteError)):
            raise
        what = exc.strerror if isinstance(exc, CheckpointWriteError) else (
            f"the disk is full ({exc}); the last complete checkpoint {trainer.last_checkpoint} is intact")
        logger.error("%s. Free some space (or fix the folder's permissions), then continue with: %s", what, again)
        return 2
    if result.interrupted:
        logger.info("stopped by %s at step %d; checkpoint %s. Resume with: %s",
                    result.reason, result.step, result.checkpoint, again)
        return 0
    if report and ctx.is_main:
        try:
            fault_point("report", result.step)
            _write_outputs(run_dir, trainer.ema.module, eval_data, config, result.evaluation or {})
        except (StopRequested, OSError) as exc:
            if isinstance(exc, OSError) and not _disk_full(exc):
                raise
            stopped = isinstance(exc, StopRequested)
            why = f"{exc.signal_name} received" if stopped else f"the disk is full ({exc})"
            say = logger.warning if stopped else logger.error
            say("%s while drawing the plots and report.md: stopped; eval.json and checkpoint %s are complete. "
                "Redo the evaluation and report with: python VRNN/main.py --eval-only --load-checkpoint %s "
                "--data-dir %s --run-dir %s", why, result.checkpoint, Path(run_dir) / "checkpoints" / "latest.pt",
                args.data_dir if args.data_dir is not None else default_data_dir(config.env), run_dir)
            return 0 if stopped else 2
    if ctx.is_main:
        logger.info("run directory: %s", run_dir)
    return 0


def _script_name() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return f"VRNN/{name}" if name in ("main.py", "training_vrnn.py") else "VRNN/main.py"


@dataclass
class _Resume:
    """What ``--resume`` continues: the run's config (with the changes allowed), its newest intact
    checkpoint (``None``: killed before the first one), and its dataset folder."""

    config: AIMEConfig
    checkpoint: Path | None
    data_dir: Path | None


def _read_launch(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        launch = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("%s does not read (%s): using the flags given for the preset, data dir and budget", path, exc)
        return {}
    return launch if isinstance(launch, dict) else {}


def _resume_state(args: argparse.Namespace, given: dict[str, str]) -> _Resume | None:
    """The run in ``args.run_dir`` to continue, or ``None`` when it holds neither a checkpoint nor a
    config.json (a new run). Only reads files. ``InputError`` lists every flag that differs from the
    run's own value and may not (``cli.RESUME_CHANGEABLE``); the launch options the flags do not give
    (data dir, budget, plot flags) are taken from run.json into ``args``."""
    from VRNN.cli import CONFIG_FLAGS, RESUME_CHANGEABLE, set_overrides
    from VRNN.training_checkpoints import find_resumable, require_training_state
    from VRNN.vrnn_utilities import CheckpointError

    run_dir = Path(args.run_dir)
    found = find_resumable(run_dir / "checkpoints")
    if found is not None:
        checkpoint, payload = found
        if "config" not in payload:
            raise CheckpointError(f"{checkpoint} holds no config: it was not written by DMCVBTrainer")
        require_training_state(payload, checkpoint)
        saved, source = AIMEConfig.from_dict(payload["config"]), "checkpoint"
    elif (run_dir / "config.json").is_file():
        checkpoint, saved, source = None, AIMEConfig.from_json(run_dir / "config.json"), "config.json"
    else:
        return None
    launch = _read_launch(run_dir)
    config_names = {name for name, _, _ in CONFIG_FLAGS.values()}
    differing, changes = [], {}
    for dest, flag in given.items():
        if dest == "set":  # each --set field must equal the run's own value
            for name, ours in set_overrides(args).items():
                if ours != getattr(saved, name):
                    differing.append(f"{name}: {source} {getattr(saved, name)!r}, this run {ours!r}")
            continue
        if dest in config_names or dest == "amp":
            ours, theirs = getattr(args, dest), getattr(saved, dest)
        elif dest == "env":
            ours, theirs = canonical_env(args.env), saved.env
        elif dest == "preset" and launch.get("preset"):
            ours, theirs = args.preset, launch["preset"]
        else:
            continue  # run options: --run-dir, --resume and those of RESUME_CHANGEABLE
        if ours == theirs:
            continue
        if flag in RESUME_CHANGEABLE:
            changes[dest] = ours
        else:
            differing.append(f"{dest}: {source} {theirs!r}, this run {ours!r}")
    if differing:
        warm = f" (--load-checkpoint {checkpoint} warm-starts it from these weights)" if checkpoint else ""
        raise InputError(f"--resume --run-dir {run_dir}: flags differ from the run's own values; differing fields: "
                         + "; ".join(differing) + ". Drop them to continue the run as it was (only "
                         + ", ".join(RESUME_CHANGEABLE) + " may change on resume), or start a new run in "
                         f"another --run-dir{warm}.")
    if changes:
        logger.info("--resume: changing %s", ", ".join(f"{k} to {v!r}" for k, v in sorted(changes.items())))
    data_dir = Path(launch["data_dir"]) if launch.get("data_dir") else None
    if "data_dir" in given:
        if data_dir is not None and Path(args.data_dir).resolve() != data_dir.resolve():
            logger.warning("--data-dir %s differs from the run's own %s: training continues on %s",
                           args.data_dir, data_dir, args.data_dir)
        data_dir = Path(args.data_dir)
    args.data_dir = data_dir
    if "preset" not in given:
        args.preset = launch.get("preset")  # None: a run from before run.json; its preset is unknown
    for name in ("minutes", "tensorboard", "visualize_attention", "save_visualizations"):
        if name not in given and name in launch:
            setattr(args, name, launch[name])
    if checkpoint is None:
        logger.info("--resume: %s has config.json but no checkpoint yet; starting its run from step 0", run_dir)
    return _Resume(saved.replace(**changes), checkpoint, data_dir)


def _launch_record(args: argparse.Namespace, config: AIMEConfig) -> dict:
    """What run.json keeps of this launch (``--resume`` reads it back)."""
    data_dir = Path(args.data_dir) if args.data_dir is not None else default_data_dir(config.env)
    return {"preset": args.preset, "data_dir": str(data_dir.resolve()), "minutes": args.minutes,
            "tensorboard": bool(args.tensorboard), "visualize_attention": bool(args.visualize_attention),
            "save_visualizations": bool(args.save_visualizations),
            "command": list(getattr(args, "command", [_script_name(), *sys.argv[1:]]))}


def _setup_training(args: argparse.Namespace, ctx: DistContext, given: dict[str, str] | None = None):
    """(trainer, run_dir, eval dataset, config), resumed or warm-started as the flags say.

    With ``--resume`` the run's own config and launch options are read first (nothing is collected for
    another environment); bad flags fail before anything is written."""
    from VRNN.dmc_vb_transition_dynamics_trainer import DMCVBTrainer
    from VRNN.training_checkpoints import remove_temporary_files
    from VRNN.vrnn_utilities import seed_everything

    resume = _resume_state(args, given or {}) if args.resume else None
    if resume is None:
        if args.resume:
            logger.info("--resume: %s holds no run yet; starting a new one from step 0", args.run_dir)
        config = prepare_config(args)
    else:
        config = resume.config
        args.env = config.env
    if config.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch and must divide by the "
                         f"number of processes ({ctx.world_size})")
    splits = ensure_dataset(config, args.data_dir, ctx)
    train_data, validation_data, eval_data = load_datasets(config, *splits)  # eval_data: the test split
    config = config.replace(action_dim=train_data.action_dim)
    run_dir = resolve_run_dir(config.env, args.run_dir, ctx)
    if ctx.is_main:
        remove_temporary_files(run_dir / "checkpoints")
    seed_everything(config.seed)
    model = build_model(config, train_data.action_dim, ctx.device)
    trainer = DMCVBTrainer(model, train_data, validation_data, config, run_dir, device=ctx.device, dist=ctx,
                           tensorboard=args.tensorboard, minutes=args.minutes, stop_file=args.stop_file,
                           visualize_attention=args.visualize_attention,
                           save_visualizations=args.save_visualizations, test_data=eval_data)
    if resume is not None and resume.checkpoint is not None:
        if args.load_checkpoint is not None:
            logger.warning("--load-checkpoint %s ignored: the run continues from its own checkpoint %s",
                           args.load_checkpoint, resume.checkpoint)
        trainer.load_checkpoint(resume.checkpoint)
        if trainer.step >= config.max_steps:
            logger.info("the run already reached max_steps=%d: redoing its final evaluation", config.max_steps)
    elif args.load_checkpoint is not None:
        trainer.load_checkpoint(args.load_checkpoint, training_state=False)
    write_config(run_dir, config, ctx, launch=_launch_record(args, config))
    return trainer, run_dir, eval_data, config


def _eval_only(parser: argparse.ArgumentParser, args: argparse.Namespace, ctx: DistContext, report: bool) -> int:
    """Evaluate a checkpoint's EMA weights (its live ones when it has no EMA) with the checkpoint's own config
    on the test split (eval.json in --run-dir), with the mean training frame of the checkpoint's run
    (``mean_frame.npy`` beside its ``checkpoints/``; computed from the training split when missing)."""
    from VRNN.cli import explicit_config_flags
    from VRNN.dmc_vb_transition_dynamics_trainer import write_json_atomic
    from VRNN.dpgmm_stickbreaking_prior_vrnn import DPGMMVariationalRecurrentAutoencoder
    from VRNN.evaluation import MEAN_FRAME_FILE, evaluate, load_or_compute_mean_frame, training_window_summary
    from VRNN.training_checkpoints import RUN_ONLY_FIELDS
    from VRNN.vrnn_utilities import CheckpointError, load_checkpoint

    if args.load_checkpoint is None:
        raise ValueError("--eval-only needs --load-checkpoint PATH")
    payload = load_checkpoint(args.load_checkpoint)
    if "config" not in payload:
        raise CheckpointError(f"checkpoint {args.load_checkpoint} holds no config")
    config = AIMEConfig.from_dict(payload["config"])
    clash = {k: (getattr(config, k), v) for k, v in explicit_config_flags(parser, args).items()
             if k not in RUN_ONLY_FIELDS and getattr(config, k) != v}
    if clash:
        raise CheckpointError("checkpoint " + str(args.load_checkpoint) + " was trained with other values of "
                              + ", ".join(f"{k} (checkpoint {a!r}, flag {b!r})" for k, (a, b) in sorted(clash.items())))
    splits = ensure_dataset(config, args.data_dir, ctx)  # every rank: it may wait on a barrier
    eval_path = splits.test
    if not ctx.is_main:
        return 0
    eval_data = load_eval_dataset(config, eval_path)
    if eval_data.action_dim != int(payload.get("action_dim", config.action_dim)):
        raise CheckpointError(f"checkpoint {args.load_checkpoint} takes actions of size "
                              f"{payload.get('action_dim')} but {eval_path} has {eval_data.action_dim}")
    run_dir = args.run_dir if args.run_dir is not None else Path(args.load_checkpoint).resolve().parent.parent / "eval_only"
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The EMA weights when the checkpoint has them (from_checkpoint's default), else the live ones.
    model = DPGMMVariationalRecurrentAutoencoder.from_checkpoint(args.load_checkpoint, map_location=ctx.device)
    model.to(ctx.device).eval()
    source_run = Path(args.load_checkpoint).resolve().parent.parent
    mean_path = source_run / MEAN_FRAME_FILE if (source_run / MEAN_FRAME_FILE).is_file() else run_dir / MEAN_FRAME_FILE
    mean_frame = load_or_compute_mean_frame(
        mean_path, None if mean_path.is_file() else DMCVBDataset(splits.train, config.sequence_length, scale="float"))
    # Passed as ``ema`` so that eval.json reads exactly as the training run's (which evaluates the EMA).
    result = {"step": int(payload.get("step", 0)),
              **evaluate(model, eval_data, config, device=ctx.device,
                         ema=model if payload.get("ema") is not None else None, mean_frame=mean_frame, split="test")}
    try:  # the same protocol on training windows: learned or memorised (docs/EVALUATION.md)
        train_windows = load_eval_dataset(config, splits.train)
    except ValueError as exc:
        logger.info("no evaluation on training windows: %s", exc)
        train_windows = None
    if train_windows is not None:
        train = {"step": result["step"],
                 **evaluate(model, train_windows, config, device=ctx.device,
                            ema=model if payload.get("ema") is not None else None, mean_frame=mean_frame,
                            split="train")}
        write_json_atomic(run_dir / "eval_train.json", train)
        result["training_windows"] = training_window_summary(train, result)
    write_json_atomic(run_dir / "eval.json", result)
    if report or args.visualize_attention or args.save_visualizations:
        _write_outputs(run_dir, model, eval_data, config, result)
    logger.info("evaluation written to %s", run_dir / "eval.json")
    return 0


def _write_outputs(run_dir: Path, model, eval_data, config: AIMEConfig, evaluation: dict) -> None:
    """All plots and report.md of a finished run (rank 0), on ``eval_data``, the test split.

    ``evaluation`` is the run's final test evaluation; when it is not one (training ended while the last
    periodic validation evaluation ran, so no final one followed) the test split is evaluated here with
    ``model`` (the EMA weights) and ``eval.json`` written."""
    from VRNN.dmc_vb_transition_dynamics_trainer import make_plots, write_json_atomic
    from VRNN.evaluation import MEAN_FRAME_FILE, evaluate, load_or_compute_mean_frame, write_report

    run_dir = Path(run_dir)
    if evaluation.get("split") != "test":
        logger.info("the last evaluation was on the %s split: evaluating the test split for eval.json and the report",
                    evaluation.get("split") or "(none)")
        mean_frame = load_or_compute_mean_frame(run_dir / MEAN_FRAME_FILE)   # written by the trainer's evaluation
        evaluation = {"step": evaluation.get("step"),
                      **evaluate(model, eval_data, config, ema=model, mean_frame=mean_frame, split="test")}
        write_json_atomic(run_dir / "eval.json", evaluation)
    plots = make_plots(model, eval_data, config, run_dir / "plots", evaluation, run_dir / "metrics.jsonl")
    report = write_report(run_dir, evaluation, plots, config)
    logger.info("report written to %s", report)
