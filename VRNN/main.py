"""The whole AIME job on one DMC task: collect the dataset if it is missing, train, evaluate, plot, report.

    python VRNN/main.py --env cheetah-run                       # cpu preset, data/cheetah-run, runs/...
    python VRNN/main.py --env walker_walk --preset paper --device cuda --minutes 240
    python VRNN/main.py --resume --run-dir runs/cheetah-run/20250101-120000   # the run's own settings

Outputs in the run directory: config.json, run.json, metrics.jsonl, eval.json, checkpoints/, plots/,
report.md. ``--resume --run-dir R`` needs no other flag: it reads R's config.json, checkpoint and run.json;
flags given with it must match the run, except those listed under --resume in --help.
Exit code 0 also when a signal, the --minutes budget or the stop file ended training early, or a signal
stopped the final evaluation or report (with a checkpoint to --resume from); 2 on bad input or a full
disk (one line); 3 when training stopped on non-finite losses; 128 + N when signal N stopped the set-up.
"""

from __future__ import annotations

import sys

from VRNN.run_setup import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, "AIME world model on DMC pixels: collect if missing, train, evaluate, plot, report.",
                   report=True)


if __name__ == "__main__":
    sys.exit(main())
