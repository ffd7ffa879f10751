"""Issue #26 on one host: the end of a run and the words of a lost peer.

  * a stop signal after the run's record is complete is ignored up to the process's end
    (exit 0, not killed by SIGUSR1's default action, not 75);
  * a stop that lands on an epoch boundary keeps that epoch in history.csv;
  * the lost-worker line names the cause, not TensorFlow's "Graph execution error:";
  * a finished two-worker run leaves no error line on either worker.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cifar_dist.errors import peer_cause
from conftest import REPO, TINY_SYNTHETIC, env_for_subprocess, error_lines

# --------------------------------------------------------------------------- the lost-peer line

# What TensorFlow 2.21 raised on the survivor (stack lines cut): peer SIGKILLed, peer SIGSTOPped.
RESET = ("Graph execution error:\n\nDetected at node while/CollectiveReduceV2 defined at (most "
         "recent call last):\n\n\n\nCollective ops is aborted by: recvmsg:Connection reset by "
         "peer\nAdditional GRPC error information from remote target /job:worker/replica:0/"
         "task:1 while calling /tensorflow.WorkerService/RecvBuf:\n:UNKNOWN:Error received "
         "from peer  {grpc_message:\"recvmsg:Connection reset by peer\", grpc_status:14}\nThe "
         "error could be from a previous operation. Restart your program to reset.\n\t "
         "[[{{node while/CollectiveReduceV2}}]] [Op:__inference__loop_on_device_2074]")
UNHEALTHY = ("Graph execution error:\n\nDetected at node while/CollectiveReduceV2 defined at "
             "(most recent call last):\n\n\nCollective ops is aborted by: Error reported from "
             "/job:worker/task:1: The following tasks are unhealthy (stopped sending "
             "heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed. Check the "
             "task logs for an earlier error, or scheduler events (e.g. preemption, eviction) "
             "to debug further.\nThe error could be from a previous operation. Restart your "
             "program to reset.\n\t [[{{node while/CollectiveReduceV2}}]] [Op:__inference_x]")


@pytest.mark.parametrize("message, cause", [
    (RESET, "recvmsg:Connection reset by peer"),
    (UNHEALTHY, "The following tasks are unhealthy (stopped sending heartbeats): "
                "/job:worker/replica:0/task:1"),
    ("Graph execution error:\n\nCollective ops is aborted by: Deadline Exceeded",
     "Deadline Exceeded"),
    ("Socket closed", "Socket closed"),
    ("", "no message"),
])
def test_the_lost_peer_line_names_the_cause(message, cause):
    assert peer_cause(message) == cause
    assert "\n" not in peer_cause(message + "\nx" * 400) and len(peer_cause(RESET * 50)) <= 300


# --------------------------------------------------------------------------- signals at the end

LATE = r'''
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from cifar_dist import signals
signals.GRACE_SECONDS = 0.5
with signals.StopRequest("", until_exit=True) as stop:
    if sys.argv[2] == "finished":
        stop.finished()
        os.kill(os.getpid(), signal.SIGTERM)  # inside: no watchdog, no stop
        time.sleep(1.5)
# After: up to the end, and through Python's finalization, which resets Python-level
# handlers (not SIG_IGN) to SIG_DFL while TensorFlow may still be shutting down.
print("ignored" if all(signal.getsignal(s) == signal.SIG_IGN for s in signals.SIGNALS)
      else "not ignored", flush=True)
for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
    os.kill(os.getpid(), sig)
time.sleep(0.2)
print("alive", flush=True)
'''


@pytest.mark.parametrize("finished", [True, False])
def test_a_signal_after_the_record_is_complete_is_ignored_until_exit(tmp_path, finished):
    script = tmp_path / "late.py"
    script.write_text(LATE)
    r = subprocess.run([sys.executable, str(script), str(REPO),
                        "finished" if finished else "unfinished"],
                       capture_output=True, text=True, timeout=120, env=env_for_subprocess())
    if finished:
        assert r.returncode == 0 and r.stdout.split() == ["ignored", "alive"], r.stderr[-2000:]
        assert r.stderr.count("after the run finished: ignored") == 1, r.stderr[-2000:]
    else:  # the check can fail: an unfinished run's handlers are the previous ones again
        assert r.returncode == -signal.SIGUSR1 and r.stdout.split() == ["not", "ignored"]


RUN = [*TINY_SYNTHETIC, "--log_steps=4", "--synthetic_train_size=256", "--jit_compile=false"]


def start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "cifar_dist.main", *args], cwd=REPO,
                            env=env or env_for_subprocess(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def rest_of_output(proc, timeout):
    """What the process prints from here to its end. Not communicate(timeout=...): that
    reads the pipe's file descriptor and misses lines read_until's iteration has already
    buffered."""
    proc.wait(timeout=timeout)
    return proc.stdout.read()


def read_until(proc, pattern, timeout):
    lines, deadline, rx = [], time.monotonic() + timeout, re.compile(pattern)
    for line in proc.stdout:
        lines.append(line)
        if rx.search(line):
            return lines
        if time.monotonic() > deadline:
            break
    proc.kill()
    pytest.fail(f"no line matching {pattern!r}:\n" + "".join(lines[-40:]))


@pytest.mark.slow
def test_stop_signals_at_the_very_end_leave_a_finished_run_exit_0(tmp_path):
    proc = start([*RUN, "--train_steps=8", f"--model_dir={tmp_path}"])
    try:
        read_until(proc, r"test accuracy .* on \d+ images", 300)  # metrics.json is written
        while proc.poll() is None:  # SIGUSR1 until the process is gone
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.1)
        out = rest_of_output(proc, 60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert error_lines(out) == [] and "test_accuracy=" in out
    assert (tmp_path / "metrics.json").is_file()


def history_epochs(model_dir):
    with open(model_dir / "history.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_a_stop_on_an_epoch_boundary_keeps_that_epoch_in_history(tmp_path):
    # 4 steps an epoch, a log line every 4: every call ends on an epoch boundary, so the
    # stop is taken exactly there.
    args = [*RUN, "--train_steps=40", f"--model_dir={tmp_path}"]
    proc = start(args)
    try:
        read_until(proc, r" step (8|12|16|20)/40", 300)
        proc.send_signal(signal.SIGTERM)
        out = rest_of_output(proc, 120)
    finally:
        proc.kill()
    assert proc.returncode == 75, out[-3000:]
    step = int(re.search(r"at step (\d+); checkpoint saved", out).group(1))
    assert step % 4 == 0 and step < 40
    assert history_epochs(tmp_path) == list(range(1, step // 4 + 1))
    again = subprocess.run([sys.executable, "-m", "cifar_dist.main", *args], cwd=REPO,
                           env=env_for_subprocess(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert history_epochs(tmp_path) == list(range(1, 11))
    assert [h["epoch"] for h in json.loads((tmp_path / "metrics.json").read_text())["history"]] \
        == list(range(1, 11))


# --------------------------------------------------------------------------- a quiet end

@pytest.mark.multiworker
@pytest.mark.slow
def test_a_finished_two_worker_run_leaves_no_error_line(tmp_path):
    """The chief exports and evaluates for longer than TensorFlow's heartbeat timeout
    (10 s) while the other worker waits for it, instead of exiting."""
    from cifar_dist.preflight import free_ports  # noqa: PLC0415

    ports = free_ports(2)
    args = [*RUN, "--train_steps=4", "--export=true", "--synthetic_test_size=20000",
            "--strategy=multi_worker", "--collective_timeout=60", f"--model_dir={tmp_path}"]
    procs = []
    try:
        for i in range(2):
            tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                         "task": {"type": "worker", "index": i}}
            procs.append(start(args, env_for_subprocess(TF_CONFIG=json.dumps(tf_config))))
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    for out in outs:
        errors = [line for line in out.splitlines() if re.match(r"E\d{4} ", line)
                  and "cuInit" not in line and "cuda" not in line.lower()]
        assert errors == [] and error_lines(out) == [], "\n".join(errors) or out[-3000:]
    assert (tmp_path / "export").is_dir()
