"""What ``VRNN/main.py`` and ``VRNN/training_vrnn.py`` share: from parsed flags to a ready run.

1. the environment name in any spelling -> its canonical ``domain-task`` name;
2. the dataset folder (default ``data/<env>``), collected on rank 0 when ``train.h5`` / ``eval.h5`` are
   missing (the other ranks wait);
3. the run directory (default ``runs/<env>/<timestamp>``, the same on every rank) with ``config.json``;
4. the datasets and the model.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from VRNN.aime_config import AIMEConfig
from VRNN.cli import config_from_args, default_data_dir
from VRNN.ddp_utils import DistContext, barrier, is_distributed
from VRNN.dmc_dataset import DMCVBDataset
from VRNN.hdf5_io import DataFileError, DataSplits, DiskFullError, find_splits

__all__ = [
    "InputError",
    "build_model",
    "canonical_env",
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


def canonical_env(name: str) -> str:
    """``cheetah_run`` / ``dmc_cheetah_run`` / ``cheetah-run`` -> ``cheetah-run`` (ValueError if unknown)."""
    from VRNN.dmc_envs import resolve_env_name

    return resolve_env_name(name).name


def prepare_config(args: argparse.Namespace) -> AIMEConfig:
    """The run's config: preset + flags, with the canonical environment name."""
    args.env = canonical_env(args.env)
    return config_from_args(args)


def ensure_dataset(config: AIMEConfig, data_dir: Path | None, ctx: DistContext,
                   progress: bool = True) -> DataSplits:
    """``DataSplits(train, validation, test)`` of ``data_dir`` (default ``data/<env>``): the split folders
    ``train/``, ``val/``, ``test/``, or the old files ``train.h5`` and ``eval.h5`` (``eval.h5`` then serves
    as both validation and test). A split folder that is missing or unfinished (an interrupted collection)
    is collected first with the config's settings (rank 0 collects, the others wait at a barrier).

    Raises ValueError in one line when ``data_dir`` is a file or its data is damaged or was made with other
    settings, InputError when the disk fills; a signal during collection exits with 128 + its number
    after a message (finished episodes are kept).
    """
    from VRNN.collect_dmc import CollectionInterrupted, collect_dataset, unfinished_splits

    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(config.env)
    splits = find_splits(data_dir)  # DataFileError when data_dir is a file
    if splits is not None and splits.train.is_file():
        return splits  # an old two-split dataset, used as it is
    todo = unfinished_splits(data_dir, config.train_episodes, config.val_episodes, config.eval_episodes)
    if todo:
        if ctx.is_main:
            logger.info("collecting the %s split(s) of %s into %s: %d train, %d validation and %d test episodes of "
                        "%d steps, %s policy", "/".join(todo), config.env, data_dir, config.train_episodes,
                        config.val_episodes, config.eval_episodes, config.episode_length, config.policy)
            try:
                collect_dataset(config.env, data_dir, episodes=config.train_episodes,
                                eval_episodes=config.eval_episodes, episode_length=config.episode_length,
                                policy=config.policy, seed=config.seed, action_repeat=config.action_repeat,
                                progress=progress, image_size=config.image_size,
                                val_episodes=config.val_episodes)
            except DiskFullError as err:
                raise InputError(str(err)) from err
            except CollectionInterrupted as err:
                logger.error("collection stopped by %s: finished episodes are kept in %s; run the same command "
                             "again to resume", err, data_dir)
                raise SystemExit(128 + err.signum) from None
        barrier()
    splits = find_splits(data_dir)
    if splits is None:
        raise DataFileError(f"{data_dir} holds no dataset after collection (expected train/ and test/)")
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


def write_config(run_dir: Path, config: AIMEConfig, ctx: DistContext) -> None:
    """``<run_dir>/config.json`` (rank 0)."""
    if ctx.is_main:
        config.to_json(Path(run_dir) / "config.json")


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

    Exit codes: 0 done or stopped cleanly by a signal / budget / stop file (a SLURM requeue resumes),
    2 bad input, 3 stopped by non-finite training.
    """
    from VRNN.cli import add_training_flags, build_parser
    from VRNN.ddp_utils import cleanup_distributed, init_distributed
    from VRNN.vrnn_utilities import setup_logging

    parser = build_parser(description, argv)
    add_training_flags(parser)
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads {args.threads} is invalid: expected 0 (torch's default) or a positive count")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    setup_logging(rank=ctx.rank)
    try:
        if args.eval_only:
            try:
                return _eval_only(parser, args, ctx, report)
            except _INPUT_ERRORS as exc:
                raise InputError(str(exc)) from exc
        return _train(args, ctx, report)
    except InputError as exc:
        logger.error("%s", exc)
        return 2
    finally:
        cleanup_distributed()


class InputError(Exception):
    """Bad flags, data or checkpoint found while setting a run up (exit code 2, no traceback)."""


# CheckpointError and DataFileError are ValueErrors. Errors raised once training runs are not caught:
# they are bugs and keep their traceback.
_INPUT_ERRORS = (ValueError, FileNotFoundError)


def _train(args: argparse.Namespace, ctx: DistContext, report: bool) -> int:
    from VRNN.dmc_vb_transition_dynamics_trainer import NonFiniteTrainingError

    try:
        trainer, run_dir, eval_data, config = _setup_training(args, ctx)
    except _INPUT_ERRORS as exc:
        raise InputError(str(exc)) from exc
    try:
        result = trainer.train()
    except NonFiniteTrainingError as exc:
        logger.error("%s", exc)
        return 3
    if result.interrupted:
        logger.info("stopped by %s at step %d; checkpoint %s. Resume with --resume --run-dir %s",
                    result.reason, result.step, result.checkpoint, run_dir)
        return 0
    if report and ctx.is_main:
        _write_outputs(run_dir, trainer.ema.module, eval_data, config, result.evaluation or {})
    if ctx.is_main:
        logger.info("run directory: %s", run_dir)
    return 0


def _setup_training(args: argparse.Namespace, ctx: DistContext):
    """(trainer, run_dir, eval dataset, config), resumed or warm-started as the flags say."""
    from VRNN.dmc_vb_transition_dynamics_trainer import DMCVBTrainer
    from VRNN.training_checkpoints import find_latest
    from VRNN.vrnn_utilities import seed_everything

    config = prepare_config(args)
    if config.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch and must divide by the "
                         f"number of processes ({ctx.world_size})")
    splits = ensure_dataset(config, args.data_dir, ctx)
    train_data, validation_data, eval_data = load_datasets(config, *splits)  # eval_data: the test split
    config = config.replace(action_dim=train_data.action_dim)
    run_dir = resolve_run_dir(config.env, args.run_dir, ctx)
    resume_path = find_latest(run_dir / "checkpoints") if args.resume else None
    if args.resume and resume_path is None:
        logger.info("--resume: no checkpoint in %s yet; starting from step 0", run_dir / "checkpoints")
    seed_everything(config.seed)
    model = build_model(config, train_data.action_dim, ctx.device)
    trainer = DMCVBTrainer(model, train_data, validation_data, config, run_dir, device=ctx.device, dist=ctx,
                           tensorboard=args.tensorboard, minutes=args.minutes, stop_file=args.stop_file,
                           visualize_attention=args.visualize_attention,
                           save_visualizations=args.save_visualizations, test_data=eval_data)
    if resume_path is not None:
        trainer.load_checkpoint(resume_path)
    elif args.load_checkpoint is not None:
        trainer.load_checkpoint(args.load_checkpoint, training_state=False)
    write_config(run_dir, config, ctx)
    return trainer, run_dir, eval_data, config


def _eval_only(parser: argparse.ArgumentParser, args: argparse.Namespace, ctx: DistContext, report: bool) -> int:
    """Evaluate a checkpoint's EMA weights (its live ones when it has no EMA) with the checkpoint's own config
    on the test split (eval.json in --run-dir), with the mean training frame of the checkpoint's run
    (``mean_frame.npy`` beside its ``checkpoints/``; computed from the training split when missing)."""
    from VRNN.cli import explicit_config_flags
    from VRNN.dmc_vb_transition_dynamics_trainer import write_json_atomic
    from VRNN.dpgmm_stickbreaking_prior_vrnn import DPGMMVariationalRecurrentAutoencoder
    from VRNN.evaluation import MEAN_FRAME_FILE, evaluate, load_or_compute_mean_frame
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
