"""SIGTERM / SIGINT / SIGUSR1 (SLURM's pre-emption warning), in every phase of a run.

While the training loop runs (`with stop.deferring():`) a signal is a flag the loop reads
between calls: the workers agree on the stop, a checkpoint is written, the process exits 75.
In every other phase (start-up, data loading, cluster forming, building, export,
evaluation) the run checks the flag at each phase boundary (`stop.check()` raises
`Interrupted`), and a watchdog thread started by the signal ends the process
GRACE_SECONDS later if the main thread has not reached a boundary by then (stuck in a
call that never returns: a read that never ends), removing every temporary still being
written (atomic.remove_staged). Neither helps inside a call that holds the GIL (no Python
code runs at all): TensorFlow's cluster formation is one, so distribute.wait_for_workers
waits for the other workers in Python first, checking `current()` as it polls. The
handler never raises itself: an exception thrown into arbitrary library code (an
`import tensorflow` half done) turns into some other error.

main.py installs this before TensorFlow starts, and again after the strategy exists,
because MultiWorkerMirroredStrategy installs a SIGTERM handler of its own that only
records the signal (a SIGTERM in the second or so that TensorFlow takes to form a cluster
whose workers have all started is lost to it).

After the run's record is complete (`stop.finished()`: metrics, export and evaluation
written) a signal changes nothing: it is logged and ignored, and with `until_exit=True`
(main.py) that lasts until the process ends (SIG_IGN once the `with` is left), so a SIGUSR1
during the final line or TensorFlow's shutdown can neither kill a finished run (exit 138)
nor make it a failure.

Not tf.distribute.experimental.PreemptionCheckpointHandler: BUILD_NOTES.md ("What the
package writes itself") says why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from absl import logging

from cifar_dist import atomic
from cifar_dist.errors import Interrupted
from cifar_dist.run_dir import RunDir

# "Within about 2 seconds" (README): a command stuck in one call that long is ended here.
GRACE_SECONDS = 1.5

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# The StopRequests in force (`with StopRequest(...)`), innermost last: see current().
_ACTIVE = []


def current():
    """The StopRequest in force, or None (a tool or test that installed none).

    For code deep inside a phase (the wait for the cluster's workers, the evaluation's
    temporary folder) that must honour a signal or register a path, without every caller
    on the way (main, bench, evaluate, test helpers) passing the request down."""
    return _ACTIVE[-1] if _ACTIVE else None


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once. A KeyboardInterrupt (few libraries catch it) that
    carries the one-line error cli.run_command prints instead of a traceback."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def _ignore_late(signum, frame):
    """A signal after the run finished: nothing is left to save or stop."""
    logging.warning("received %s after the run finished: ignored", signal.Signals(signum).name)


class StopRequest:
    def __init__(self, model_dir: str = "", until_exit: bool = False):
        self.signal = None
        self.model_dir = model_dir
        self.until_exit = until_exit  # finished: keep ignoring signals after `with` (main.py)
        self.done = False
        self._deferring = False
        self._watchdog = None
        self._loop_took_over = False  # from then on the loop, not the watchdog, acts on a signal
        self._previous = {}
        self._depth = 0
        self._interruptible = False

    @contextlib.contextmanager
    def deferring(self):
        """Inside: a signal only sets `signal`; the training loop acts on it between calls."""
        self.check()
        self._deferring = self._loop_took_over = True
        try:
            yield self
        finally:
            self._deferring = False
        self.check()  # a signal in the loop's last moments: act on it now

    @contextlib.contextmanager
    def interruptible(self):
        """Inside: the handler raises Interrupted itself, ending a blocked read (a download
        from a server that went quiet) at once. Only around code of ours that expects it
        (cifar10_files' download loop): anywhere else the exception would land in a library."""
        self.check()
        self._interruptible = True
        try:
            yield self
        finally:
            self._interruptible = False

    def install(self) -> "StopRequest":
        """(Re-)installs the handlers; safe to call again after a library replaced one."""
        for sig in SIGNALS:
            try:
                previous = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some tests): leave signals alone
                continue
            self._previous.setdefault(sig, previous)
        return self

    def finished(self) -> None:
        """The run's record is complete: from here on a signal is logged and ignored."""
        self.done = True

    def _handle(self, signum, frame):
        if self.done:
            _ignore_late(signum, frame)
            return
        if self.signal is not None and signum == signal.SIGINT:
            raise StopNow(self.interrupted(signum))  # a second Ctrl-C stops at once
        self.signal = signum
        if self._deferring:
            logging.warning("received %s: saving a checkpoint and stopping",
                            signal.Signals(signum).name)
            return
        logging.warning("received %s: stopping", signal.Signals(signum).name)
        if self._interruptible:
            self._interruptible = False
            raise self.interrupted(signum)
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._hard_exit, args=(signum,),
                                              daemon=True)
            self._watchdog.start()

    def check(self) -> None:
        """A phase boundary outside the loop: a signal received so far ends the run here."""
        if self.signal is not None and not self._deferring:
            raise self.interrupted(self.signal)

    def interrupted(self, signum: int) -> Interrupted:
        """The error a stop outside the loop ends with (75 with a checkpoint, else 76)."""
        return Interrupted(signum, self.model_dir,
                           bool(self.model_dir) and RunDir(self.model_dir).has_checkpoint())

    def _hard_exit(self, signum):
        """The main thread had GRACE_SECONDS to reach a phase boundary; it is stuck: end here."""
        threading.Event().wait(GRACE_SECONDS)
        # The request in force now (a command's outer one may have started this watchdog
        # before the run's own took over): its model_dir decides 75 or 76.
        request = current()
        if (request is None or request._loop_took_over or self._loop_took_over
                or request.done or self.done):
            return  # the command ended, the loop started (it stops at a call boundary), or
            # the run finished
        atomic.remove_staged()
        e = request.interrupted(signum)
        os.write(2, f"cifar_dist: {e} (forced after {GRACE_SECONDS:.0f} s)\n".encode())
        os._exit(e.exit_code)

    def __enter__(self):
        self._depth += 1
        if self._depth == 1:
            outer = current()
            if outer is not None and outer.signal is not None and self.signal is None:
                self.signal = outer.signal  # came before this one was in: the next check() acts
            _ACTIVE.append(self)
        return self.install()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            outer = current()
            if outer is not None and self.signal is not None and outer.signal is None:
                # Not lost on the way out: the command's own request ends it (or its watchdog)
                outer.signal, outer.model_dir = self.signal, outer.model_dir or self.model_dir
            if outer is not None and self.done and self.until_exit:
                # A finished run: the command's own request ignores signals up to the end too
                # (else leaving it would restore the default handlers, which kill)
                outer.done = outer.until_exit = True
            for sig, handler in self._previous.items():
                if self.done and self.until_exit:  # up to the process's end (main.py):
                    # SIG_IGN, not a Python function: Python's finalization resets those to
                    # SIG_DFL while TensorFlow is still shutting down (a SIGUSR1 kills then)
                    handler = signal.SIG_IGN
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            self._previous = {}
        return False
