"""Training progress: images per second with the clock stopped outside training, a
one-line progress bar on a terminal (plain log lines otherwise), and the profiler window.

Not keras.utils.Progbar: it prints per-sample averages of the values it is given, while the
loop reports windows of many steps read from the device at once; the bar here is a few lines.
"""

from __future__ import annotations

import sys
import time

from absl import logging


def is_tty() -> bool:
    return sys.stderr.isatty()


class Throughput:
    """Training images per second, with the clock stopped during evaluation and saving."""

    def __init__(self, batch_size, start_step):
        self.batch, self.t0 = batch_size, time.time()
        self.train_seconds, self.images = 0.0, 0
        self._since, self._step = time.time(), start_step
        self._window = [0.0, 0]  # seconds, images since the last log line
        self._epoch = [0.0, 0]

    def stop(self, step):
        dt, n = time.time() - self._since, (step - self._step) * self.batch
        self.train_seconds += dt
        self.images += n
        for acc in (self._window, self._epoch):
            acc[0] += dt
            acc[1] += n
        self._since, self._step = time.time(), step

    def start(self):
        self._since = time.time()

    @staticmethod
    def _rate(acc):
        rate = acc[1] / acc[0] if acc[0] > 0 else 0.0
        acc[0], acc[1] = 0.0, 0
        return rate

    def window_rate(self):
        return self._rate(self._window)

    def epoch_rate(self):
        return self._rate(self._epoch)

    def total_rate(self):
        return self.images / self.train_seconds if self.train_seconds > 0 else 0.0

    def wall_seconds(self):
        return time.time() - self.t0


class Progress:
    """A one-line progress bar on a terminal; plain log lines otherwise."""

    def __init__(self, total, start, enabled=True):
        self.total, self.enabled, self.tty = total, enabled, is_tty()
        self.start = start

    def update(self, step, loss, acc, ips, lr, skipped):
        if not self.enabled:
            return
        text = (f"step {step}/{self.total} loss {loss:.4f} acc {acc:.4f} "
                f"{ips:.1f} img/s lr {lr:.4g}" + (f" skipped {skipped}" if skipped else ""))
        if self.tty:
            width = 30
            done = int(width * step / self.total)
            sys.stderr.write(f"\r[{'=' * done}{'.' * (width - done)}] {text}   ")
            sys.stderr.flush()
        else:
            logging.info(text)

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


class ProfilerWindow:
    """--profile_steps=A,B: a TensorFlow profiler trace of training steps A to B (1-based,
    inclusive) into logdir (model_dir/tensorboard), which TensorBoard's Profile tab reads.

    The loop's calls end at step A-1 and at step B (train.call_end), so the trace holds
    exactly those steps; a resumed run traces the part of A..B it still runs. The profiler
    is TensorFlow's own (tf.profiler.experimental), as Keras' TensorBoard(profile_batch=)
    uses it; this class only decides when it starts and stops."""

    def __init__(self, steps: tuple[int, int] | None, logdir: str, enabled: bool):
        self.first, self.last = steps or (0, -1)
        self.logdir, self.enabled, self.active = logdir, enabled and steps is not None, False

    def before_call(self, step: int) -> None:
        """step: the steps done so far; the call about to run starts with step + 1."""
        if self.enabled and not self.active and self.first <= step + 1 <= self.last:
            import tensorflow as tf  # noqa: PLC0415

            tf.profiler.experimental.start(self.logdir)
            self.active = True
            logging.info("profiling steps %d to %d into %s", step + 1, self.last, self.logdir)

    def after_call(self, step: int) -> None:
        if self.active and step >= self.last:
            self.close()
            logging.info("profiler trace written (TensorBoard --logdir=%s, Profile tab)",
                         self.logdir)

    def close(self) -> None:
        if self.active:
            import tensorflow as tf  # noqa: PLC0415

            self.active = False
            tf.profiler.experimental.stop()
