#!/usr/bin/env python3
"""Run N MultiWorkerMirroredStrategy workers on this host, one process each.

    python launch/local.py --num_workers=2 [--max_restarts=N] [--grace_seconds=S] -- \
        --flagfile=configs/smoke.cfg --model_dir=/tmp/run

Everything after `--` goes to `python -m cifar_dist.main`, behind `--strategy=multi_worker`
(so a later --strategy, on the command line or in a flagfile, wins). Each worker gets
TF_CONFIG naming every worker at localhost:<free port> and its own index; worker 0 is the
chief (it alone writes model_dir). Every output line of worker i is printed as
`[worker i] ...`, the launcher's own lines as `[launcher] ...`.

Failures: when a worker exits non-zero or is killed, the launcher sends SIGTERM to the
others, SIGKILL after --grace_seconds, says which worker failed first and how, and exits
with that worker's status (128+N when it was killed by signal N). With --max_restarts=N it
starts the whole group again (new ports) up to N times; the workers resume from the newest
checkpoint in model_dir. It does not restart after exit 2 (bad input), 4 (diverged) or 75
(stopped by a signal): a restart would fail the same way, or undo a requested stop.

Signals: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 sent to the launcher are forwarded to every
worker, which save a checkpoint and exit 75; the launcher then exits with their status.
A second signal is forwarded too (a second SIGINT makes the workers stop at once) and the
workers are killed --grace_seconds later; that is needed while a worker is still starting,
because TensorFlow swallows SIGTERM until training begins. Workers run in their own session
(a terminal's Ctrl-C reaches only the launcher, which forwards it once) and get SIGKILL if
the launcher itself dies without cleaning up (kill -9; Linux parent-death signal): no
worker outlives it (SIGTERM would not do: see above).

Exit status: 0 all workers exited 0; 2 bad launcher flags (one line on stderr) or a worker
rejected its input; 75 the workers stopped on a forwarded signal; otherwise the status of
the worker that failed first.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run as `python launch/local.py` from a checkout

# Light modules only (no TensorFlow in the launcher): the exit codes, ports and GPUs.
from cifar_dist.errors import (EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PEER_LOST,  # noqa: E402
                               EXIT_STOPPED, EXIT_STOPPED_EARLY)
from cifar_dist.preflight import free_ports, nvidia_smi_gpus  # noqa: E402

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
NO_RESTART = {EXIT_BAD_INPUT: "bad input: a restart would fail the same way",
              EXIT_DIVERGED: "the loss diverged: a restart from the same checkpoint would "
                             "diverge again",
              EXIT_STOPPED: "the workers were asked to stop",
              EXIT_STOPPED_EARLY: "the workers were asked to stop"}
MEANING = {1: "error, see its log", EXIT_BAD_INPUT: "bad input",
           EXIT_PEER_LOST: "lost another worker", EXIT_DIVERGED: "loss diverged",
           EXIT_STOPPED: "stopped by a signal after saving a checkpoint",
           EXIT_STOPPED_EARLY: "stopped by a signal before any checkpoint"}

# Runs in each worker before cifar_dist: ask Linux to send SIGKILL when the launcher dies
# (prctl PR_SET_PDEATHSIG survives exec), give up if it is already gone, then exec Python
# with the real command line, so the worker keeps this pid and `ps` shows the real command.
_BOOTSTRAP = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("launcher exited before the worker started")
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv):
    """Returns (launcher options, worker flags). Raises UsageError with one line."""
    if "--" in argv:
        cut = argv.index("--")
        own, worker_flags = argv[:cut], argv[cut + 1:]
    else:
        own, worker_flags = argv, []
    p = _Parser(prog="launch/local.py", allow_abbrev=False,
                description="Run N multi-worker training processes on this host.",
                epilog="Flags after -- go to python -m cifar_dist.main.")
    p.add_argument("--num_workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--max_restarts", type=int, default=0,
                   help="restart the whole group up to N times after a failure (default 0)")
    p.add_argument("--grace_seconds", type=float, default=15.0,
                   help="after SIGTERM, wait this long before SIGKILL (default 15)")
    p.add_argument("--gpus_per_worker", type=int, default=0,
                   help="give worker i its own slice of CUDA_VISIBLE_DEVICES "
                        "(default 0: every worker sees every GPU)")
    p.add_argument("--module", default="cifar_dist.main",
                   help="the module each worker runs with python -m (default cifar_dist.main)")
    args, unknown = p.parse_known_args(own)
    if unknown:
        raise UsageError(f"unknown launcher argument {unknown[0]!r}: put the flags for "
                         "cifar_dist.main after --")
    if not 1 <= args.num_workers <= 256:
        raise UsageError(f"--num_workers must be between 1 and 256, got {args.num_workers}")
    if args.max_restarts < 0:
        raise UsageError(f"--max_restarts must be >= 0, got {args.max_restarts}")
    if not args.grace_seconds >= 0:
        raise UsageError(f"--grace_seconds must be >= 0, got {args.grace_seconds}")
    if args.gpus_per_worker < 0:
        raise UsageError(f"--gpus_per_worker must be >= 0, got {args.gpus_per_worker}")
    return args, worker_flags


# --------------------------------------------------------------------------- set-up

def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def gpu_slices(num_workers: int, per_worker: int, environ=os.environ) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each worker (None: leave it as it is)."""
    if per_worker == 0:
        return [None] * num_workers
    if "CUDA_VISIBLE_DEVICES" in environ:
        visible = [d for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    else:
        visible = nvidia_smi_gpus(timeout=30)
        if visible is None:
            raise UsageError("--gpus_per_worker needs CUDA_VISIBLE_DEVICES or nvidia-smi "
                             "to list the GPUs")
    need = num_workers * per_worker
    if len(visible) < need:
        raise UsageError(f"--num_workers={num_workers} x --gpus_per_worker={per_worker} needs "
                         f"{need} GPUs but {len(visible)} are visible")
    return [",".join(visible[i * per_worker:(i + 1) * per_worker]) for i in range(num_workers)]


def worker_env(ports, index, cuda_devices, environ=os.environ) -> dict:
    env = dict(environ)
    env["TF_CONFIG"] = tf_config(ports, index)
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are written, in order
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + path if path else "")
    if cuda_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_devices
    return env


def describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}" + (f" ({MEANING[rc]})" if rc in MEANING else "")


def shell_status(rc: int) -> int:
    """A worker's return code as an exit status: 128+N for death by signal N."""
    return 128 - rc if rc < 0 else rc


# --------------------------------------------------------------------------- running

class Output:
    """Writes whole lines from several threads without interleaving them."""

    def __init__(self, stream=sys.stdout):
        self.stream, self.lock = stream, threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # our stdout is gone (e.g. piped into head): keep draining the workers

    def launcher(self, text: str) -> None:
        self.line(f"[launcher] {text}")

    def pump(self, index: int, pipe) -> None:
        prefix = f"[worker {index}] "
        for raw in iter(pipe.readline, b""):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self.line(prefix + text.rsplit("\r", 1)[-1])  # keep a progress bar's last state
        pipe.close()


class Launcher:
    def __init__(self, args, worker_flags, out: Output):
        self.args, self.worker_flags, self.out = args, worker_flags, out
        self.signals: list[int] = []   # launcher signals not handled yet
        self.stop_signal = None        # the first forwarded signal: no restart after it
        self.procs: list[subprocess.Popen] = []

    # -- signals arrive on the main thread; the handler only records them
    def _on_signal(self, signum, frame):
        self.signals.append(signum)

    def install_signal_handlers(self):
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _live(self):
        return [(i, p) for i, p in enumerate(self.procs) if p.poll() is None]

    def _send(self, sig, procs):
        for _, p in procs:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass

    def _kill_deadline(self, current):
        """The earlier of the current SIGKILL deadline and grace_seconds from now."""
        soon = time.monotonic() + self.args.grace_seconds
        return soon if current is None else min(current, soon)

    def command(self) -> list[str]:
        return [sys.executable, "-c", _BOOTSTRAP, str(os.getpid()),
                "-m", self.args.module, "--strategy=multi_worker", *self.worker_flags]

    def start_group(self, attempt: int) -> queue.Queue:
        n = self.args.num_workers
        ports = free_ports(n)
        cuda = gpu_slices(n, self.args.gpus_per_worker)
        total = self.args.max_restarts + 1
        self.out.launcher(f"attempt {attempt} of {total}: starting {n} worker(s) on localhost "
                          f"ports {', '.join(map(str, ports))}")
        exits: queue.Queue = queue.Queue()
        self.procs, self.threads = [], []
        for i in range(n):
            proc = subprocess.Popen(self.command(), env=worker_env(ports, i, cuda[i]),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(proc)
            self.out.launcher(f"worker {i} pid {proc.pid}"
                              + (f" CUDA_VISIBLE_DEVICES={cuda[i]}" if cuda[i] is not None else ""))
            for target, a in ((self.out.pump, (i, proc.stdout)),
                              (lambda j, p: exits.put((j, p.wait())), (i, proc))):
                t = threading.Thread(target=target, args=a, daemon=True)
                t.start()
                self.threads.append(t)
        return exits

    def run_group(self, attempt: int) -> tuple[int, bool]:
        """Runs one group to the end. Returns (exit status, whether a restart may help)."""
        exits = self.start_group(attempt)
        n = len(self.procs)
        status: dict[int, int] = {}
        first_failure = None
        kill_at = None  # when the survivors get SIGKILL
        while len(status) < n:
            while self.signals:
                sig = self.signals.pop(0)
                name = signal.Signals(sig).name
                live = self._live()
                if self.stop_signal is None:
                    self.stop_signal = sig
                    self.out.launcher(f"got {name}: forwarding it to {len(live)} worker(s); they "
                                      "save a checkpoint and exit 75 (send it again to stop "
                                      "them at once)")
                else:
                    self.out.launcher(f"got {name} again: forwarding it; SIGKILL in "
                                      f"{self.args.grace_seconds:g} s")
                    kill_at = self._kill_deadline(kill_at)
                self._send(sig, live)
            try:
                i, rc = exits.get(timeout=0.2)
            except queue.Empty:
                if kill_at is not None and time.monotonic() >= kill_at:
                    live = self._live()
                    if live:
                        self.out.launcher(
                            f"worker(s) {', '.join(str(j) for j, _ in live)} still running "
                            f"{self.args.grace_seconds:g} s after the signal: sending SIGKILL")
                        self._send(signal.SIGKILL, live)
                    kill_at = float("inf")  # once
                continue
            status[i] = rc
            self.out.launcher(f"worker {i} exited: {describe(rc)}")
            # 0: done (the chief may still be exporting). 75: the workers agreed on a stop,
            # so the others are saving and stopping too. After a first failure, later exits
            # are the survivors answering our SIGTERM.
            if rc in (0, EXIT_STOPPED, EXIT_STOPPED_EARLY) or first_failure is not None:
                continue
            first_failure = (i, rc)
            live = self._live()
            if live:
                self.out.launcher(f"worker {i} failed first: {describe(rc)}; stopping "
                                  f"worker(s) {', '.join(str(j) for j, _ in live)} "
                                  f"(SIGTERM, SIGKILL after {self.args.grace_seconds:g} s)")
                self._send(signal.SIGTERM, live)
                kill_at = self._kill_deadline(kill_at)
        for t in self.threads:
            t.join(timeout=5)
        codes = [status[i] for i in range(n)]
        if first_failure is not None:
            i, rc = first_failure
            self.out.launcher(f"FAILED: worker {i} failed first: {describe(rc)}; "
                              f"exit statuses {codes}")
            if rc in NO_RESTART and self.args.max_restarts:
                self.out.launcher(f"not restarting: {NO_RESTART[rc]}")
            return shell_status(rc), rc not in NO_RESTART and self.stop_signal is None
        if all(rc == 0 for rc in codes):
            self.out.launcher(f"all {n} worker(s) finished (exit status 0)")
            return 0, False
        self.out.launcher(f"stopped: workers exited {codes} (75: checkpoint saved; run the same "
                          "command again to resume)")
        return EXIT_STOPPED, False

    def run(self) -> int:
        code = 0
        for attempt in range(1, self.args.max_restarts + 2):
            code, may_restart = self.run_group(attempt)
            if code == 0 or not may_restart:
                return code
            if attempt <= self.args.max_restarts:
                time.sleep(1.0)  # let the failed group's sockets close
                if self.signals or self.stop_signal is not None:
                    return code
                self.out.launcher(f"restarting the group (restart {attempt} of "
                                  f"{self.args.max_restarts}); the workers resume from the "
                                  "newest checkpoint in model_dir")
        if self.args.max_restarts:
            self.out.launcher(f"giving up after {self.args.max_restarts} restart(s)")
        return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, worker_flags = parse_args(argv)
        gpu_slices(args.num_workers, args.gpus_per_worker)  # fail early on a bad GPU request
    except UsageError as e:
        print(f"launch/local.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    launcher = Launcher(args, worker_flags, Output())
    launcher.install_signal_handlers()
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
