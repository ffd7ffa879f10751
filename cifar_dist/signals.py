"""SIGTERM / SIGINT / SIGUSR1 (SLURM's pre-emption warning) -> a flag the training loop reads.

The loop finishes its step, the workers agree on the stop, a checkpoint is written and
the process exits 75. main.py installs this before TensorFlow starts, so a signal during
start-up is remembered, and again after the strategy exists, because
MultiWorkerMirroredStrategy installs a SIGTERM handler of its own that only records it.
"""

from __future__ import annotations

import signal

from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signal = None
        self._previous = {}
        self._depth = 0

    def install(self) -> "StopRequest":
        """(Re-)installs the handlers; safe to call again after a library replaced one."""
        for sig in SIGNALS:
            try:
                previous = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some tests): leave signals alone
                continue
            self._previous.setdefault(sig, previous)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum
        logging.warning("received %s: saving a checkpoint and stopping",
                        signal.Signals(signum).name)

    def __enter__(self):
        self._depth += 1
        return self.install()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            self._previous = {}
        return False
