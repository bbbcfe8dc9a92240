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
from typing import Optional

import torch

from VRNN.aime_config import AIMEConfig
from VRNN.cli import config_from_args, default_data_dir
from VRNN.ddp_utils import DistContext, barrier, is_distributed

__all__ = ["canonical_env", "ensure_dataset", "resolve_run_dir", "write_config", "load_datasets",
           "build_model", "prepare_config"]

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


def ensure_dataset(config: AIMEConfig, data_dir: Optional[Path], ctx: DistContext,
                   progress: bool = True) -> tuple[Path, Path]:
    """Paths of ``train.h5`` and ``eval.h5`` in ``data_dir`` (default ``data/<env>``), collecting them first
    when either is missing (rank 0 collects, the others wait at a barrier)."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(config.env)
    train_path, eval_path = data_dir / TRAIN_FILE, data_dir / EVAL_FILE
    if not (train_path.is_file() and eval_path.is_file()):
        if ctx.is_main:
            from VRNN.collect_dmc import collect_dataset

            logger.info("no dataset in %s: collecting %d train and %d eval episodes of %s (%d steps, %s policy)",
                        data_dir, config.train_episodes, config.eval_episodes, config.env,
                        config.episode_length, config.policy)
            collect_dataset(config.env, data_dir, episodes=config.train_episodes,
                            eval_episodes=config.eval_episodes, episode_length=config.episode_length,
                            policy=config.policy, seed=config.seed, action_repeat=config.action_repeat,
                            progress=progress, image_size=config.image_size)
        barrier()
    return train_path, eval_path


def resolve_run_dir(env: str, run_dir: Optional[Path], ctx: DistContext) -> Path:
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


def load_datasets(config: AIMEConfig, train_path: Path, eval_path: Path):
    """(train, eval) ``DMCVBDataset`` windows of ``config.sequence_length`` frames in [-1, 1].

    Raises ValueError when the two files hold different environments or action sizes.
    """
    from VRNN.dmc_dataset import DMCVBDataset

    train = DMCVBDataset(train_path, config.sequence_length, scale="float", augment=config.augment,
                         seed=config.seed)
    evaluation = DMCVBDataset(eval_path, config.sequence_length, scale="float", augment=False, seed=config.seed)
    if train.action_dim != evaluation.action_dim:
        raise ValueError(f"{train_path} has action size {train.action_dim} but {eval_path} has "
                         f"{evaluation.action_dim}: the two splits come from different environments")
    env_name = getattr(train, "env_name", None)
    if env_name and env_name != config.env:
        logger.warning("dataset %s was collected on %s but --env is %s; training on the data as it is",
                       train_path, env_name, config.env)
    return train, evaluation


def build_model(config: AIMEConfig, action_dim: int, device: torch.device) -> torch.nn.Module:
    """``DPGMMVariationalRecurrentAutoencoder.from_config`` on ``device`` (seeded by the caller)."""
    from VRNN.dpgmm_stickbreaking_prior_vrnn import DPGMMVariationalRecurrentAutoencoder

    return DPGMMVariationalRecurrentAutoencoder.from_config(config, action_dim=action_dim).to(device)
