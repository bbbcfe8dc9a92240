"""Two CPU kernels of the training step against PyTorch's own: the Gaussian pixel likelihood and attention.

    python benchmarks/cpu_kernels.py
    python benchmarks/cpu_kernels.py --threads 2 --repeats 30 --json /tmp/kernels.json

On the CPU, ``DiscretizedGaussian.channel_log_probs`` takes the bin masses from erfc and calls log_ndtr
only on the bins more than six scales off the mean; ``exact=True`` is the log_ndtr path on every element
(what runs off the CPU). ``perceiver_io.encoder.attend_math`` is two matmuls and a float32 softmax, which
``attend`` takes for bf16 on the CPU; the alternative is ``F.scaled_dot_product_attention`` (PyTorch's CPU
flash kernel), which ``attend`` takes in float32 and off the CPU. Both pairs compute the
same function (tests/test_likelihoods.py, tests/test_perceiver_io.py). Each is timed forward plus backward
on the shapes of the cpu preset's step (4 windows of 16 frames: 64 frames and the 48 of the overshooting
decode; the Perceiver's three attention shapes), the two alternatives alternating call by call, and the
printed ratio (ours over PyTorch's median) is measured in one run. Nothing is asserted: this prints
measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from perceiver_io.encoder import attend_math
from VRNN.likelihoods import DiscretizedGaussian, quantize

# (name, N, heads, queries, keys, head width): the cpu preset's Perceiver attention at B x T = 4 x 16.
ATTENTION_SHAPES = (
    ("next-frame decoder (256 queries, 17 keys)", 60, 2, 256, 17, 32),
    ("frame encoder cross-attention (16 latents, 256 tokens)", 64, 2, 16, 256, 32),
    ("latent self-attention (16 x 16)", 64, 2, 16, 16, 32),
)


def _paired(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``repeats`` times after two untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats + 2):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def likelihood_rows(repeats: int, scale: float = 0.06) -> list[dict]:
    """Forward + backward of the Gaussian likelihood on [N, 3, 64, 64], residuals of about one ``scale``
    (a trained model's) with one pixel in fifty ten scales off (a misplaced limb)."""
    lik = DiscretizedGaussian()
    with torch.no_grad():
        lik.log_scale.fill_(math.log(scale))
    rows = []
    for n in (64, 48):
        g = torch.Generator().manual_seed(0)
        x = quantize(torch.rand(n, 3, 64, 64, generator=g) * 2 - 1)
        far = torch.rand(x.shape, generator=g) < 0.02
        means = (x + scale * torch.randn(x.shape, generator=g) * torch.where(far, 10.0, 1.0)).clamp(-1.2, 1.2)

        def run(exact: bool) -> None:
            m = means.clone().requires_grad_()
            lik.channel_log_probs(m, x, exact=exact).sum().backward()

        med = _paired({"ours": lambda: run(False), "torch": lambda: run(True)}, repeats)
        rows.append({"kernel": f"Gaussian likelihood, {n} frames", "ours_ms": 1e3 * med["ours"],
                     "torch_ms": 1e3 * med["torch"], "ratio": med["ours"] / med["torch"]})
    return rows


def attention_rows(repeats: int) -> list[dict]:
    """Forward + backward of attention on the Perceiver's shapes, float32 and under bf16 autocast."""
    rows = []
    for label, n, heads, nq, nk, d in ATTENTION_SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(n, heads, length, d, generator=g, requires_grad=True) for length in (nq, nk, nk))
        for bf16 in (False, True):
            def run(fn: Callable) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y = fn(q, k, v)
                y.float().sum().backward()

            med = _paired({"ours": lambda: run(attend_math), "torch": lambda: run(F.scaled_dot_product_attention)},
                          repeats)
            rows.append({"kernel": f"attention, {label}, {'bf16 autocast' if bf16 else 'float32'}",
                         "ours_ms": 1e3 * med["ours"], "torch_ms": 1e3 * med["torch"],
                         "ratio": med["ours"] / med["torch"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of each alternative (median)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = likelihood_rows(args.repeats) + attention_rows(args.repeats)
    print(f"{torch.get_num_threads()} threads, {args.repeats} paired calls, forward + backward, median ms")
    print(f"{'kernel':78s} {'ours':>8s} {'torch':>8s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['kernel']:78s} {r['ours_ms']:8.2f} {r['torch_ms']:8.2f} {r['ratio']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
