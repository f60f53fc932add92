"""Preemption: turn SIGTERM / SIGINT into "save a checkpoint at the end of this step, then exit".

The handler only sets a flag; the loop reads it at step boundaries and all ranks agree (any rank
signalled means all stop), so the checkpoint is taken at the same step everywhere. A second SIGINT
restores the default handler and re-raises it: press Ctrl-C twice to quit without saving. A repeated
SIGTERM is only logged: under SLURM or an MPI launcher a process may be sent SIGTERM both directly
and by its launcher (torchrun forwards what it receives), and that must not cancel the save; a
launcher that wants a process gone sends SIGKILL after its grace period.

DataLoader workers ignore both signals (:mod:`lrqat_dist.data.loader`), so a signal sent to the whole
process group cannot kill them under the trainer.
"""
from __future__ import annotations

import logging
import os
import signal
from types import FrameType

logger = logging.getLogger(__name__)


class PreemptionGuard:
    """Context manager installing the handlers (main thread only) and restoring the old ones on exit."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested: int | None = None  # the signal received, if any
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum != signal.SIGINT:
            logger.warning("received %s again: still saving a checkpoint before exiting",
                           signal.Signals(signum).name)
            return
        if self.requested is not None:
            logger.warning("second %s: exiting without a checkpoint", signal.Signals(signum).name)
            self._restore()
            os.kill(os.getpid(), signum)
            return
        self.requested = signum
        logger.warning("received %s: will save a checkpoint at the end of this step and exit",
                       signal.Signals(signum).name)

    def __enter__(self) -> "PreemptionGuard":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()
