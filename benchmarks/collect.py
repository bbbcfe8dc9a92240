"""Collector throughput against a bare dm_control step-and-render loop, and dataset window throughput.

    python benchmarks/collect.py [--env cheetah-run] [--steps 300] [--action-repeat 2]

Everything is measured in the same process on the same machine: the ratio collector / bare loop is
the number to read (aim: >= 0.8). The bare loop uses the same task, action repeat, render size, camera
and fast render settings; it stores nothing. The default-render loop shows what the fast settings save.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from VRNN.collect_dmc import collect_split, split_seeds
from VRNN.dmc_dataset import DMCVBDataset
from VRNN.dmc_envs import apply_fast_render, resolve_env_name


def bare_loop(env_name: str, steps: int, action_repeat: int, size: int, fast: bool, seed: int = 0,
              reuse_camera: bool = False) -> float:
    """Agent steps per second of step x action_repeat + render, nothing else (set-up not timed).
    ``reuse_camera`` renders through one persistent ``Camera`` (what DMCEnv does) instead of
    ``physics.render``, which builds a new Camera and scene for every frame."""
    from dm_control import suite
    from dm_control.mujoco.engine import Camera

    spec = resolve_env_name(env_name)
    env = suite.load(spec.domain, spec.task, task_kwargs={"random": seed, "time_limit": float("inf")})
    if fast:
        apply_fast_render(env.physics, size)
    action_spec = env.action_spec()
    rng = np.random.default_rng(seed)
    env.reset()
    if reuse_camera:
        camera = Camera(env.physics, size, size, spec.camera)
        render = camera.render
    else:
        def render():
            return env.physics.render(size, size, camera_id=spec.camera)
    render()  # context creation outside the timing
    start = time.perf_counter()
    for _ in range(steps):
        action = rng.uniform(action_spec.minimum, action_spec.maximum)
        for _ in range(action_repeat):
            env.step(action)
        render()
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


def collector(env_name: str, steps: int, action_repeat: int, size: int, out: Path) -> float:
    """Agent steps per second of collect_split (policy, env, frames, compressed HDF5 writes), 2 episodes,
    into ``out`` (a path that does not exist yet: collect_split's own split file or folder)."""
    length = steps // 2
    start = time.perf_counter()
    collect_split(out, env_name, split_seeds(0, 2, "train"), length, "random", action_repeat, size,
                  progress=False)
    return 2 * length / (time.perf_counter() - start)


def compare_collection(env_name: str, steps: int, action_repeat: int, size: int, out_dir: Path,
                       repeats: int = 2) -> dict[str, object]:
    """The collector against the bare loops, interleaved ``repeats`` times (best of each); the last
    repetition's data stays under ``out_dir`` (its path is ``"data_path"``)."""
    bare, best, coll = [], [], []
    path = None
    for rep in range(repeats):
        bare.append(bare_loop(env_name, steps, action_repeat, size, fast=True))
        best.append(bare_loop(env_name, steps, action_repeat, size, fast=True, reuse_camera=True))
        path = Path(out_dir) / f"bench_rep{rep}"
        coll.append(collector(env_name, steps, action_repeat, size, path))
    return {"bare_steps_per_s": max(bare), "bare_one_camera_steps_per_s": max(best),
            "collector_steps_per_s": max(coll), "ratio": max(coll) / max(bare),
            "ratio_vs_one_camera": max(coll) / max(best), "data_path": str(path)}


def dataset_rates(path: Path, T: int, windows: int) -> dict[str, float]:
    ds = DMCVBDataset(path, T)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(ds), windows)
    start = time.perf_counter()
    for i in idx:
        ds[int(i)]
    rates = {"random access (cached)": windows / (time.perf_counter() - start)}
    lazy = DMCVBDataset(path, T, cache_bytes=0)
    start = time.perf_counter()
    for i in idx[: windows // 4]:
        lazy[int(i)]
    rates["random access (lazy h5py)"] = (windows // 4) / (time.perf_counter() - start)
    for workers in (0, 2):
        rates[f"DataLoader B=16 workers={workers}"] = loader_rate(ds, 16, workers, windows)
    return rates


def loader_rate(ds, batch_size: int, workers: int, windows: int, pin_memory: bool = False,
                max_seconds: float | None = None) -> float:
    """Windows per second through a shuffling DataLoader over ``ds`` (worker start-up included), reading
    at least ``windows`` windows (or for ``max_seconds``, when given, whichever ends first)."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    seen = 0
    while seen < windows:
        for batch in loader:
            seen += batch["observations"].shape[0]
            if seen >= windows or (max_seconds is not None and time.perf_counter() - start > max_seconds):
                break
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="cheetah-run")
    parser.add_argument("--steps", type=int, default=600, help="agent steps per measurement")
    parser.add_argument("--action-repeat", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--sequence-length", type=int, default=32, help="window length T for the dataset")
    parser.add_argument("--windows", type=int, default=800, help="windows read per dataset measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    name = resolve_env_name(args.env).name
    with tempfile.TemporaryDirectory() as tmp:
        # interleave to spread machine-load noise over both sides; report the best of two
        r = compare_collection(name, args.steps, args.action_repeat, args.image_size, Path(tmp), repeats=2)
        slow = bare_loop(name, args.steps // 3, args.action_repeat, args.image_size, fast=False)
        bare, best, coll = r["bare_steps_per_s"], r["bare_one_camera_steps_per_s"], r["collector_steps_per_s"]
        print(f"env={name} action_repeat={args.action_repeat} size={args.image_size} steps={args.steps}")
        print(f"bare dm_control loop, default render : {slow:8.1f} agent steps/s")
        print(f"bare dm_control loop, fast render    : {bare:8.1f} agent steps/s "
              f"(fast/default {bare / slow:.2f}x)")
        print(f"bare loop, fast render, one Camera   : {best:8.1f} agent steps/s")
        print(f"collector (policy + env + HDF5 gzip) : {coll:8.1f} agent steps/s (set-up included)")
        print(f"ratio collector / bare physics.render loop : {r['ratio']:6.2f}  (aim >= 0.8)")
        print(f"ratio collector / bare one-Camera loop     : {r['ratio_vs_one_camera']:6.2f}")
        for label, rate in dataset_rates(Path(r["data_path"]), args.sequence_length, args.windows).items():
            print(f"dataset T={args.sequence_length} {label:28s}: {rate:8.1f} windows/s")


if __name__ == "__main__":
    main()
