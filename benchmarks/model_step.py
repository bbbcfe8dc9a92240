"""Benchmark one training step of the AIME world model: time, FLOPs, achieved throughput, peak memory.

One step = ``compute_total_loss`` (forward of every part) + the four task gradients through
``multi_task_learning``'s RGB ``backward`` (per-task gradients, rotation, aggregation) + an AdamW step.
The discriminator's own update is not included (it is a separate, much smaller step).
``benchmarks/run_all.py`` measures the trainer's own step instead (``DMCVBTrainer.train_step``: the same
plus clipping, the discriminator step and the EMA update), with a profile by part; it reuses this file's
``machine_throughput`` and memory helpers.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one such step (matmuls,
convolutions and attention, forward and backward; elementwise work is not counted), and the achieved
GFLOP/s is set beside this machine's dense matmul and conv2d throughput measured in the same run, so the
ratio says how much of the reachable compute a step uses. Peak memory: ``torch.cuda.max_memory_allocated``
on a GPU; on a CPU the growth of the process's peak resident set (``ru_maxrss``) from just before the
first step (model, optimiser and data built) to after the timed steps; each preset runs in its own
process so the figures do not mix.

Usage (from the repository root)::

    python benchmarks/model_step.py                          # cpu preset (B, T of the preset) and paper (B=2, T=4)
    python benchmarks/model_step.py --presets paper --batch 8 --seq 16 --device cuda
    python benchmarks/model_step.py --json results.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import multiprocessing
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from multi_task_learning import get_aggregator
from VRNN.aime_config import AIMEConfig
from VRNN.dpgmm_stickbreaking_prior_vrnn import TASK_LOSS_KEYS, DPGMMVariationalRecurrentAutoencoder

# On a CPU the full paper size (B=8, T=16) takes minutes per step; the default measures it at B=2, T=4.
DEFAULT_SHAPES = {"cpu": (None, None), "paper": (2, 4), "smoke": (None, None)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _maxrss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _best_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(device: torch.device, repeats: int = 5) -> float:
    """Dense float32 GFLOP/s of a square matmul (1024 on a CPU, 2048 on CUDA), the best of ``repeats``."""
    n = 2048 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / _best_time(lambda: a @ b, device, repeats) / 1e9


def machine_throughput(device: torch.device) -> dict[str, float]:
    """Dense float32 GFLOP/s of a square matmul and a 3x3 conv2d (forward) on ``device``."""
    matmul = matmul_gflops(device)
    batch, ch, side = (64, 128, 32) if device.type == "cuda" else (16, 64, 32)
    x = torch.randn(batch, ch, side, side, device=device)
    conv = torch.nn.Conv2d(ch, ch, 3, padding=1).to(device)
    with torch.no_grad():
        t_conv = _best_time(lambda: conv(x), device, 5)
    return {"matmul_gflops": matmul,
            "conv2d_gflops": 2 * batch * ch * ch * 9 * side * side / t_conv / 1e9}


def benchmark_preset(preset: str, batch: int | None, seq: int | None, device: torch.device,
                     repeats: int, seed: int = 0) -> dict[str, object]:
    """Build the model of ``preset`` and time / count one training step on random uint8 frames."""
    config = AIMEConfig.preset(preset)
    batch, seq = batch or config.batch_size, seq or config.sequence_length
    config = config.replace(batch_size=batch, sequence_length=seq)
    torch.manual_seed(seed)
    model = DPGMMVariationalRecurrentAutoencoder.from_config(config, action_dim=6).to(device)
    model.train()
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (batch, seq, 3, 64, 64), generator=g, dtype=torch.uint8).to(device)
    actions = (torch.rand(batch, seq, 6, generator=g) * 2 - 1).to(device)
    params = model.generator_parameters()
    optimizer = torch.optim.AdamW(model.parameter_groups(config.learning_rate, config.weight_decay))
    # The same per-task gradient path as DMCVBTrainer: one batched pass on CUDA, one pass per task on
    # the CPU (where the batched pass measured slower; benchmarks/rgb_batched_grads.py).
    aggregator = get_aggregator("rgb", mu=config.rgb_mu, lam=config.rgb_lambda,
                                alpha_steps=config.rgb_alpha_steps, inner_lr=config.rgb_inner_lr,
                                batched_grads=device.type == "cuda")

    def step() -> dict[str, torch.Tensor]:
        losses, _ = model.compute_total_loss(obs, actions, adversarial_weight=1.0)
        optimizer.zero_grad(set_to_none=True)
        aggregator.backward({k: losses[k] for k in TASK_LOSS_KEYS}, params)
        optimizer.step()
        return losses

    gc.collect()
    rss_before = _maxrss_mib()  # model, optimiser and data built; no step run yet in this process
    step()  # warm-up (allocator, kernels, lazy state)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        losses = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else _maxrss_mib() - rss_before)
    peak_total = _maxrss_mib() if device.type == "cpu" else peak
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step_s = min(times)
    return {
        "preset": preset, "batch": batch, "seq": seq, "frames": batch * seq,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s_best": step_s, "step_s_mean": sum(times) / len(times), "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / step_s / 1e9,
        "peak_memory_mib": peak, "process_peak_rss_mib": peak_total,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda"
        else "growth of the process peak RSS over the built model, during the steps",
        "bits_per_dim_after": losses["bits_per_dim"].item(),
    }


def _isolated(preset: str, batch: int | None, seq: int | None, device: str, repeats: int,
              threads: int) -> dict[str, object]:
    """``benchmark_preset`` in a fresh process, so that its peak RSS is its own (CPU)."""
    torch.set_num_threads(threads)
    return benchmark_preset(preset, batch, seq, torch.device(device), repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=sorted(DEFAULT_SHAPES))
    parser.add_argument("--batch", type=int, default=None, help="override B for every preset")
    parser.add_argument("--seq", type=int, default=None, help="override T for every preset")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per preset (best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    peak = machine_throughput(device)
    print(f"machine: {platform.processor() or platform.machine()}, device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"measured dense throughput: matmul {peak['matmul_gflops']:.1f} GFLOP/s, "
          f"conv2d 3x3 {peak['conv2d_gflops']:.1f} GFLOP/s")
    results = []
    for preset in args.presets:
        b_default, t_default = DEFAULT_SHAPES[preset] if device.type == "cpu" else (None, None)
        batch, seq = args.batch or b_default, args.seq or t_default
        if device.type == "cpu":  # one spawned process per preset: ru_maxrss is per process
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                r = pool.submit(_isolated, preset, batch, seq, str(device), args.repeats,
                                torch.get_num_threads()).result()
        else:
            r = benchmark_preset(preset, batch, seq, device, args.repeats)
        r["ratio_vs_matmul"] = r["achieved_gflops"] / peak["matmul_gflops"]
        r["ratio_vs_conv2d"] = r["achieved_gflops"] / peak["conv2d_gflops"]
        results.append(r)
        cfg = AIMEConfig.preset(preset)
        reduced = (r["batch"], r["seq"]) != (cfg.batch_size, cfg.sequence_length)
        note = f" (reduced from the preset's B={cfg.batch_size}, T={cfg.sequence_length})" if reduced else ""
        print(f"\n[{preset}] B={r['batch']} T={r['seq']}{note}, {r['parameters_m']:.2f} M parameters")
        print(f"  step (forward + RGB over 4 tasks + AdamW): best {r['step_s_best']:.3f} s, "
              f"mean {r['step_s_mean']:.3f} s over {args.repeats}")
        print(f"  FLOPs per step: {r['gflop_per_step']:.2f} GFLOP -> achieved {r['achieved_gflops']:.2f} GFLOP/s "
              f"= {100 * r['ratio_vs_matmul']:.1f}% of matmul, {100 * r['ratio_vs_conv2d']:.1f}% of conv2d")
        print(f"  peak memory: {r['peak_memory_mib']:.0f} MiB ({r['peak_memory_kind']}); "
              f"process peak {r['process_peak_rss_mib']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"machine": peak, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
