"""Save on a signal and stop (docs/scaling.md#slurm): a cluster's notice before a time limit or a preemption.

The handler only records the signal. After each optimiser step the loop asks `SaveOnSignal.requested()`, which
reduces the record across ranks, so every rank sees the same answer at the same step even when only some of them
got the signal; the loop then saves the training state at the images seen so far and raises `TrainingInterrupted`,
which `ectune` turns into a message and exit code EXIT_INTERRUPTED.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from ..config import signal_names
from ..runtime import distributed as rt_dist

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; rerunning the command resumes


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving its state at `nimg` images; rerun the same command to resume."""

    def __init__(self, signal_name: str, nimg: int, state: Path) -> None:
        super().__init__(f"{signal_name} received: saved the training state {state} at {nimg / 1000:.3f} kimg "
                         f"({nimg} images) and stopped; rerun the same command to resume")
        self.signal_name, self.nimg, self.state = signal_name, nimg, state


class SaveOnSignal:
    """Handlers for `names` (--runtime.save-on-signal) that only record the signal, until `restore` puts the previous
    ones back (train() does so however its loop ends, so an aborted run never swallows a later SIGTERM). Off the
    main thread, where Python cannot install handlers, nothing is installed."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.received = 0  # the signal number, 0 = none
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in signal_names(names) or ():
            signum = getattr(signal, f"SIG{name}", None)
            if signum is not None:
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum

    def requested(self) -> int:
        """The signal any rank received (the largest number if several), 0 if none; a collective call when
        handlers are installed and there are several ranks, so every rank must call it at the same step."""
        if not self.previous:
            return 0
        return rt_dist.max_across_ranks(self.received)

    def restore(self) -> None:
        """Put the previous handlers back (main thread only)."""
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self.previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    @staticmethod
    def name(signum: int) -> str:
        try:
            return signal.Signals(signum).name
        except ValueError:
            return f"signal {signum}"
