"""Collect DMC pixel episodes with a behaviour policy into three split folders (format: VRNN/hdf5_io.py).

    python VRNN/collect_dmc.py --env walker-walk --episodes 50 --val-episodes 5 --eval-episodes 10 \
        --episode-length 500 --policy ou --seed 0 --out data/walker-walk
    python VRNN/collect_dmc.py verify data/walker-walk            # or a split folder, or an old .h5 file
    python VRNN/collect_dmc.py repair data/walker-walk/train      # move damaged episodes aside
    python VRNN/collect_dmc.py convert data/old/train.h5 data/old/train   # old single-file split -> folder

``<out>/train``, ``<out>/val`` and ``<out>/test`` hold one file per episode. Episode ``i`` of the train
split uses seed ``seed * 100000 + i``; the test split ``2**31 + seed * 100000 + i``; the validation split
``2**31 + seed * 100000 + 50000 + i``: the three ranges never meet, and each file stores its seed. The
environment's initial state and the policy's randomness both come from the episode seed, so an episode
is reproducible on its own, and an episode's index fixes its seed: re-running resumes by collecting the
missing indices, never an episode twice. ``--overwrite`` starts afresh.

SIGINT (Ctrl-C) and SIGTERM stop the collector cleanly: the episode being collected is dropped, the
finished ones stay, and the same command resumes. A second signal stops at once (still safe).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from VRNN.aime_config import AIMEConfig
from VRNN.dmc_envs import DMCEnv, resolve_env_name
from VRNN.hdf5_check import check_seeds_disjoint, check_split, convert_legacy, repair
from VRNN.hdf5_io import (
    EPISODE_FILE_RE,
    LEGACY_FILES,
    SPLITS,
    DataFileError,
    DataSplits,
    DiskFullError,
    EpisodeWriter,
    Split,
    fault_point,
    list_episode_files,
    remove_split,
    summary,
)
from VRNN.policies import POLICIES, make_policy

__all__ = ["CollectionInterrupted", "StopOnSignal", "collect_dataset", "collect_episode", "collect_split",
           "main", "split_seeds", "unfinished_splits"]

logger = logging.getLogger(__name__)

SEEDS_PER_RUN = 100_000            # train episodes per run seed before seed ranges would overlap
EVAL_SEED_OFFSET = 2 ** 31         # held-out seeds live in [2^31, 2^32): dm_control seeds must be < 2^32
VAL_SEED_OFFSET = 50_000           # validation seeds: the upper half of a run's held-out block
HELD_OUT_PER_RUN = 50_000          # test and validation episodes per run seed
MAX_SEED = EVAL_SEED_OFFSET // SEEDS_PER_RUN
SPLIT_ALIASES = {"eval": "test", "validation": "val"}


def split_seeds(seed: int, count: int, split: str) -> list[int]:
    """Per-episode seeds of a split ("train", "val" or "test"; "eval" means "test"). The three ranges are
    disjoint for every run seed and below 2^32."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (or 'eval' for 'test'), got {split!r}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}), got {seed}")
    limit = SEEDS_PER_RUN if split == "train" else HELD_OUT_PER_RUN
    if not 0 <= count <= limit:
        raise ValueError(f"{split} episode count must be in [0, {limit}], got {count}")
    base = seed * SEEDS_PER_RUN
    if split != "train":
        base += EVAL_SEED_OFFSET + (VAL_SEED_OFFSET if split == "val" else 0)
    return [base + i for i in range(count)]


class CollectionInterrupted(KeyboardInterrupt):
    """Collection stopped by SIGINT or SIGTERM; finished episodes are kept (``signum`` says which)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class StopOnSignal:
    """While active, SIGINT and SIGTERM request a stop (``requested`` becomes the signal number) instead of
    killing the process; the collector drops the episode under way and raises CollectionInterrupted.
    A second signal raises at once. Outside the main thread it does nothing. Previous handlers are
    restored on exit."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: object) -> None:
        if self.requested is not None:
            raise CollectionInterrupted(signum)
        self.requested = signum
        logger.warning("%s received: stopping after dropping the episode being collected "
                       "(finished episodes are kept)", signal.Signals(signum).name)

    def check(self) -> None:
        """Raise CollectionInterrupted when a stop was requested."""
        if self.requested is not None:
            raise CollectionInterrupted(self.requested)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def collect_episode(env: DMCEnv, policy_name: str, seed: int, bar: tqdm | None = None,
                    stop: StopOnSignal | None = None) -> dict[str, np.ndarray]:
    """Run one episode and return its rows (RLDS convention, L agent steps -> N = L + 1 rows):
    obs uint8 [N,S,S,3], action float32 [N,A] (last row zeros), reward float32 [N] (last row 0),
    is_first / is_last / is_terminal bool [N]. ``stop``: checked at every step (CollectionInterrupted)."""
    policy = make_policy(policy_name, env.action_spec, np.random.default_rng(seed))
    policy.reset()
    frames = [env.reset(seed=seed)]
    actions, rewards = [], []
    terminal = False
    while True:
        if stop is not None:
            stop.check()
        fault_point("step")
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


def _replace_hint(path: Path) -> str:
    return (f"use another output folder, delete {path}, or replace it with "
            f"'python VRNN/collect_dmc.py --out {path.parent} --overwrite ...'")


def collect_split(path: str | Path, env_name: str, seeds: Sequence[int], episode_length: int, policy: str,
                  action_repeat: int = 2, image_size: int = 64, progress: bool = True,
                  overwrite: bool = False, desc: str = "", split: str = "train",
                  stop: StopOnSignal | None = None) -> Path:
    """Write the episodes of ``seeds`` (episode ``i`` gets ``seeds[i]``) into the split folder ``path``,
    collecting only the indices that have no file yet.

    Raises DataFileError (a ValueError) when existing episodes were written with other settings or other
    seeds (unless ``overwrite``) or are damaged, DiskFullError when the disk fills, CollectionInterrupted
    when ``stop`` sees a signal. Finished episodes are never lost or replaced silently.
    """
    path = Path(path)
    spec = resolve_env_name(env_name)
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {sorted(POLICIES)}")
    if episode_length < 1:
        raise ValueError(f"episode_length must be at least 1 agent step, got {episode_length}")
    if overwrite and path.exists():
        logger.info("overwriting %s", path)
        remove_split(path)
    if path.is_file():
        raise DataFileError(f"{path} is a file, expected a split folder; {_replace_hint(path)}")
    attrs = {"env": spec.name, "camera": spec.camera, "action_repeat": int(action_repeat), "policy": policy,
             "image_size": int(image_size), "episode_length": int(episode_length), "split_episodes": len(seeds)}
    env: DMCEnv | None = None
    try:
        # the action size of episodes already there spares building an environment for a complete split
        action_dim = Split(path).attrs.get("action_dim") if path.is_dir() and list_episode_files(path) else None
        if action_dim is None:
            env = DMCEnv(spec, seed=int(seeds[0]) if seeds else 0, episode_length=episode_length,
                         action_repeat=action_repeat, image_size=image_size)
            action_dim = env.action_dim
        try:
            writer = EpisodeWriter(path, {**attrs, "action_dim": int(action_dim)}, split=split)
        except DataFileError as err:
            if "holds episodes with" in str(err):
                raise DataFileError(f"{err}; {_replace_hint(path)}") from None
            raise
        with writer:
            for index, seed in sorted(writer.seeds.items()):
                if index < len(seeds) and seed != seeds[index]:
                    raise DataFileError(f"{path}/ep_{index:06d}.h5 has seed {seed}, but episode {index} of this "
                                        f"collection has seed {seeds[index]} (another --seed?); {_replace_hint(path)}")
            done = set(writer.indices)
            todo = [i for i in range(len(seeds)) if i not in done]
            if not todo:
                logger.info("%s already holds %d episodes (%d requested); skipping", path, len(done), len(seeds))
                return path
            if done:
                logger.info("%s holds %d of %d episodes; collecting the other %d", path,
                            len(done & set(range(len(seeds)))), len(seeds), len(todo))
            if env is None:
                env = DMCEnv(spec, seed=int(seeds[todo[0]]), episode_length=episode_length,
                             action_repeat=action_repeat, image_size=image_size)
            with tqdm(total=len(todo) * episode_length, desc=desc or path.name, unit="step",
                      disable=None if progress else True, leave=False) as bar:
                for index in todo:
                    fault_point("episode")
                    episode = collect_episode(env, policy, seeds[index], bar, stop)
                    writer.write_episode(episode, seed=seeds[index], index=index)
                    if stop is not None:
                        stop.check()
    finally:
        if env is not None:
            env.close()
    return path


def collect_dataset(env: str, out_dir: str | Path, episodes: int, eval_episodes: int, episode_length: int,
                    policy: str, seed: int, action_repeat: int = 2, progress: bool = True,
                    overwrite: bool = False, image_size: int = 64,
                    val_episodes: int = AIMEConfig.val_episodes) -> DataSplits:
    """Collect ``episodes`` train, ``val_episodes`` validation and ``eval_episodes`` test episodes of
    ``episode_length`` agent steps into ``out_dir/train``, ``out_dir/val`` and ``out_dir/test``.

    Returns ``DataSplits(train, validation, test)``; with ``val_episodes=0`` no validation folder is
    written and ``validation`` is the test folder. Everything is checked before anything is written: a
    bad count, seed or ``out_dir`` (a file, or a folder holding the old train.h5 / eval.h5) raises
    ValueError. SIGINT / SIGTERM stop it cleanly (CollectionInterrupted, finished episodes kept).
    """
    if episodes < 1 or eval_episodes < 1 or val_episodes < 0:
        raise ValueError(f"need at least one train and one test episode and no negative count, got "
                         f"train={episodes} val={val_episodes} test={eval_episodes}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataFileError(f"output folder {out_dir} is a file; give a folder (it will hold train/ val/ test/)")
    legacy = [out_dir / name for name in LEGACY_FILES.values() if (out_dir / name).exists()]
    if legacy and not overwrite:
        raise DataFileError(f"{out_dir} holds an old single-file dataset ({', '.join(p.name for p in legacy)}); "
                            f"convert it with 'python VRNN/collect_dmc.py convert {out_dir}', or collect into "
                            f"another folder")
    plan = [("train", episodes), ("val", val_episodes), ("test", eval_episodes)]
    seeds = {split: split_seeds(seed, count, split) for split, count in plan}
    resolve_env_name(env)
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {sorted(POLICIES)}")
    if overwrite:
        for path in legacy:
            logger.info("overwriting %s", path)
            path.unlink()
    with StopOnSignal() as stop:
        for split, count in plan:
            if count:
                collect_split(out_dir / split, env, seeds[split], episode_length, policy, action_repeat,
                              image_size, progress, overwrite, desc=split, split=split, stop=stop)
    val_dir = out_dir / "val" if val_episodes else out_dir / "test"
    return DataSplits(out_dir / "train", val_dir, out_dir / "test")


def unfinished_splits(out_dir: str | Path, episodes: int, val_episodes: int, eval_episodes: int) -> list[str]:
    """The splits of ``out_dir`` that a collection with these counts still has to write: a split folder
    that is missing, or that holds fewer episodes than its own collection asked for (an interrupted run).
    A finished split is left as it is whatever the counts (imported data counts as finished). Raises
    DataFileError naming the file when existing data is damaged."""
    out_dir = Path(out_dir)
    todo = []
    for split, count in (("train", episodes), ("val", val_episodes), ("test", eval_episodes)):
        path = out_dir / split
        if count < 1:
            continue
        if not path.is_dir():
            todo.append(split)
            continue
        existing = Split(path)
        wanted = existing.requested if existing.requested is not None else (0 if len(existing) else count)
        if len(set(existing.indices) & set(range(wanted))) < wanted:
            todo.append(split)
    return todo


# --------------------------------------------------------------------------------------------------
# Command line
def _collect_parser() -> argparse.ArgumentParser:
    base = AIMEConfig()
    parser = argparse.ArgumentParser(
        description="Collect DMC pixel episodes into <out>/train, <out>/val and <out>/test (one HDF5 file per "
                    "episode). Subcommands: 'verify PATH...' checks data folders, split folders or files; "
                    "'repair PATH...' moves damaged episode files aside; 'convert OLD.h5 NEWDIR' (or "
                    "'convert DATADIR') turns old single-file splits into split folders. "
                    "Each has its own --help.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--env", default=base.env, help="DMC task, any spelling: cheetah-run, cheetah_run, dmc_cheetah_run")
    parser.add_argument("--episodes", type=int, default=base.train_episodes, help="train episodes")
    parser.add_argument("--val-episodes", type=int, default=base.val_episodes,
                        help="validation episodes (disjoint seeds; 0: none, the test split then serves)")
    parser.add_argument("--eval-episodes", "--test-episodes", dest="eval_episodes", type=int,
                        default=base.eval_episodes, help="test episodes (disjoint seeds)")
    parser.add_argument("--episode-length", type=int, default=base.episode_length, help="agent steps per episode")
    parser.add_argument("--policy", default=base.policy, choices=sorted(POLICIES), help="behaviour policy")
    parser.add_argument("--seed", type=int, default=base.seed, help=f"run seed in [0, {MAX_SEED}); episode seeds derive from it")
    parser.add_argument("--action-repeat", type=int, default=base.action_repeat, help="physics steps per agent step")
    parser.add_argument("--image-size", type=int, default=base.image_size, help="frame height and width in pixels")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: data/<env>)")
    parser.add_argument("--overwrite", action="store_true", help="delete existing episodes instead of resuming")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _targets(path: Path) -> list[Path]:
    """The splits under ``path``: itself for a split folder or file, else its train/val/test (or old files)."""
    if path.is_dir() and not any(EPISODE_FILE_RE.match(e.name) for e in path.iterdir()):
        found = [path / s for s in SPLITS if (path / s).exists()]
        found += [path / f for f in LEGACY_FILES.values() if (path / f).exists()]
        if found:
            return found
    return [path]


def _verify_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="collect_dmc.py verify", allow_abbrev=False,
                                     description="Check data: a data folder (its train/val/test), a split folder, "
                                                 "an episode file or an old train.h5 / eval.h5. Exit 1 on problems.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="what to check")
    args = parser.parse_args(argv)
    bad = 0
    for root in args.paths:
        targets = _targets(root)
        for path in targets:
            check = check_split(path)
            if check.problems:
                bad += 1
                print(f"{path}: {len(check.problems)} problem(s)")
                for line in check.problems:
                    print(f"  - {line}")
                if check.damaged:
                    print(f"  damaged: {', '.join(p.name for p in check.damaged)}; "
                          f"'python VRNN/collect_dmc.py repair {path}' moves them aside")
            else:
                info = summary(path)
                print(f"{path}: OK  env={info['env']} policy={info['policy']} episodes={info['episodes']} "
                      f"steps={info['steps']} rows={info['rows']} action_dim={info['action_dim']} "
                      f"image_size={info['image_size']} action_repeat={info['action_repeat']}")
            for note in check.notes:
                print(f"  note: {note}")
        if len(targets) > 1:
            for line in check_seeds_disjoint(targets):
                bad += 1
                print(f"{root}: {line}")
    return 1 if bad else 0


def _repair_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="collect_dmc.py repair", allow_abbrev=False,
                                     description="Move damaged or duplicate episode files of split folders into "
                                                 "<split>/damaged/ and delete leftover temporary files; collecting "
                                                 "again then re-collects the episodes moved aside.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a data folder or split folder")
    args = parser.parse_args(argv)
    for root in args.paths:
        for path in _targets(root):
            try:
                moved, removed = repair(path)
            except DataFileError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            print(f"{path}: moved {len(moved)} damaged episode file(s) aside, removed {len(removed)} temporary file(s)")
            for target in moved:
                print(f"  - {target}")
    return 0


def _convert_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="collect_dmc.py convert", allow_abbrev=False,
                                     description="Copy old single-file splits into split folders (the old files "
                                                 "are only read). 'convert OLD.h5 NEWDIR', or 'convert DATADIR' "
                                                 "for DATADIR/train.h5 -> DATADIR/train and DATADIR/eval.h5 -> "
                                                 "DATADIR/test. Episodes that cannot be read are listed and left out.")
    parser.add_argument("source", type=Path, help="an old .h5 split file, or a folder holding train.h5 / eval.h5")
    parser.add_argument("target", type=Path, nargs="?", default=None, help="new split folder (with a file source)")
    args = parser.parse_args(argv)
    if args.source.is_dir():
        if args.target is not None:
            parser.error("with a folder as source, give no target: the splits go to SOURCE/train and SOURCE/test")
        jobs = [(args.source / LEGACY_FILES[s], args.source / s, s) for s in ("train", "test")
                if (args.source / LEGACY_FILES[s]).is_file()]
        if not jobs:
            print(f"error: {args.source} holds neither train.h5 nor eval.h5", file=sys.stderr)
            return 2
    else:
        if args.target is None:
            parser.error("give the new split folder: convert OLD.h5 NEWDIR")
        jobs = [(args.source, args.target, "test" if args.source.name == LEGACY_FILES["test"] else "train")]
    skipped_any = False
    for old, new, split in jobs:
        try:
            written, skipped = convert_legacy(old, new, split=split)
        except (DataFileError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{old} -> {new}: {written} episodes" + (f", {len(skipped)} left out:" if skipped else ""))
        for line in skipped:
            print(f"  - {line}")
        skipped_any |= bool(skipped)
    if args.source.is_dir():
        print(f"the old files in {args.source} are no longer read (the folders take precedence); delete them "
              f"when you no longer need them")
    return 1 if skipped_any else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"verify": _verify_main, "repair": _repair_main, "convert": _convert_main}
    if argv and argv[0] in commands:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return commands[argv[0]](argv[1:])
    args = _collect_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("OpenGL").setLevel(logging.WARNING)
    out = args.out
    try:
        name = resolve_env_name(args.env).name
        out = args.out if args.out is not None else Path("data") / name
        splits = collect_dataset(name, out, args.episodes, args.eval_episodes, args.episode_length,
                                 args.policy, args.seed, args.action_repeat, not args.quiet,
                                 args.overwrite, args.image_size, val_episodes=args.val_episodes)
        for path in dict.fromkeys(splits):  # inside the try: a signal while summarising is one line too
            info = summary(path)
            print(f"{path}: {info['episodes']} episodes, {info['steps']} steps, action_dim={info['action_dim']}")
    except CollectionInterrupted as err:
        print(f"interrupted by {signal.Signals(err.signum).name}: the episode under way was dropped, finished "
              f"episodes are kept in {out}; run the same command again to resume", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print(f"interrupted: finished episodes are kept in {out}; run the same command again to resume",
              file=sys.stderr)
        return 130
    except (ValueError, DiskFullError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write to {out}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
