"""Named pause points for fault-injection tests (``tests/test_fault_injection_training.py``).

Library code calls ``fault_point(name, step)`` at the moments where a kill is most harmful (inside a
checkpoint write, before the final evaluation). It does nothing unless the environment asks for it:

    AIME_FAULT_POINT=checkpoint:partial@2   pause at this point (only at step 2; without ``@N`` at any step)
    AIME_FAULT_MARKER=/tmp/reached          create this file on arrival (text: "<name> <step> <pid>"), then
                                            pause until the file is removed (the test's "go on")
    AIME_FAULT_PAUSE_S=60                   longest pause in seconds (default 60)

A test waits for the marker, sends its signal (SIGKILL, SIGTERM, SIGINT), and removes the marker when
the process should carry on. Each point pauses at most once per process.

The points, in the order they are reached:

``checkpoint:partial``   the temporary file of a numbered checkpoint is partly written
``checkpoint:written``   the temporary file is complete and synced, not yet renamed
``checkpoint:renamed``   ``step_N.pt`` is in place; ``latest.pt`` still names the previous step
``checkpoint:linked``    ``latest.pt`` (and ``best.pt``) name ``step_N.pt``; old ones not yet rotated
``final_evaluation``     training is over and its checkpoint saved; the final evaluation starts
``report``               the final evaluation is written; the plots and ``report.md`` start
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

__all__ = ["ENV_MARKER", "ENV_PAUSE", "ENV_POINT", "POINTS", "fault_point"]

logger = logging.getLogger(__name__)

ENV_POINT, ENV_MARKER, ENV_PAUSE = "AIME_FAULT_POINT", "AIME_FAULT_MARKER", "AIME_FAULT_PAUSE_S"
POINTS = ("checkpoint:partial", "checkpoint:written", "checkpoint:renamed", "checkpoint:linked",
          "final_evaluation", "report")

_fired: set[str] = set()


def fault_point(name: str, step: int | None = None) -> None:
    """Pause here when ``AIME_FAULT_POINT`` names this point (and step); otherwise return at once."""
    spec = os.environ.get(ENV_POINT)
    if not spec:
        return
    point, _, at = spec.partition("@")
    if point != name or name in _fired:
        return
    if at and (step is None or int(at) != int(step)):
        return
    _fired.add(name)
    marker = os.environ.get(ENV_MARKER)
    logger.warning("fault point %s reached at step %s (pid %d): pausing", name, step, os.getpid())
    if marker:
        tmp = Path(f"{marker}.{os.getpid()}.tmp")
        tmp.write_text(f"{name} {step} {os.getpid()}\n")
        os.replace(tmp, marker)
    deadline = time.monotonic() + float(os.environ.get(ENV_PAUSE, "60"))
    while time.monotonic() < deadline and (marker is None or Path(marker).exists()):
        time.sleep(0.02)
