"""Train the AIME world model on an existing (or freshly collected) DMC dataset; evaluate checkpoints.

    python VRNN/training_vrnn.py --env humanoid_walk --batch-size 8
    python VRNN/training_vrnn.py --resume --run-dir runs/cheetah-run/exp1     # the run's own settings
    python VRNN/training_vrnn.py --env cheetah-run --eval-only --load-checkpoint runs/.../checkpoints/best.pt
    torchrun --nproc_per_node 4 VRNN/training_vrnn.py --env walker-walk --preset paper --batch-size 32

Runs unchanged under ``torchrun`` (data parallel; --batch-size is the global batch). Writes config.json,
metrics.jsonl, eval.json and checkpoints/ (plots with --visualize-attention / --save-visualizations).
``--eval-only`` evaluates the checkpoint's EMA weights with the checkpoint's own config and writes
eval.json to --run-dir (default: <checkpoint run>/eval_only). Exit codes as in VRNN/main.py.
"""

from __future__ import annotations

import sys

from VRNN.run_setup import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "Train (or --eval-only evaluate) the AIME world model on a DMC dataset.", report=False)


if __name__ == "__main__":
    sys.exit(main())
