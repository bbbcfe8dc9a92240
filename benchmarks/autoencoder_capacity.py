"""How well the world model's encoder and decoder can reconstruct an environment's frames on their own.

    python benchmarks/autoencoder_capacity.py --data-dir data/walker-walk --minutes 5
    python benchmarks/autoencoder_capacity.py --data-dir data/walker-walk --minutes 5 --window 16
    python benchmarks/autoencoder_capacity.py --data-dir data/walker-walk --minutes 5 --code-dim 16 \
        --set decoder_channels=32

A diagnostic for a world model that does not learn an environment: is the image model the bottleneck,
or the latent machinery around it? The preset's ``NVAEEncoder`` and ``NVAEDecoder`` (the same classes
and sizes as the world model) are trained as a plain deterministic autoencoder, frame by frame, with the
mean squared error on [-1, 1] and Adam at the preset's learning rate: x -> encoder -> f -> a linear code of
``--code-dim`` numbers (default: latent_dim + hidden_dim, what the decoder reads in the world model) ->
decoder (a uniform attention map) -> the Gaussian mean. No KL, no recurrence, no other task. Every
``--eval-every`` steps it prints the PSNR on frames of the test split beside the PSNR of the mean
training frame (the baseline that ignores the input), and writes the curve and a picture of test frames
and their reconstructions to ``--out``. Nothing is asserted: it prints measurements.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from VRNN.aime_config import PRESETS, AIMEConfig, parse_overrides
from VRNN.dmc_dataset import DMCVBDataset
from VRNN.dmc_vb_transition_dynamics_trainer import write_json_atomic
from VRNN.nvae import NVAEDecoder, NVAEEncoder


class FrameAutoencoder(nn.Module):
    """x [N, 3, S, S] in [-1, 1] -> reconstruction [N, 3, S, S] through a ``code_dim`` linear code."""

    def __init__(self, config: AIMEConfig, code_dim: int) -> None:
        super().__init__()
        self.encoder = NVAEEncoder.from_config(config)
        self.code = nn.Linear(self.encoder.feature_dim, code_dim)
        self.decoder = NVAEDecoder.from_config(config, code_dim, 3)
        self.register_buffer("uniform", torch.full((1, config.attention_resolution, config.attention_resolution),
                                                   1.0 / config.attention_resolution ** 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, _ = self.encoder(x)
        return self.decoder(self.code(f), self.uniform.expand(x.shape[0], -1, -1))


def frames_of(split: Path, limit: int) -> torch.Tensor:
    """Up to ``limit`` frames [N, 3, S, S] in [-1, 1] of a split folder, spread over its episodes."""
    data = DMCVBDataset(split, sequence_length=1)
    step = max(1, len(data) // limit)
    return torch.cat([data[i]["observations"] for i in range(0, len(data), step)][:limit])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over frames of the PSNR (dB) on the [0, 1] scale; a, b [N, 3, S, S] in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def save_picture(path: Path, truth: torch.Tensor, recon: torch.Tensor, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = truth.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for j in range(n):
        for i, img in enumerate((truth[j], recon[j].clamp(-1, 1))):
            axes[i, j].imshow(((img.permute(1, 2, 0) + 1) / 2).numpy())
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    axes[0, 0].set_ylabel("truth")
    axes[1, 0].set_ylabel("recon")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True, help="dataset folder with train/ and test/ splits")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="size preset (default cpu)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="AIMEConfig override, e.g. decoder_channels=32 (repeatable)")
    parser.add_argument("--code-dim", type=int, default=None,
                        help="numbers in the code (default: latent_dim + hidden_dim of the preset)")
    parser.add_argument("--batch", type=int, default=32, help="frames per step (default 32, the cpu preset's B*T)")
    parser.add_argument("--window", type=int, default=1,
                        help="draw each batch as batch/window runs of this many consecutive frames of one episode "
                             "(the world model's 2 x 16 is --window 16); default 1: independent frames")
    parser.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget")
    parser.add_argument("--eval-every", type=int, default=200, help="steps between test evaluations")
    parser.add_argument("--eval-frames", type=int, default=256, help="test frames scored")
    parser.add_argument("--train-frames", type=int, default=4096, help="training frames held in memory")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for curve.json and reconstruction.png")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.batch < 1 or args.eval_every < 1 or args.window < 1:
        parser.error("--minutes, --batch, --window and --eval-every must be positive")
    if args.batch % args.window:
        parser.error(f"--batch {args.batch} is not a multiple of --window {args.window}")
    try:
        overrides = parse_overrides(args.set)
        config = AIMEConfig.preset(args.preset, **overrides)
    except ValueError as err:
        parser.error(str(err))
    splits = {}
    for split, legacy in (("train", "train.h5"), ("test", "eval.h5")):
        candidates = [args.data_dir / split, args.data_dir / legacy]      # split folders, or the old single files
        found = [c for c in candidates if c.exists()]
        if not found:
            parser.error(f"neither {candidates[0]} nor {candidates[1]} exists; collect the data first "
                         f"(python VRNN/collect_dmc.py --env ... --out {args.data_dir})")
        splits[split] = found[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    code_dim = args.code_dim or config.latent_dim + config.hidden_dim
    train = frames_of(splits["train"], args.train_frames)
    windows = DMCVBDataset(splits["train"], sequence_length=args.window) if args.window > 1 else None
    test = frames_of(splits["test"], args.eval_frames)
    mean_frame = train.mean(0, keepdim=True)
    baseline = psnr(mean_frame.expand_as(test), test)
    model = FrameAutoencoder(config, code_dim)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{args.data_dir.name}: {len(train)} training frames, {len(test)} test frames; code {code_dim}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; mean training frame "
          f"{baseline:.2f} dB on the test frames")
    curve, step, start = [], 0, time.perf_counter()
    deadline = start + 60 * args.minutes
    while True:
        done = time.perf_counter() >= deadline
        if step % args.eval_every == 0 or done:
            model.eval()
            with torch.no_grad():
                recon = torch.cat([model(chunk) for chunk in test.split(64)])
            model.train()
            curve.append({"step": step, "seconds": round(time.perf_counter() - start, 1),
                          "test_psnr": psnr(recon, test)})
            print(f"step {step:6d}  {curve[-1]['seconds']:7.1f} s  test PSNR {curve[-1]['test_psnr']:.2f} dB "
                  f"(mean frame {baseline:.2f})", flush=True)
            if args.out:  # after every evaluation, so that an interrupted run keeps its curve
                args.out.mkdir(parents=True, exist_ok=True)
                write_json_atomic(args.out / "curve.json", {"config": overrides, "code_dim": code_dim,
                                                            "batch": args.batch, "window": args.window,
                                                            "mean_frame_psnr": baseline, "curve": curve})
        if done:
            break
        if windows is None:
            batch = train[torch.randint(0, len(train), (args.batch,), generator=gen)]
        else:
            picks = torch.randint(0, len(windows), (args.batch // args.window,), generator=gen).tolist()
            batch = torch.cat([windows[i]["observations"] for i in picks])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.amp):   # --set amp=true: bf16
            out = model(batch)
        loss = F.mse_loss(out.float(), batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        if step % args.eval_every == 0 and not math.isfinite(loss.item()):
            raise SystemExit(f"the loss became {loss.item()} at step {step}; try a lower learning rate")
    if args.out:
        pick = torch.linspace(0, len(test) - 1, 8).long()
        save_picture(args.out / "reconstruction.png", test[pick], recon[pick],
                     f"{args.data_dir.name}: autoencoder after {step} steps, {curve[-1]['test_psnr']:.1f} dB")


if __name__ == "__main__":
    main()
