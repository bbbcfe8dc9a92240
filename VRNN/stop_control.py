"""When training should stop early: signals (SLURM preemption), a wall-clock budget, a stop file.

SIGTERM, SIGINT and SIGUSR1 do not interrupt a step: the handler records the request and the trainer
saves a checkpoint at the next step boundary, then returns normally (scripts exit with code 0 so that a
SLURM ``--requeue`` job restarts and resumes; see ``VRNN/run_VRNN_minimum.sh``). A second SIGINT while a
stop is pending raises ``KeyboardInterrupt`` (the usual way out of a hung process).

The stop file exists for launchers whose signals do not reach the Python processes (``torchrun`` under
``srun`` on several nodes): creating the file asks every rank to stop at the next step boundary.

Outside the training loop (set-up, the final evaluation, plots and report) the scripts run inside
``raise_on_stop_signals()``: there a stop signal raises ``StopRequested``, which the scripts turn into a
one-line message and a clean exit instead of a silent death (SIGTERM's default) or a traceback (SIGINT's).
The training loop's ``StopController`` takes the signals over while it runs and hands them back after.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

__all__ = ["STOP_SIGNALS", "StopController", "StopRequested", "raise_on_stop_signals"]

logger = logging.getLogger(__name__)

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class StopController:
    """Collects stop requests; ``reason()`` is ``None`` while training may go on.

    Args:
        minutes: wall-clock budget counted from ``start()``; ``None`` for no budget.
        stop_file: path whose existence requests a stop; ``None`` for none.
    """

    def __init__(self, minutes: float | None = None, stop_file: Path | None = None) -> None:
        if minutes is not None and minutes <= 0:
            raise ValueError(f"minutes={minutes} is invalid: expected a positive budget")
        self.minutes = minutes
        self.stop_file = Path(stop_file) if stop_file is not None else None
        self.signal_name: str | None = None
        self._deadline: float | None = None
        self._previous: dict[int, object] = {}

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> StopController:
        """Start the budget clock and install the signal handlers (main thread only)."""
        if self.minutes is not None:
            self._deadline = time.monotonic() + 60.0 * self.minutes
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            logger.warning("not in the main thread: stop signals will not be caught")
        return self

    def close(self) -> None:
        """Restore the previous signal handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    # -- queries ------------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        self.signal_name = name
        logger.warning("%s received: will save a checkpoint at the next step boundary and stop", name)

    def reason(self) -> str | None:
        """``"signal:SIGTERM"``, ``"budget"``, ``"stop_file"`` or ``None``."""
        if self.signal_name is not None:
            return f"signal:{self.signal_name}"
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return "budget"
        if self.stop_file is not None and self.stop_file.exists():
            return "stop_file"
        return None

    def remaining_seconds(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())


class StopRequested(BaseException):
    """A stop signal arrived outside the training loop (see ``raise_on_stop_signals``).

    A ``BaseException`` like ``KeyboardInterrupt``, so that an ``except Exception`` in evaluation or
    plotting code cannot swallow it.
    """

    def __init__(self, signal_name: str, phase: str | None = None) -> None:
        super().__init__(f"{signal_name} received")
        self.signal_name = signal_name
        self.phase = phase  # what was running, when the code that catches it on the way out says so


@contextmanager
def raise_on_stop_signals() -> Iterator[None]:
    """Within the block, the first SIGTERM / SIGINT / SIGUSR1 raises ``StopRequested`` (later ones while it
    unwinds are logged and ignored); the previous handlers come back on exit. Outside the main thread,
    where Python cannot install handlers, the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised: list[str] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if raised:
            logger.warning("%s received while stopping: already stopping", name)
            return
        raised.append(name)
        raise StopRequested(name)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
