"""Every benchmark of the training-speed work in one run: writes benchmarks/results.json and prints a table.

Each figure is measured in this run beside its reference, and the ratio is printed:

* step      the real training step, ``DMCVBTrainer.train_step`` (four task losses, the aggregator over the
            per-task gradients, clipping, AdamW, the discriminator step, the EMA update) on a synthetic batch,
            per preset: frames per second (B*T / median step time), FLOPs per frame, achieved GFLOP/s beside
            this process's dense matmul throughput, peak memory, and a torch.profiler breakdown: the share
            of each part (encoder, Perceiver, prior loop, attention, decoder & likelihood, discriminator,
            per-task gradients, aggregator, optimiser, discriminator step, EMA) and of the per-time-step loop
            (benchmarks/trainer_step.py says how it attributes time without touching the model's code)
* tscale    frames per second at two window lengths (16 and 64), same model, interleaved; ratio long/short
* aggregator the step with the configured aggregator (rgb) against the same step with one backward pass of the
            summed task losses (and against the ``sum`` aggregator, which still takes per-task gradients)
* data      windows per second through a DataLoader built like the trainer's (its batch size, workers and
            pinning) against the windows per second the step consumes (B / step time of the first preset)
* collect   the collector against a bare dm_control step-and-render loop (benchmarks/collect.py)
* imagine   frames per second of ``generate_future_sequence`` (one rollout, and a batch) against real time
            (a DMC agent step lasts 20 ms at action repeat 2: 50 frames per second)
* shipped   the first preset's step of this tree against the same preset's step of the code as first shipped
            (git ``--shipped-ref``, each with its own preset's B x T), both timed by benchmarks/trainer_step.py
            in fresh processes that alternate (shipped, this tree) ``--shipped-rounds`` times: the speed-up in
            frames per second, measured on the same machine in the same minutes (not in ``--quick`` unless
            named in ``--sections``; needs git and the repository's history)

Usage (from the repository root)::

    python benchmarks/run_all.py                       # cpu and paper presets, every section (~10 min, 2 cores)
    python benchmarks/run_all.py --quick               # small T, one repetition: about a minute
    python benchmarks/run_all.py --presets cpu --sections step tscale
    python benchmarks/run_all.py --device cuda --shape paper=16x64 --amp
    python benchmarks/run_all.py --compare benchmarks/results.json --out /tmp/after.json

On a CPU the paper preset runs at a reduced B x T (it does not fit a step in seconds); the output and the
JSON say so. The table printed at the end is markdown: paste it into the README's Performance section.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from VRNN.aime_config import PRESETS

HERE = Path(__file__).resolve().parent


def _sibling(name: str):
    """The benchmark module ``benchmarks/<name>.py``, loaded from its file (no sys.path edit); registered
    under ``name`` so that spawned workers (whose sys.path starts with this folder) unpickle its functions."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(HERE / f"{name}.py"):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


collect_bench = _sibling("collect")        # benchmarks/collect.py
model_step = _sibling("model_step")        # benchmarks/model_step.py
trainer_step = _sibling("trainer_step")    # benchmarks/trainer_step.py

SECTIONS = ("step", "tscale", "aggregator", "data", "collect", "imagine", "shipped")
# The last commit before the speed work of issue 10 (25 November 2026): the code as first shipped.
SHIPPED_REF = "f15a223"
REAL_TIME_FPS = 50.0  # DMC: control timestep 10 ms x action repeat 2 = one agent step per 20 ms
# The issue's aims (issue 10), printed beside the ratios: (key, comparison, value)
AIMS = {
    "step_fps": (">=", 250.0), "achieved_vs_matmul": (">=", 0.40), "loop_share": ("<", 0.25),
    "tscale_ratio": (">=", 0.90), "aggregator_ratio": ("<=", 1.5), "data_ratio": (">=", 20.0),
    "collect_ratio": (">=", 0.8), "imagine_realtime_ratio": (">=", 10.0), "shipped_ratio": (">=", 10.0),
}
QUICK = {"repeats": 1, "warmup": 0, "tscale": (4, 8), "collect_steps": 60, "windows": 64, "horizon": 4,
         "shapes": {"cpu": (None, 4), "paper": (1, 2), "smoke": (None, None)}}
FULL = {"repeats": 3, "warmup": 1, "tscale": (16, 64), "collect_steps": 600, "windows": 2000, "horizon": 16,
        "shapes": {"cpu": (None, None), "paper": model_step.DEFAULT_SHAPES["paper"], "smoke": (None, None)}}


# ---------------------------------------------------------------------------------------------------
# Sections that run in a child process (one per call: its own peak memory and thread setting)
def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def step_section(preset: str, batch: int | None, seq: int | None, device: str, repeats: int, warmup: int,
                 amp: bool, threads: int | None) -> dict[str, Any]:
    """The full training step of ``preset``: times, throughput, FLOPs, memory and the profile."""
    if threads:
        torch.set_num_threads(threads)
    dev = _device(device)
    machine = model_step.machine_throughput(dev)  # in this process, just before the steps
    config = trainer_step.step_config(preset, batch, seq)
    if amp:
        config = config.replace(amp=True)
    harness = trainer_step.TrainerHarness(config, dev)
    gc.collect()
    rss_before = model_step._maxrss_mib()
    flops, flops_by_part = harness.count_flops()  # also the first, warm-up step (lazy init, allocator)
    for _ in range(warmup):
        harness.step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # The matmul reference is also measured between the timed steps (best of 3 after each), so that it sees
    # the machine in the same minutes as the steps; the ratio uses the median of those.
    times, matmul_between = [], []
    for _ in range(repeats):
        times += harness.time_steps(1, warmup=0)
        matmul_between.append(model_step.matmul_gflops(dev, repeats=3))
    machine["matmul_gflops_before"] = machine["matmul_gflops"]
    machine["matmul_gflops_between_steps"] = matmul_between
    machine["matmul_gflops"] = _median(matmul_between)
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else model_step._maxrss_mib() - rss_before)
    phases = harness.phase_times()
    prof = harness.profile_step()
    step_s = _median(times)
    preset_cfg = trainer_step.AIMEConfig.preset(preset)
    reduced = (config.batch_size, config.sequence_length) != (preset_cfg.batch_size, preset_cfg.sequence_length)
    result = {
        "preset": preset, "batch": config.batch_size, "seq": config.sequence_length,
        "preset_batch": preset_cfg.batch_size, "preset_seq": preset_cfg.sequence_length, "reduced": reduced,
        "aggregator": config.aggregator, "amp": bool(config.amp), "device": str(dev),
        "threads": torch.get_num_threads(), "frames": harness.frames,
        "parameters_m": sum(p.numel() for p in harness.model.parameters()) / 1e6,
        "step_s": times, "step_s_median": step_s, "step_s_best": min(times),
        "fps": harness.frames / step_s, "gflop_per_step": flops / 1e9, "gflop_per_frame": flops / 1e9 / harness.frames,
        "achieved_gflops": flops / step_s / 1e9, "machine": machine,
        "gflop_per_frame_by_part": {k: v / 1e9 / harness.frames for k, v in flops_by_part.items()},
        "achieved_vs_matmul": flops / step_s / 1e9 / machine["matmul_gflops"],
        "peak_memory_mib": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if dev.type == "cuda"
        else "growth of the process peak RSS (ru_maxrss) from the built trainer through the timed steps",
        "profile": prof, "profiler_overhead": prof["profiled_step_s"] / step_s, "phases_unprofiled": phases,
        "skipped_steps": harness.skipped,
    }
    if dev.type == "cuda":
        result["gpu_utilisation"] = 1.0 - prof["idle_share"]
    harness.close()
    return result


def _interleaved(harnesses: list[Any], repeats: int, warmup: int) -> list[list[float]]:
    for h in harnesses:
        for _ in range(warmup):
            h.step()
    times: list[list[float]] = [[] for _ in harnesses]
    for _ in range(repeats):
        for i, h in enumerate(harnesses):
            times[i].extend(h.time_steps(1, warmup=0))
    return times


def tscale_section(preset: str, batch: int | None, lengths: tuple[int, int], device: str, repeats: int,
                   warmup: int, amp: bool, threads: int | None) -> dict[str, Any]:
    """Frames per second at two window lengths (the same model: the Perceiver sized for the longer)."""
    if threads:
        torch.set_num_threads(threads)
    dev = _device(device)
    harnesses = []
    for t in lengths:
        config = trainer_step.step_config(preset, batch, t, max_seq_len=max(lengths))
        harnesses.append(trainer_step.TrainerHarness(config.replace(amp=True) if amp else config, dev))
    times = _interleaved(harnesses, repeats, warmup)
    fps = [h.frames / _median(ts) for h, ts in zip(harnesses, times)]
    out = {"preset": preset, "batch": harnesses[0].config.batch_size, "T": list(lengths), "step_s": times,
           "fps": fps, "ratio": fps[1] / fps[0],
           "perceiver_max_seq_len": harnesses[0].config.perceiver_max_seq_len}
    for h in harnesses:
        h.close()
    return out


def aggregator_section(preset: str, batch: int | None, seq: int | None, device: str, repeats: int, warmup: int,
                       amp: bool, threads: int | None) -> dict[str, Any]:
    """The step with the preset's aggregator against the same step with one backward of the summed losses
    (the headline ratio) and with the registry's ``sum`` aggregator (per-task gradients, then summed)."""
    if threads:
        torch.set_num_threads(threads)
    dev = _device(device)
    base = trainer_step.step_config(preset, batch, seq)
    own = base.aggregator if base.aggregator != "sum" else "rgb"
    variants = [(own, own, False), ("sum of the losses, one backward", "sum", True), ("sum (per-task gradients)", "sum", False)]
    configs = [trainer_step.step_config(preset, batch, seq, aggregator=agg) for _, agg, _ in variants]
    harnesses = [trainer_step.TrainerHarness(c.replace(amp=True) if amp else c, dev, single_backward=single)
                 for c, (_, _, single) in zip(configs, variants)]
    times = _interleaved(harnesses, repeats, warmup)
    med = [_median(ts) for ts in times]
    out = {"preset": preset, "batch": base.batch_size, "seq": base.sequence_length,
           "aggregators": [label for label, _, _ in variants], "step_s": times, "step_s_median": med,
           "ratio": med[0] / med[1], "ratio_vs_sum_aggregator": med[0] / med[2]}
    for h in harnesses:
        h.close()
    return out


def imagine_section(preset: str, device: str, horizon: int, repeats: int, threads: int | None) -> dict[str, Any]:
    """generate_future_sequence: imagined frames per second for one rollout and for a batch."""
    if threads:
        torch.set_num_threads(threads)
    dev = _device(device)
    config = trainer_step.AIMEConfig.preset(preset)
    torch.manual_seed(0)
    model = trainer_step.DPGMMVariationalRecurrentAutoencoder.from_config(config, action_dim=trainer_step.ACTION_DIM)
    model = model.to(dev).eval()
    t0 = max(1, config.eval_context_frames)
    out: dict[str, Any] = {"preset": preset, "context_frames": t0, "horizon": horizon,
                           "real_time_fps": REAL_TIME_FPS}
    for label, b in (("single", 1), ("batch", config.batch_size)):
        g = torch.Generator().manual_seed(0)
        obs = torch.randint(0, 256, (b, t0, 3, 64, 64), generator=g, dtype=torch.uint8).to(dev)
        ctx_a = (torch.rand(b, t0, trainer_step.ACTION_DIM, generator=g) * 2 - 1).to(dev)
        fut_a = (torch.rand(b, horizon, trainer_step.ACTION_DIM, generator=g) * 2 - 1).to(dev)

        # A call takes tens of milliseconds, so many are timed: the median of 10 x repeats calls after 3
        # untimed ones (until 7 December: the best of `repeats` after one, which read up to 15 % slower than
        # the steady state an agent's planning loop sees, because the first calls fill caches).
        for _ in range(3):
            model.generate_future_sequence(obs, ctx_a, fut_a)
        times = []
        for _ in range(10 * repeats):
            start = time.perf_counter()
            model.generate_future_sequence(obs, ctx_a, fut_a)
            model_step._sync(dev)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        out[label] = {"batch": b, "call_s": seconds, "call_s_best": min(times), "calls": len(times),
                      "fps": b * horizon / seconds}
    out["realtime_ratio"] = out["single"]["fps"] / REAL_TIME_FPS
    out["realtime_ratio_batch"] = out["batch"]["fps"] / REAL_TIME_FPS
    out["note"] = ("one call observes the context frames, then imagines `horizon` frames; fps = B*horizon / the "
                   "median call time")
    return out


def _in_child(isolate: bool, fn, *args) -> dict[str, Any]:
    """``fn(*args)`` in a fresh spawned process (own peak RSS, own threads) or here."""
    if not isolate:
        return fn(*args)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


# ---------------------------------------------------------------------------------------------------
# Sections that run here
def shipped_section(ref: str, preset: str, repeats: int, rounds: int, threads: int | None, device: str,
                    tmp: Path) -> dict[str, Any]:
    """The ``preset`` step of the code at git ``ref`` against this tree's, each with that code's own preset
    (B x T), each timed by ``benchmarks/trainer_step.py`` (this harness) in a fresh Python process whose
    PYTHONPATH is the tree; the processes alternate (ref, this tree) ``rounds`` times, so a change in the
    machine's speed falls on both. Returns both trees' frames per second per round and their ratio
    (this tree / ref); the figure is the median ratio over the rounds."""
    root = HERE.parent
    old_tree = tmp / f"tree-{ref}"
    old_tree.mkdir(parents=True, exist_ok=True)
    try:
        archive = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", ref], capture_output=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        raise RuntimeError(f"cannot read git ref {ref!r} of {root} (the shipped section needs the repository's "
                           f"history): {detail}") from exc
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)

    def child(tree: Path) -> dict[str, Any]:
        cmd = [sys.executable, str(HERE / "trainer_step.py"), "--preset", preset, "--repeats", str(repeats),
               "--device", device] + (["--threads", str(threads)] if threads else [])
        env = {**os.environ, "PYTHONPATH": str(tree)}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=str(tree))
        if r.returncode != 0:
            raise RuntimeError(f"the step of {tree} failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        if Path(out["vrnn_path"]) != (tree / "VRNN").resolve():
            raise RuntimeError(f"the child imported VRNN from {out['vrnn_path']}, not from {tree}")
        out["fps"] = out["frames"] / _median(out["step_s"])
        return out

    per_round = []
    for _ in range(rounds):
        old, new = child(old_tree), child(root)
        per_round.append({"shipped_fps": old["fps"], "fps": new["fps"], "ratio": new["fps"] / old["fps"],
                          "shipped_step_s": old["step_s"], "step_s": new["step_s"]})
    return {"ref": ref, "preset": preset, "rounds": per_round, "repeats": repeats,
            "shipped_shape": [old["batch"], old["seq"]], "shape": [new["batch"], new["seq"]],
            "shipped_fps": _median([r["shipped_fps"] for r in per_round]),
            "fps": _median([r["fps"] for r in per_round]),
            "ratio": _median([r["ratio"] for r in per_round])}


def collect_section(env: str, steps: int, repeats: int, out_dir: Path) -> dict[str, Any]:
    torch.set_num_threads(1)  # as benchmarks/collect.py: the collector is single-threaded
    r = collect_bench.compare_collection(env, steps, 2, 64, out_dir, repeats=repeats)
    r.update(env=env, steps=steps, action_repeat=2, image_size=64, repeats=repeats)
    return r


def data_section(path: Path, preset: str, batch: int | None, seq: int | None, windows: int, device: str,
                 consumed_fps: float | None, consumed_batch: int | None, quick: bool) -> dict[str, Any]:
    from VRNN.dmc_dataset import DMCVBDataset

    config = trainer_step.step_config(preset, batch, seq)
    ds = DMCVBDataset(path, config.sequence_length, scale="float", augment=config.augment, seed=config.seed)
    pin = _device(device).type == "cuda"
    budget = 5.0 if quick else 20.0
    rate = collect_bench.loader_rate(ds, config.batch_size, config.num_workers, windows, pin_memory=pin,
                                     max_seconds=budget)
    out: dict[str, Any] = {"path": str(path), "windows_in_data": len(ds), "batch": config.batch_size,
                           "seq": config.sequence_length, "num_workers": config.num_workers,
                           "pin_memory": pin, "loader_windows_per_s": rate}
    if not quick:
        out["loader_windows_per_s_2_workers"] = collect_bench.loader_rate(ds, config.batch_size, 2, windows,
                                                                          pin_memory=pin, max_seconds=budget)
    if consumed_fps:
        # the step consumes B windows per step: windows/s = frames/s / T
        out["consumed_windows_per_s"] = consumed_fps / config.sequence_length
        out["ratio"] = rate / out["consumed_windows_per_s"]
    return out


# ---------------------------------------------------------------------------------------------------
# Output
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def _aim(key: str) -> str:
    if key not in AIMS:
        return ""
    op, value = AIMS[key]
    return f"{op} {_fmt(value)}"


def summary_ratios(results: dict[str, Any]) -> dict[str, float]:
    """The headline figures, flat (what the table shows and the test checks)."""
    r: dict[str, float] = {}
    steps = results.get("steps", {})
    for preset, s in steps.items():
        if "error" in s:
            continue
        r[f"{preset}.step_fps"] = s["fps"]
        r[f"{preset}.achieved_vs_matmul"] = s["achieved_vs_matmul"]
        if s["profile"]["loop_share"] is not None:
            r[f"{preset}.loop_share"] = s["profile"]["loop_share"]
    for key, section, field in (("tscale_ratio", "tscale", "ratio"), ("aggregator_ratio", "aggregator", "ratio"),
                                ("data_ratio", "data", "ratio"), ("collect_ratio", "collect", "ratio"),
                                ("imagine_realtime_ratio", "imagine", "realtime_ratio"),
                                ("shipped_ratio", "shipped", "ratio")):
        value = results.get(section, {}).get(field)
        if value is not None:
            r[key] = float(value)
    return r


def markdown_table(results: dict[str, Any]) -> str:
    """The README table: figure | measured | reference (same run) | ratio | aim."""
    rows = ["| figure | measured | reference, same run | ratio | aim |", "| --- | --- | --- | --- | --- |"]
    for preset, s in results.get("steps", {}).items():
        if "error" in s:
            rows.append(f"| {preset} step | failed: {s['error'].splitlines()[0][:80]} | | | |")
            continue
        shape = f"B={s['batch']}, T={s['seq']}" + (f" (reduced from {s['preset_batch']}x{s['preset_seq']})"
                                                   if s["reduced"] else "")
        label = f"{preset} step, {shape}"
        rows.append(f"| {label}: frames/s | {_fmt(s['fps'])} ({_fmt(s['step_s_median'])} s/step) | | | "
                    f"{_aim('step_fps') if preset == 'cpu' else ''} |")
        rows.append(f"| {preset}: achieved GFLOP/s ({_fmt(s['gflop_per_frame'])} GFLOP/frame) | "
                    f"{_fmt(s['achieved_gflops'])} | matmul {_fmt(s['machine']['matmul_gflops'])} GFLOP/s | "
                    f"{_fmt(s['achieved_vs_matmul'])} | {_aim('achieved_vs_matmul')} |")
        loop = s["profile"]["loop_share"]
        rows.append(f"| {preset}: per-time-step loop share of the step | "
                    f"{_fmt(loop) if loop is not None else 'n/a (T < 4)'} | | | {_aim('loop_share')} |")
        mem = f"{_fmt(s['peak_memory_mib'])} MiB"
        rows.append(f"| {preset}: peak memory | {mem} | | | |")
        if "gpu_utilisation" in s:
            rows.append(f"| {preset}: GPU utilisation (kernel time / step) | {_fmt(s['gpu_utilisation'])} | | | |")
    sh = results.get("shipped", {})
    if "ratio" in sh:
        lo, hi = min(r["ratio"] for r in sh["rounds"]), max(r["ratio"] for r in sh["rounds"])
        spread = f" ({_fmt(lo)}–{_fmt(hi)} over {len(sh['rounds'])} rounds)" if len(sh["rounds"]) > 1 else ""
        rows.append(f"| {sh['preset']} step frames/s: this code ({sh['shape'][0]}x{sh['shape'][1]}) vs the code as "
                    f"shipped, git {sh['ref']} ({sh['shipped_shape'][0]}x{sh['shipped_shape'][1]}), processes "
                    f"alternating | {_fmt(sh['fps'])} | {_fmt(sh['shipped_fps'])} | {_fmt(sh['ratio'])}{spread} | "
                    f"{_aim('shipped_ratio')} |")
    t = results.get("tscale", {})
    if "fps" in t:
        rows.append(f"| {t['preset']} frames/s at T={t['T'][1]} vs T={t['T'][0]} (B={t['batch']}) | "
                    f"{_fmt(t['fps'][1])} | {_fmt(t['fps'][0])} | {_fmt(t['ratio'])} | {_aim('tscale_ratio')} |")
    a = results.get("aggregator", {})
    if "ratio" in a:
        rows.append(f"| {a['preset']} step (s) with {a['aggregators'][0]} vs the {a['aggregators'][1]} | "
                    f"{_fmt(a['step_s_median'][0])} | {_fmt(a['step_s_median'][1])} | {_fmt(a['ratio'])} | "
                    f"{_aim('aggregator_ratio')} |")
        rows.append(f"| {a['preset']} step (s) with {a['aggregators'][0]} vs the {a['aggregators'][2]} | "
                    f"{_fmt(a['step_s_median'][0])} | {_fmt(a['step_s_median'][2])} | "
                    f"{_fmt(a['ratio_vs_sum_aggregator'])} | |")
    d = results.get("data", {})
    if "loader_windows_per_s" in d:
        rows.append(f"| data: DataLoader windows/s (B={d['batch']}, T={d['seq']}, {d['num_workers']} workers) vs "
                    f"training's consumption | {_fmt(d['loader_windows_per_s'])} | "
                    f"{_fmt(d.get('consumed_windows_per_s'))} | {_fmt(d.get('ratio'))} | {_aim('data_ratio')} |")
    c = results.get("collect", {})
    if "ratio" in c:
        rows.append(f"| collection: collector vs bare dm_control step+render (agent steps/s) | "
                    f"{_fmt(c['collector_steps_per_s'])} | {_fmt(c['bare_steps_per_s'])} | {_fmt(c['ratio'])} | "
                    f"{_aim('collect_ratio')} |")
    im = results.get("imagine", {})
    if "single" in im:
        rows.append(f"| imagination: frames/s of one rollout ({im['preset']}, {im['horizon']} frames) vs real time | "
                    f"{_fmt(im['single']['fps'])} | {_fmt(REAL_TIME_FPS)} | {_fmt(im['realtime_ratio'])} | "
                    f"{_aim('imagine_realtime_ratio')} |")
        rows.append(f"| imagination: frames/s of a batch of {im['batch']['batch']} vs real time | "
                    f"{_fmt(im['batch']['fps'])} | {_fmt(REAL_TIME_FPS)} | {_fmt(im['realtime_ratio_batch'])} | |")
    return "\n".join(rows)


def parts_table(results: dict[str, Any]) -> str:
    """Share of the step by part (rows) and preset (columns); backward work counted in per-task gradients."""
    steps = {p: s for p, s in results.get("steps", {}).items() if "error" not in s}
    if not steps:
        return ""
    names: list[str] = []
    for s in steps.values():
        for k in s["profile"]["shares"]:
            if k not in names:
                names.append(k)
    head = "| part (share of the profiled step) | " + " | ".join(steps) + " |"
    rows = [head, "| --- |" + " --- |" * len(steps)]
    for name in names:
        rows.append(f"| {name} | " + " | ".join(f"{100 * s['profile']['shares'].get(name, 0.0):.1f} %"
                                               for s in steps.values()) + " |")
    rows.append("| *forward + its backward, by part:* |" + " |" * len(steps))
    fb_names: list[str] = []
    for s in steps.values():
        for k in s["profile"]["forward_plus_backward"]:
            if k not in fb_names:
                fb_names.append(k)
    for name in fb_names:
        rows.append(f"| {name} (fwd + bwd) | " + " | ".join(
            f"{100 * s['profile']['forward_plus_backward'].get(name, 0.0):.1f} %" for s in steps.values()) + " |")
    flop_names: list[str] = []
    for s in steps.values():
        for k in s.get("gflop_per_frame_by_part", {}):
            if k not in flop_names:
                flop_names.append(k)
    if flop_names:
        rows.append("| *GFLOP per frame (forward by part, the rest by phase):* |" + " |" * len(steps))
        for name in flop_names:
            rows.append(f"| {name} | " + " | ".join(
                f"{s.get('gflop_per_frame_by_part', {}).get(name, 0.0):.3g}" for s in steps.values()) + " |")
    return "\n".join(rows)


def top_ops_table(results: dict[str, Any], n: int = 8) -> str:
    lines = []
    for preset, s in results.get("steps", {}).items():
        if "error" in s:
            continue
        ops = ", ".join(f"{o['op']} {100 * o['share']:.1f} %" for o in s["profile"]["top_ops"][:n])
        lines.append(f"- {preset}: {ops}")
    return "\n".join(lines)


def compare_table(old: dict[str, Any], new: dict[str, Any]) -> str:
    """after / before for every headline figure both runs have; a step measured at another B x T is flagged."""
    a, b = old.get("ratios", {}), new.get("ratios", {})
    rows = ["| figure | before | after | after / before |", "| --- | --- | --- | --- |"]
    for key in b:
        if key in a and a[key]:
            note = ""
            preset = key.split(".")[0] if "." in key else None
            if preset:
                s_old, s_new = old.get("steps", {}).get(preset, {}), new.get("steps", {}).get(preset, {})
                shape_old, shape_new = (s_old.get("batch"), s_old.get("seq")), (s_new.get("batch"), s_new.get("seq"))
                if shape_old != shape_new:
                    note = f" (B, T {shape_old} before, {shape_new} after)"
            rows.append(f"| {key}{note} | {_fmt(a[key])} | {_fmt(b[key])} | {_fmt(b[key] / a[key])} |")
    return "\n".join(rows)


README_BEGIN = "<!-- run_all:begin (python benchmarks/run_all.py --update-readme README.md rewrites this block) -->"
README_END = "<!-- run_all:end -->"


def readme_block(results: dict[str, Any]) -> str:
    """What the README's Performance section shows: the conditions, the table, the parts, the top ops."""
    m = results["meta"]
    notes = [f"the {p} preset ran at a reduced B={s['batch']}, T={s['seq']} (its own: B={s['preset_batch']}, "
             f"T={s['preset_seq']})" for p, s in results.get("steps", {}).items() if "error" not in s and s["reduced"]]
    lines = [
        f"Measured {m['date_utc']} (git {m['git']}, `{m['command'].strip()}`) on {m['processor']}, "
        f"{m['cpu_count']} cores, {m['threads']} torch threads, device {m['device']}"
        f"{' (' + m['device_name'] + ')' if m.get('device_name') else ''}, torch {m['torch']}; "
        f"load average (1/5/15 min) {_load(m['load_average_before'])} before and {_load(m['load_average_after'])} "
        f"after the run, which took {m['seconds']:.0f} s" + ("." if not notes else "; " + "; ".join(notes) + "."),
        "",
        results["table_markdown"],
    ]
    if results.get("parts_markdown"):
        lines += ["", results["parts_markdown"], "", "Costliest ops (self time, share of the profiled step):", "",
                  top_ops_table(results, 5)]
    return "\n".join(lines)


def update_readme(path: Path, block: str) -> None:
    """Replace the text between the run_all markers of ``path`` (which must hold both) with ``block``."""
    text = path.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{path} has no run_all block; add the two marker lines\n{README_BEGIN}\n{README_END}")
    text = text[:begin + len(README_BEGIN)] + "\n" + block + "\n" + text[end:]
    path.write_text(text)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted changes" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
def _parse_shapes(items: list[str]) -> dict[str, tuple[int, int]]:
    shapes = {}
    for item in items:
        try:
            preset, bt = item.split("=")
            b, t = bt.lower().split("x")
            shapes[preset] = (int(b), int(t))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--shape takes PRESET=BxT (e.g. paper=16x64), got {item!r}") from None
    return shapes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--quick", action="store_true",
                        help="one repetition, small T (4; T scaling 4 vs 8), short collection: about a minute")
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=sorted(PRESETS),
                        help="presets of the step section; the first one is also used by every other section")
    parser.add_argument("--sections", nargs="+", default=None, choices=SECTIONS,
                        help="sections to run (default: all; with --quick all but shipped)")
    parser.add_argument("--shipped-ref", default=SHIPPED_REF,
                        help="git ref of the code the shipped section compares against (default: the last commit "
                             "before the speed work)")
    parser.add_argument("--shipped-rounds", type=int, default=None,
                        help="alternating (shipped, this tree) process pairs in the shipped section (default 3; "
                             "--quick 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default benchmarks/results.json; benchmarks/results-quick.json with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--amp", action="store_true",
                        help="bf16 autocast in the step for every preset (default: each preset's own amp field; "
                             "the trainer's autocast, on CUDA and on CPUs with native bf16)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per measurement (median reported)")
    parser.add_argument("--shape", nargs="+", default=[], metavar="PRESET=BxT",
                        help="B x T of a preset's step (default: the preset's; paper on a CPU: 2x4)")
    parser.add_argument("--tscale", type=int, nargs=2, default=None, metavar=("T_SHORT", "T_LONG"),
                        help="window lengths of the T-scaling section (default 16 64; --quick 4 8)")
    parser.add_argument("--env", default="cheetah-run", help="environment of the collection section")
    parser.add_argument("--collect-steps", type=int, default=None, help="agent steps per collection measurement")
    parser.add_argument("--data", type=Path, default=None,
                        help="train split for the data section (default: data/cheetah-run/train or train.h5 if "
                             "present, else what the collection section wrote)")
    parser.add_argument("--windows", type=int, default=None, help="windows read in the data section")
    parser.add_argument("--horizon", type=int, default=None, help="imagined frames per rollout (default 16)")
    parser.add_argument("--no-isolate", action="store_true",
                        help="run every section in this process (faster start; peak memory then includes earlier sections)")
    parser.add_argument("--compare", type=Path, default=None, help="an earlier results.json: print after / before")
    parser.add_argument("--update-readme", type=Path, default=None, metavar="README",
                        help="rewrite the block between the run_all markers of this file with this run's tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = QUICK if args.quick else FULL
    if args.sections is None:
        args.sections = [k for k in SECTIONS if not (args.quick and k == "shipped")]
    repeats = args.repeats or mode["repeats"]
    warmup = mode["warmup"]  # untimed steps after the first (the FLOP-counting step in the step section)
    out_path = args.out or HERE / ("results-quick.json" if args.quick else "results.json")
    dev = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    isolate = not args.no_isolate
    shapes = dict(mode["shapes"])
    if dev.type == "cuda" and not args.quick:
        shapes = {k: (None, None) for k in shapes}
    shapes.update(_parse_shapes(args.shape))
    ref = args.presets[0]
    ref_b, ref_t = shapes.get(ref, (None, None))
    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "command": "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "quick": args.quick, "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": _git_commit(), "torch": torch.__version__, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": threads, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "load_average_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "presets": args.presets, "sections": args.sections, "reference_preset": ref,
        },
    }
    errors = []

    def run(name: str, fn, *fargs) -> dict[str, Any]:
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - started:6.1f} s] {name} ...", flush=True)
        try:
            value = fn(*fargs)
        except Exception as exc:  # a section that breaks (e.g. mid-redesign) must not lose the others
            errors.append(name)
            value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            print(f"  {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
        value["seconds"] = time.perf_counter() - t0
        return value

    if "step" in args.sections:
        results["steps"] = {}
        for preset in args.presets:
            b, t = shapes.get(preset, (None, None))
            results["steps"][preset] = run(f"step {preset}", _in_child, isolate, step_section, preset, b, t,
                                           str(dev), repeats, max(1, warmup), args.amp, threads)
    if "tscale" in args.sections:
        lengths = tuple(args.tscale or mode["tscale"])
        results["tscale"] = run("tscale", _in_child, isolate, tscale_section, ref, ref_b, lengths, str(dev),
                                repeats, max(1, warmup), args.amp, threads)
    if "aggregator" in args.sections:
        results["aggregator"] = run("aggregator", _in_child, isolate, aggregator_section, ref, ref_b, ref_t,
                                    str(dev), repeats, max(1, warmup), args.amp, threads)
    with tempfile.TemporaryDirectory(prefix="aime-run-all-") as tmp:
        if "collect" in args.sections:
            steps = args.collect_steps or mode["collect_steps"]
            results["collect"] = run("collect", collect_section, args.env, steps, 1 if args.quick else 2, Path(tmp))
            torch.set_num_threads(threads)
        if "data" in args.sections:
            defaults = [Path("data/cheetah-run/train"), Path("data/cheetah-run/train.h5")]
            path = args.data or next((p for p in defaults if p.exists()), None)
            if path is None and "data_path" in results.get("collect", {}):
                path = Path(results["collect"]["data_path"])
            step_ref = results.get("steps", {}).get(ref, {})
            if path is None:
                results["data"] = {"error": "no data: give --data or include the collect section"}
                errors.append("data")
            else:
                results["data"] = run("data", data_section, path, ref, ref_b, ref_t,
                                      args.windows or mode["windows"], str(dev), step_ref.get("fps"),
                                      step_ref.get("batch"), args.quick)
        if "shipped" in args.sections:
            results["shipped"] = run("shipped", shipped_section, args.shipped_ref, ref, max(3, repeats),
                                     args.shipped_rounds or (1 if args.quick else 3), threads, str(dev),
                                     Path(tmp))
    if "imagine" in args.sections:
        results["imagine"] = run("imagine", _in_child, isolate, imagine_section, ref, str(dev),
                                 args.horizon or mode["horizon"], max(2, repeats), threads)

    results["meta"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["meta"]["seconds"] = time.perf_counter() - started
    results["meta"]["errors"] = errors
    results["ratios"] = summary_ratios(results)
    table, parts, ops = markdown_table(results), parts_table(results), top_ops_table(results)
    results["table_markdown"] = table
    results["parts_markdown"] = parts
    _write_json(out_path, results)

    m = results["meta"]
    print(f"\nAIME training-speed benchmarks ({'quick' if args.quick else 'full'} run, {m['date_utc']}, git {m['git']})")
    print(f"machine: {m['processor']}, {m['cpu_count']} cores, {threads} torch threads, device {m['device']}, "
          f"torch {m['torch']}; load average (1/5/15 min) before {_load(m['load_average_before'])}, "
          f"after {_load(m['load_average_after'])}")
    for preset, s in results.get("steps", {}).items():
        if "error" not in s and s["reduced"]:
            print(f"note: the {preset} preset ran at a reduced B={s['batch']}, T={s['seq']} "
                  f"(the preset's is B={s['preset_batch']}, T={s['preset_seq']})")
    print()
    print(table)
    if parts:
        print("\nShares of the profiled step (torch.profiler, "
              f"{next(iter(results['steps'].values())).get('profile', {}).get('time_kind', '')}; backward work "
              "is in 'per-task gradients' and, below, with the forward part it flows through):\n")
        print(parts)
        print("\nCostliest ops (self time):")
        print(ops)
    if args.compare:
        print(f"\nAgainst {args.compare}:\n")
        print(compare_table(json.loads(args.compare.read_text()), results))
    if args.update_readme:
        update_readme(args.update_readme, readme_block(results))
        print(f"\nupdated the run_all block of {args.update_readme}")
    print(f"\nwritten {out_path} in {results['meta']['seconds']:.0f} s" + (f"; FAILED: {', '.join(errors)}" if errors else ""))
    return 1 if errors else 0


def _load(values: list[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "n/a"


if __name__ == "__main__":
    raise SystemExit(main())
