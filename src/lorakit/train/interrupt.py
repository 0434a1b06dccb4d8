"""Ctrl-C (SIGINT) and SIGTERM during training: stop at a step boundary with a checkpoint.

While :class:`StopSignals` is active (the whole :class:`~lorakit.train.trainer.Trainer` run):

* before the loop starts (model loading, data) there is nothing to save, so a signal stops at
  once with :class:`TrainingInterrupted`;
* inside the loop the first signal only sets :attr:`StopSignals.signum`. The loop finishes the
  step it is in (or, on one process, doesn't start the next), writes a checkpoint of that step
  boundary and raises :class:`TrainingInterrupted`. A checkpoint written there is the same state
  a periodic one would be, so ``--resume`` continues bit-identically;
* a second signal more than :data:`REPEAT_SECONDS` later stops at once without saving (the
  last complete checkpoint stays as it was: checkpoints are written atomically). Closer repeats
  are the same request delivered twice: in a terminal Ctrl-C reaches every process of the
  foreground group, and torchrun then forwards it to its workers again.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from lorakit.errors import LorakitError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_SECONDS = 2.0


class TrainingInterrupted(LorakitError):
    """SIGINT/SIGTERM stopped training; ``checkpoint`` is the newest complete checkpoint (or None)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None,
                 saved: bool = False, total_steps: int | None = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.saved, self.total_steps = saved, total_steps
        super().__init__(self.describe())

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum

    def describe(self) -> str:
        if self.step is None:  # during set-up (loading the model or data)
            where = "before training started"
        elif self.step == 0:
            where = "before the first training step"
        else:
            where = f"after step {self.step}" + (f" of {self.total_steps}" if self.total_steps else "")
        if self.checkpoint is None:
            return f"interrupted ({self.signal_name}) {where}; nothing was saved"
        return f"interrupted ({self.signal_name}) {where}; " \
            + ("checkpoint saved: " if self.saved else "newest checkpoint: ") + str(self.checkpoint)


class StopSignals:
    """Context manager that turns SIGINT/SIGTERM into a stop request (see the module docstring).

    Installs its handlers only in the main thread (Python's rule for signal handlers) and restores
    the previous ones on exit; elsewhere, or with ``enabled=False``, it does nothing.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None  # the pending stop request
        self.deferring = False  # True inside the loop: a signal waits for the step boundary
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if not self.deferring:
            raise TrainingInterrupted(signum)
        if self.signum is None:
            self.signum, self._first_at = signum, now
            return
        if now - self._first_at > REPEAT_SECONDS:  # asked again: stop now, keep the last checkpoint
            raise TrainingInterrupted(signum)
