"""Ctrl-C during training: finish the step, save a checkpoint, stop."""

from __future__ import annotations

import signal
import threading

from tqdm.auto import tqdm


class StopOnCtrlC:
    """`with StopOnCtrlC() as stop:` the first Ctrl-C sets `stop.requested` (the loop saves
    and exits at the next step boundary); a second one raises KeyboardInterrupt."""

    def __enter__(self) -> "StopOnCtrlC":
        self.requested = False
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press again to abort without saving)")

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
