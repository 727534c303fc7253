"""SIGINT (Ctrl-C) and SIGTERM stop `lstm train` cleanly: the step under way finishes, a checkpoint
is written, and `TrainingInterrupted` says where and how to resume. A second signal stops at once
(SIGINT: KeyboardInterrupt; SIGTERM: the default action), losing only the work since the last
checkpoint, as SIGKILL does."""

from __future__ import annotations

import os
import signal
import threading

from . import distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Raised by `train` after it saved a checkpoint on SIGINT/SIGTERM; `exit_code` is 128 + signal."""

    def __init__(self, signum: int, run, checkpoint):
        self.signum, self.run, self.checkpoint = signum, run, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; saved checkpoint {checkpoint}; continue with "
                         f"`lstm train --resume {run}`")


class StopRequests:
    """While active (in the main thread), SIGINT/SIGTERM only record a request to stop."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        signal.signal(signum, signal.SIG_DFL)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    def requested(self) -> int:
        """The signal that asked to stop (0: none), on any rank, so that all ranks stop at the same step."""
        return distributed.max_over_ranks(self.signum or 0)
