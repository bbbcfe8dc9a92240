"""The whole AIME job on one DMC task: collect the dataset if it is missing, train, evaluate, plot, report.

    python VRNN/main.py --env cheetah-run                       # cpu preset, data/cheetah-run, runs/...
    python VRNN/main.py --env walker_walk --preset paper --device cuda --minutes 240
    python VRNN/main.py --env cheetah-run --resume --run-dir runs/cheetah-run/20250101-120000

Outputs in the run directory: config.json, metrics.jsonl, eval.json, checkpoints/, plots/, report.md.
Exit code 0 also when a signal, the --minutes budget or the stop file ended training early (with a
checkpoint to --resume from); 2 on bad input; 3 when training stopped on non-finite losses.
"""

from __future__ import annotations

import sys

from VRNN.run_setup import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "AIME world model on DMC pixels: collect if missing, train, evaluate, plot, report.",
                   report=True)


if __name__ == "__main__":
    sys.exit(main())
