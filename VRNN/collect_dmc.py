"""Collect DMC pixel episodes with a behaviour policy into train.h5 / eval.h5 (format: VRNN/hdf5_io.py).

    python VRNN/collect_dmc.py --env walker-walk --episodes 50 --eval-episodes 10 --episode-length 500 \
        --policy ou --seed 0 --out data/walker-walk
    python VRNN/collect_dmc.py verify data/walker-walk/train.h5

Episode ``i`` of the train split uses seed ``seed * 100000 + i``; the eval split uses
``2**31 + seed * 100000 + i``: the two ranges never meet, and the seeds are stored in the files. The
environment's initial state and the policy's randomness both come from the episode seed, so an episode
is reproducible on its own. Re-running on a complete file skips it; on a shorter file (an interrupted
run, or more ``--episodes``) it appends the missing episodes; ``--overwrite`` starts afresh.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from VRNN.aime_config import AIMEConfig
from VRNN.dmc_envs import DMCEnv, resolve_env_name
from VRNN.hdf5_io import DataFileError, EpisodeWriter, list_episodes, open_checked, summary, verify
from VRNN.policies import POLICIES, make_policy

__all__ = ["collect_dataset", "collect_episode", "collect_split", "main", "split_seeds"]

logger = logging.getLogger(__name__)

SEEDS_PER_RUN = 100_000            # episodes per split and run seed before seed ranges would overlap
EVAL_SEED_OFFSET = 2 ** 31         # eval seeds live in [2^31, 2^32): dm_control seeds must be < 2^32
MAX_SEED = EVAL_SEED_OFFSET // SEEDS_PER_RUN


def split_seeds(seed: int, count: int, split: str) -> list[int]:
    """Per-episode seeds of a split ("train" or "eval"); train and eval ranges are disjoint."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}), got {seed}")
    if not 0 <= count <= SEEDS_PER_RUN:
        raise ValueError(f"episode count must be in [0, {SEEDS_PER_RUN}], got {count}")
    base = seed * SEEDS_PER_RUN + (EVAL_SEED_OFFSET if split == "eval" else 0)
    return [base + i for i in range(count)]


def collect_episode(env: DMCEnv, policy_name: str, seed: int, bar: tqdm | None = None) -> dict[str, np.ndarray]:
    """Run one episode and return its rows (RLDS convention, L agent steps -> N = L + 1 rows):
    obs uint8 [N,S,S,3], action float32 [N,A] (last row zeros), reward float32 [N] (last row 0),
    is_first / is_last / is_terminal bool [N]."""
    policy = make_policy(policy_name, env.action_spec, np.random.default_rng(seed))
    policy.reset()
    frames = [env.reset(seed=seed)]
    actions, rewards = [], []
    terminal = False
    while True:
        action = policy.act(frames[-1])
        obs, reward, is_last, terminal = env.step(action)
        actions.append(action)
        rewards.append(reward)
        frames.append(obs)
        if bar is not None:
            bar.update(1)
        if is_last:
            break
    n = len(frames)
    flags_first = np.zeros(n, dtype=bool)
    flags_first[0] = True
    flags_last = np.zeros(n, dtype=bool)
    flags_last[-1] = True
    flags_terminal = np.zeros(n, dtype=bool)
    flags_terminal[-1] = terminal
    return {
        "obs": np.stack(frames),
        "action": np.concatenate([np.stack(actions), np.zeros((1, env.action_dim), np.float32)]).astype(np.float32),
        "reward": np.asarray(rewards + [0.0], dtype=np.float32),
        "is_first": flags_first, "is_last": flags_last, "is_terminal": flags_terminal,
    }


def collect_split(path: str | Path, env_name: str, seeds: Sequence[int], episode_length: int, policy: str,
                  action_repeat: int = 2, image_size: int = 64, progress: bool = True,
                  overwrite: bool = False, desc: str = "") -> Path:
    """Write the episodes of ``seeds`` to ``path``, resuming a shorter file with the same settings.

    Raises ValueError when an existing file was written with other settings or other seeds (unless
    ``overwrite``), so data is never destroyed silently.
    """
    path = Path(path)
    spec = resolve_env_name(env_name)
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {sorted(POLICIES)}")
    if overwrite and path.exists():
        logger.info("overwriting %s", path)
        path.unlink()
    if path.exists() and not _readable(path):
        raise ValueError(f"{path} exists but is not a readable data file; pass --overwrite to replace it")
    env = DMCEnv(spec, seed=int(seeds[0]) if seeds else 0, episode_length=episode_length,
                 action_repeat=action_repeat, image_size=image_size)
    attrs = {"env": spec.name, "camera": spec.camera, "action_repeat": int(action_repeat), "policy": policy,
             "image_size": int(image_size), "action_dim": env.action_dim, "episode_length": int(episode_length)}
    try:
        with EpisodeWriter(path, attrs) as writer:
            done = writer.seeds
            common = min(len(done), len(seeds))
            if done[:common] != list(seeds[:common]):
                raise ValueError(f"{path} holds episodes with seeds {done[:3]}..., not the requested "
                                 f"{list(seeds[:3])}...; use another --out or --overwrite")
            todo = list(seeds[len(done):])
            if not todo:
                logger.info("%s already holds %d episodes (%d requested); skipping", path, len(done), len(seeds))
                return path
            if done:
                logger.info("%s holds %d of %d episodes; appending the rest", path, len(done), len(seeds))
            with tqdm(total=len(todo) * episode_length, desc=desc or path.name, unit="step",
                      disable=None if progress else True, leave=False) as bar:
                for episode_seed in todo:
                    writer.write_episode(collect_episode(env, policy, episode_seed, bar), seed=episode_seed)
    finally:
        env.close()
    return path


def _readable(path: Path) -> bool:
    try:
        with open_checked(path) as f:
            list_episodes(f)
        return True
    except DataFileError:
        return False


def collect_dataset(env: str, out_dir: str | Path, episodes: int, eval_episodes: int, episode_length: int,
                    policy: str, seed: int, action_repeat: int = 2, progress: bool = True,
                    overwrite: bool = False, image_size: int = 64) -> tuple[Path, Path]:
    """Collect ``episodes`` train and ``eval_episodes`` eval episodes of ``episode_length`` agent steps
    into ``out_dir/train.h5`` and ``out_dir/eval.h5``; returns the two paths."""
    if episodes < 1 or eval_episodes < 1:
        raise ValueError(f"need at least one train and one eval episode, got {episodes} and {eval_episodes}")
    out_dir = Path(out_dir)
    paths = []
    for split, count in (("train", episodes), ("eval", eval_episodes)):
        paths.append(collect_split(out_dir / f"{split}.h5", env, split_seeds(seed, count, split), episode_length,
                                   policy, action_repeat, image_size, progress, overwrite, desc=split))
    return paths[0], paths[1]


def _collect_parser() -> argparse.ArgumentParser:
    base = AIMEConfig()
    parser = argparse.ArgumentParser(
        description="Collect DMC pixel episodes into <out>/train.h5 and <out>/eval.h5. "
                    "Subcommand: 'verify FILE' checks a data file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--env", default=base.env, help="DMC task, any spelling: cheetah-run, cheetah_run, dmc_cheetah_run")
    parser.add_argument("--episodes", type=int, default=base.train_episodes, help="train episodes")
    parser.add_argument("--eval-episodes", type=int, default=base.eval_episodes, help="held-out episodes (disjoint seeds)")
    parser.add_argument("--episode-length", type=int, default=base.episode_length, help="agent steps per episode")
    parser.add_argument("--policy", default=base.policy, choices=sorted(POLICIES), help="behaviour policy")
    parser.add_argument("--seed", type=int, default=base.seed, help=f"run seed in [0, {MAX_SEED}); episode seeds derive from it")
    parser.add_argument("--action-repeat", type=int, default=base.action_repeat, help="physics steps per agent step")
    parser.add_argument("--image-size", type=int, default=base.image_size, help="frame height and width in pixels")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: data/<env>)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files instead of resuming them")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _verify_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="collect_dmc.py verify", description="Check a data file.")
    parser.add_argument("file", type=Path, help="an HDF5 data file (train.h5 / eval.h5)")
    args = parser.parse_args(argv)
    problems = verify(args.file)
    if problems:
        print(f"{args.file}: {len(problems)} problem(s)")
        for line in problems:
            print(f"  - {line}")
        return 1
    info = summary(args.file)
    print(f"{args.file}: OK  env={info['env']} policy={info['policy']} episodes={info['episodes']} "
          f"steps={info['steps']} rows={info['rows']} action_dim={info['action_dim']} "
          f"image_size={info['image_size']} action_repeat={info['action_repeat']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        return _verify_main(argv[1:])
    args = _collect_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("OpenGL").setLevel(logging.WARNING)
    try:
        name = resolve_env_name(args.env).name
        out = args.out if args.out is not None else Path("data") / name
        train, held_out = collect_dataset(name, out, args.episodes, args.eval_episodes, args.episode_length,
                                          args.policy, args.seed, args.action_repeat, not args.quiet,
                                          args.overwrite, args.image_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished episodes are kept; run the same command again to resume", file=sys.stderr)
        return 130
    for path in (train, held_out):
        info = summary(path)
        print(f"{path}: {info['episodes']} episodes, {info['steps']} steps, action_dim={info['action_dim']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
