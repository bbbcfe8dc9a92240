"""Cost of RGB's two halves on CPU: per-task gradients (one vmapped pass vs T passes) and aggregate().

    python benchmarks/rgb_batched_grads.py [--repeats 20] [--threads 1] [--batch 16] [--device cpu]

Part 1 builds a small conv + MLP network (about 0.3 M parameters) with 4 scalar losses on a shared trunk
and times only the gradient computation (the forward pass is rebuilt outside the timer each repeat):
`per_task_gradients(batched=True)` (one `autograd.grad(..., is_grads_batched=True)`) against
`batched=False` (4 `autograd.grad` calls). Part 2 times `aggregate()` of rgb / pcgrad / sum on a random
[4, D] matrix for D = 1e5 and 1e6. Medians over the repeats, in milliseconds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from multi_task_learning import get_aggregator, per_task_gradients


class SmallNet(nn.Module):
    def __init__(self, tasks: int = 4):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.SiLU())
        self.heads = nn.ModuleList(nn.Linear(256, 8) for _ in range(tasks))

    def losses(self, x: torch.Tensor, targets: torch.Tensor) -> list:
        h = self.trunk(x)                                          # x [B, 3, 32, 32] -> h [B, 256]
        return [(head(h) - targets[i]).square().mean() for i, head in enumerate(self.heads)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, repeats: int, device: torch.device, setup=None) -> float:
    times = []
    for _ in range(repeats + 2):                                   # two warm-up rounds
        arg = setup() if setup is not None else None
        _sync(device)
        t0 = time.perf_counter()
        fn(arg)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    net = SmallNet().to(device)
    params = list(net.parameters())
    n_params = sum(p.numel() for p in params)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    targets = torch.randn(4, args.batch, 8, device=device)
    setup = lambda: net.losses(x, targets)

    ref = per_task_gradients(setup(), params, batched=False)
    got = per_task_gradients(setup(), params, batched=True)
    err = max(float((a - b).abs().max()) for a, b in zip(ref, got))

    # interleaved, so that load from other processes hits both variants alike
    times = {True: [], False: []}
    for r in range(args.repeats + 2):
        for batched in (True, False):
            losses = setup()
            _sync(device)
            t0 = time.perf_counter()
            per_task_gradients(losses, params, batched=batched)
            _sync(device)
            if r >= 2:
                times[batched].append(time.perf_counter() - t0)
    t_batched, t_loop = (1e3 * statistics.median(times[b]) for b in (True, False))
    t_fwd = _median_ms(lambda _: setup(), args.repeats, device)
    print(f"torch {torch.__version__}, device={device}, threads={args.threads}, batch={args.batch}, "
          f"params={n_params / 1e3:.0f}k, tasks=4")
    print(f"forward (for scale)          {t_fwd:8.2f} ms")
    print(f"per-task grads, batched      {t_batched:8.2f} ms")
    print(f"per-task grads, 4 passes     {t_loop:8.2f} ms")
    print(f"ratio loop / batched         {t_loop / t_batched:8.2f}x   (max |difference| {err:.1e})")

    for D in (100_000, 1_000_000):
        G = torch.randn(4, D, device=device)
        for name in ("rgb", "pcgrad", "sum"):
            agg = get_aggregator(name)
            t = _median_ms(lambda _, agg=agg, G=G: agg.aggregate(G), args.repeats, device)
            print(f"aggregate {name:6s} T=4 D={D:>9,d} {t:8.2f} ms")


if __name__ == "__main__":
    main()
