"""The real training step of one preset under config overrides, paired against the preset as it is.

    python benchmarks/config_step.py --set perceiver_features=encoder --set attention_features=encoder
    python benchmarks/config_step.py --variant enc=perceiver_features=encoder,attention_features=encoder \
        --variant noperc=use_perceiver=False --repeats 12 --threads 2

Every variant is a full ``DMCVBTrainer`` step (four tasks, the aggregator, the discriminator step, the
EMA update; ``benchmarks/trainer_step.TrainerHarness``) on the same synthetic batch of the preset's B x T.
The timed steps alternate between the variants (A B A B ...), so a change in the machine's speed during
the run falls on all of them alike, and the printed ratio (each variant's median step time over the
baseline's) is measured in one run. Also printed: frames per second (B*T per second), the FLOPs of the
whole step per frame (``FlopCounterMode``: forward, backward, optimiser) and the parameter count.
Nothing is asserted: this prints measurements.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from VRNN.aime_config import AIMEConfig, parse_overrides


def _trainer_step_module():
    """benchmarks/trainer_step.py, loaded from its file (no sys.path edit), as run_all.py does."""
    path = Path(__file__).resolve().parent / "trainer_step.py"
    if "trainer_step" in sys.modules and getattr(sys.modules["trainer_step"], "__file__", None) == str(path):
        return sys.modules["trainer_step"]
    spec = importlib.util.spec_from_file_location("trainer_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["trainer_step"] = module
    spec.loader.exec_module(module)
    return module


_ts = _trainer_step_module()
TrainerHarness, step_config = _ts.TrainerHarness, _ts.step_config


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """'name=k1=v1,k2=v2' -> (name, {k1: v1, k2: v2})."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"expected NAME=KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return name, parse_overrides(rest.split(","))


def measure(preset: str, variants: dict[str, dict[str, Any]], repeats: int, device: torch.device,
            batch: int | None = None, seq: int | None = None) -> dict[str, Any]:
    """Median seconds per step of every variant (steps interleaved), fps, the step's GFLOP per frame."""
    base = step_config(preset, batch=batch, seq=seq)
    harnesses = {}
    for name, overrides in variants.items():
        config = AIMEConfig.from_dict({**base.to_dict(), **overrides})
        harnesses[name] = TrainerHarness(config, device)
    for h in harnesses.values():          # warm-up: allocator, first-call initialisations (codebook seeding)
        h.time_steps(repeats=1, warmup=1)
    times: dict[str, list[float]] = {name: [] for name in harnesses}
    for _ in range(repeats):
        for name, h in harnesses.items():
            t0 = time.perf_counter()
            h.step()                      # synchronises the device itself
            times[name].append(time.perf_counter() - t0)
    rows = {}
    reference = reference_fps = None
    for name, h in harnesses.items():
        # A variant may change B or T: its own frames per step count.
        frames = h.config.batch_size * h.config.sequence_length
        median = statistics.median(times[name])
        reference = reference or median
        reference_fps = reference_fps or frames / median
        flops, _ = h.count_flops()
        params = sum(p.numel() for p in h.trainer.model.parameters())
        rows[name] = {"overrides": variants[name], "frames_per_step": frames, "step_s": times[name],
                      "step_s_median": median, "fps": frames / median, "ratio_to_first": median / reference,
                      "fps_ratio_to_first": frames / median / reference_fps,
                      "gflop_per_frame": flops / frames / 1e9, "parameters_m": params / 1e6}
    return {"preset": preset, "batch": base.batch_size, "seq": base.sequence_length, "repeats": repeats,
            "threads": torch.get_num_threads(), "device": str(device), "variants": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", default="cpu", help="AIMEConfig preset (default cpu)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of a variant named 'set' (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                        help="a named variant (repeatable); the preset itself is always the first, 'preset'")
    parser.add_argument("--repeats", type=int, default=8, help="timed steps per variant (median reported)")
    parser.add_argument("--batch", type=int, default=None, help="B (default: the preset's)")
    parser.add_argument("--seq", type=int, default=None, help="T (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    variants: dict[str, dict[str, Any]] = {"preset": {}}
    try:
        if args.set:
            variants["set"] = parse_overrides(args.set)
        for text in args.variant:
            name, overrides = parse_variant(text)
            variants[name] = overrides
        for overrides in variants.values():      # validate every override before building anything
            AIMEConfig.preset(args.preset, **overrides)
    except ValueError as err:
        parser.error(str(err))
    if len(variants) < 2:
        parser.error("nothing to compare: give --set KEY=VALUE or --variant NAME=KEY=VALUE")
    result = measure(args.preset, variants, args.repeats, torch.device(args.device), args.batch, args.seq)
    print(f"{args.preset} preset, B={result['batch']}, T={result['seq']}, {result['threads']} threads, "
          f"{args.repeats} interleaved steps per variant")
    print(f"{'variant':12s} {'frames':>6s} {'s/step':>8s} {'ratio':>6s} {'frames/s':>9s} {'ratio':>6s} "
          f"{'GFLOP/frame':>12s} {'params (M)':>10s}  overrides")
    for name, row in result["variants"].items():
        print(f"{name:12s} {row['frames_per_step']:6d} {row['step_s_median']:8.3f} {row['ratio_to_first']:6.2f} "
              f"{row['fps']:9.1f} {row['fps_ratio_to_first']:6.2f} {row['gflop_per_frame']:12.3f} "
              f"{row['parameters_m']:10.3f}  {row['overrides']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
