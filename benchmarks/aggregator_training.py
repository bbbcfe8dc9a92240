"""How the multi-task gradient aggregator changes what the world model learns in a short run.

For each aggregator (``sum``, ``pcgrad``, ``rgb`` at one or more proximity weights lambda) this trains the
same model (same initialisation, same batches, same beta and adversarial warm-ups as the trainer) for
``--steps`` optimiser steps on a DMC dataset and prints the training bits/dim averaged over the last 10
steps, beside the ``sum`` aggregator's figure measured in the same run, and their ratio.

    python benchmarks/aggregator_training.py --steps 100
    python benchmarks/aggregator_training.py --steps 100 --rgb-lambdas 1 10 --data-dir data/cheetah-run

It collects a small cheetah-run dataset into --data-dir when it holds no train split.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from multi_task_learning import get_aggregator
from VRNN.aime_config import PRESETS, AIMEConfig
from VRNN.collect_dmc import collect_dataset
from VRNN.dmc_dataset import DMCVBDataset
from VRNN.hdf5_io import find_splits
from VRNN.dpgmm_stickbreaking_prior_vrnn import TASK_LOSS_KEYS, DPGMMVariationalRecurrentAutoencoder
from VRNN.schedules import adversarial_weight_at, kl_warmup_at


def train(config: AIMEConfig, data: DMCVBDataset, aggregator_name: str, steps: int, **agg_kwargs) -> list[float]:
    """``steps`` optimiser steps; returns the training bits/dim of every step."""
    torch.manual_seed(config.seed)
    model = DPGMMVariationalRecurrentAutoencoder.from_config(config, action_dim=data.action_dim)
    params = model.generator_parameters()
    optimizer = torch.optim.AdamW(model.parameter_groups(config.learning_rate, config.weight_decay))
    aggregator = get_aggregator(aggregator_name, batched_grads=False, **agg_kwargs)
    order = torch.Generator().manual_seed(config.seed)
    history = []
    for step in range(steps):
        idx = torch.randint(0, len(data), (config.batch_size,), generator=order).tolist()
        items = [data[i] for i in idx]
        obs = torch.stack([it["observations"] for it in items])
        actions = torch.stack([it["actions"] for it in items])
        losses, _ = model.compute_total_loss(
            obs, actions, beta=kl_warmup_at(step, config.beta_warmup_steps),
            adversarial_weight=adversarial_weight_at(step, config.adversarial_warmup_steps,
                                                     config.adversarial_start_steps))
        optimizer.zero_grad(set_to_none=True)
        aggregator.backward({k: losses[k] for k in TASK_LOSS_KEYS}, params)
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        history.append(float(losses["bits_per_dim"].detach()))
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="model size preset")
    parser.add_argument("--data-dir", type=Path, default=Path("data/cheetah-run"),
                        help="data folder with a train split (train/ or the old train.h5; collected when missing)")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps per aggregator")
    parser.add_argument("--rgb-lambdas", type=float, nargs="+", default=[1.0, 10.0],
                        help="RGB proximity weights to compare")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = AIMEConfig.preset(args.preset)
    if find_splits(args.data_dir) is None:
        collect_dataset("cheetah-run", args.data_dir, episodes=8, eval_episodes=1, episode_length=200,
                        policy="ou", seed=0, progress=False, val_episodes=0)
    data = DMCVBDataset(find_splits(args.data_dir).train, config.sequence_length)

    runs: list[tuple[str, str, dict]] = [("sum", "sum", {}), ("pcgrad", "pcgrad", {})]
    runs += [(f"rgb lambda={lam:g}", "rgb", {"lam": lam}) for lam in args.rgb_lambdas]
    print(f"preset {args.preset}, {args.steps} steps, batch {config.batch_size}x{config.sequence_length}, "
          f"data {args.data_dir}")
    results = {}
    for label, name, kwargs in runs:
        t0 = time.perf_counter()
        history = train(config, data, name, args.steps, **kwargs)
        tail = history[-10:]
        results[label] = sum(tail) / len(tail)
        print(f"  {label:16s} bits/dim {history[0]:.3f} -> {results[label]:.3f} (mean of last {len(tail)}), "
              f"{time.perf_counter() - t0:.0f} s")
    base = results["sum"]
    print("ratio to sum (lower bits/dim is better; 1.00 = as good as the plain sum):")
    for label, value in results.items():
        print(f"  {label:16s} {value / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
