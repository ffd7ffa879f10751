"""launch/local.py: N workers on localhost, failure handling, restarts, signal forwarding.

Two kinds of test:
  * fake workers (a few lines of Python, no TensorFlow): flags, prefixes, failure, restart,
    signal forwarding and clean-up, each in a second or two;
  * real cifar_dist workers (MultiWorkerMirroredStrategy, tiny model, synthetic data, no
    XLA so the first step compiles fast): a run to completion, a killed worker, a restart
    that resumes from a checkpoint, and a SIGTERM that ends in a checkpoint.
Every wait is bounded; at the end of each test any process it started is killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiworker,
              pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; Linux only")]

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local.py"

# Real workers: tiny model, synthetic data, no XLA (the first step then takes ~5 s, not ~25).
TINY = ["--model=tiny", "--dataset=synthetic", "--synthetic_train_size=256",
        "--synthetic_test_size=64", "--batch_size=64", "--jit_compile=false",
        "--export=false", "--enable_tensorboard=false", "--log_steps=1",
        "--collective_timeout=30"]

FAKE_WORKER = r'''
import json, os, signal, sys, time
cfg = json.loads(os.environ["TF_CONFIG"])
i = cfg["task"]["index"]
opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
stop = []
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(sig, lambda s, f: stop.append(s))
print(f"fake {i} argv {sys.argv[1:]} tf_config {json.dumps(cfg)}", flush=True)
marker = opts.get("fail_once")      # fail while this file does not exist, then create it
if opts.get("ignore_term") == str(i):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
for step in range(int(opts.get("steps", 5))):
    if stop and not opts.get("ignore_term") == str(i):
        print(f"fake {i} stopping on signal {stop[0]}", flush=True)
        sys.exit(75)
    if opts.get(f"fail{i}") == str(step) and not (marker and os.path.exists(marker)):
        if marker:
            open(marker, "w").close()
        print(f"fake {i} failing", file=sys.stderr, flush=True)
        sys.exit(int(opts.get("code", 3)))
    print(f"fake {i} step {step}", flush=True)
    time.sleep(float(opts.get("sleep", 0.1)))
print(f"fake {i} done", flush=True)
'''


class Launch:
    """launch/local.py in the background; its output collected line by line."""

    def __init__(self, args, env=None):
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), *args], cwd=REPO, env=env or dict(os.environ),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    @property
    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first output line matching pattern; fails (with the output) after timeout."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    pytest.fail(f"no line matching {pattern!r} within {timeout} s; output:\n"
                                + "\n".join(self.lines[-60:]))
                self.cond.wait(min(left, 0.5))

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"launcher still running after {timeout} s; output:\n"
                        + "\n".join(self.lines[-60:]))
        self.reader.join(timeout=10)
        return rc

    def worker_pids(self) -> dict[int, list[int]]:
        pids: dict[int, list[int]] = {}
        for m in re.finditer(r"^\[launcher\] worker (\d+) pid (\d+)", self.text, re.M):
            pids.setdefault(int(m.group(1)), []).append(int(m.group(2)))
        return pids

    def kill(self):
        """Kills the launcher and every worker it reported that is still ours and alive."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pids in self.worker_pids().values():
            for pid in pids:
                if _is_our_worker(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def _is_our_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"cifar_dist.main" in cmdline or b"fake_worker" in cmdline


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def launch():
    runs: list[Launch] = []

    def start(*args, env=None) -> Launch:
        run = Launch([str(a) for a in args], env=env)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


@pytest.fixture
def fake_env(tmp_path):
    (tmp_path / "fake_worker.py").write_text(FAKE_WORKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def worker_lines(text: str, index: int) -> list[str]:
    prefix = f"[worker {index}] "
    return [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]


# --------------------------------------------------------------------------- flags

@pytest.mark.parametrize("args, message", [
    (["--num_workers=0"], "--num_workers must be between 1 and 256"),
    (["--num_workers=two"], "invalid int value"),
    (["--max_restarts=-1"], "--max_restarts must be >= 0"),
    (["--grace_seconds=-5"], "--grace_seconds must be >= 0"),
    (["--model_dir=/tmp/x"], "put the flags for cifar_dist.main after --"),
    (["--gpus_per_worker=1", "--num_workers=2"], "--gpus_per_worker"),
])
def test_bad_launcher_flags_one_line_exit_2(args, message):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0", PATH="/nonexistent")
    result = subprocess.run([sys.executable, str(LAUNCHER), *args, "--", "--model_dir=/tmp/x"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch/local.py: error: "), result.stderr
    assert message in lines[0]
    assert result.stdout == ""


# --------------------------------------------------------------------------- fake workers

def test_fake_workers_get_tf_config_and_prefixed_lines(launch, fake_env):
    run = launch("--num_workers=3", "--module=fake_worker", "--", "--steps=3", env=fake_env)
    assert run.wait(60) == 0
    text = run.text
    configs = {}
    for i in range(3):
        lines = worker_lines(text, i)
        assert f"fake {i} done" in lines, text
        m = re.match(r"fake \d argv (\[.*\]) tf_config (.*)$", lines[0])
        argv, configs[i] = eval(m.group(1)), json.loads(m.group(2))  # noqa: S307 (our own repr)
        assert argv[0] == "--strategy=multi_worker" and argv[1:] == ["--steps=3"]
        assert configs[i]["task"] == {"type": "worker", "index": i}
    hosts = configs[0]["cluster"]["worker"]
    assert all(c["cluster"]["worker"] == hosts for c in configs.values())
    assert len(set(hosts)) == 3 and all(h.startswith("localhost:") for h in hosts)
    assert "[launcher] all 3 worker(s) finished (exit status 0)" in text


def test_failed_worker_stops_the_others_and_is_named(launch, fake_env):
    # worker 1 exits 3 at step 2; worker 0 ignores SIGTERM, so the launcher must SIGKILL it.
    run = launch("--num_workers=2", "--module=fake_worker", "--grace_seconds=1", "--",
                 "--steps=1000", "--fail1=2", "--code=3", "--ignore_term=0", env=fake_env)
    assert run.wait(30) == 3
    text = run.text
    assert "[launcher] worker 1 failed first: exit status 3" in text
    assert "sending SIGKILL" in text
    assert "[launcher] worker 0 exited: killed by SIGKILL" in text
    assert not any(_alive(p) for pids in run.worker_pids().values() for p in pids)


def test_restart_after_failure_uses_new_ports(launch, fake_env, tmp_path):
    run = launch("--module=fake_worker", "--max_restarts=2", "--grace_seconds=2", "--",
                 "--steps=4", "--fail1=1", f"--fail_once={tmp_path / 'failed'}", env=fake_env)
    assert run.wait(60) == 0
    text = run.text
    assert "restarting the group (restart 1 of 2)" in text
    ports = re.findall(r"attempt (\d) of 3: starting 2 worker\(s\) on localhost ports (.*)$",
                       text, re.M)
    assert [a for a, _ in ports] == ["1", "2"]
    assert ports[0][1] != ports[1][1]
    assert len(run.worker_pids()[0]) == 2


@pytest.mark.parametrize("code", [2, 4])
def test_no_restart_when_a_restart_cannot_help(launch, fake_env, code):
    run = launch("--module=fake_worker", "--max_restarts=3", "--", "--steps=4", "--fail0=0",
                 f"--code={code}", env=fake_env)
    assert run.wait(30) == code
    assert "restarting the group" not in run.text and "attempt 2" not in run.text
    assert "[launcher] not restarting: " in run.text
    assert f"worker 0 failed first: exit status {code}" in run.text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded_and_status_passed_back(launch, fake_env, sig):
    run = launch("--module=fake_worker", "--max_restarts=2", "--", "--steps=1000", env=fake_env)
    # both workers must have their handlers in place (under load one can start late)
    run.wait_for(r"^\[worker 0\] fake 0 step 2", 30)
    run.wait_for(r"^\[worker 1\] fake 1 step 2", 30)
    run.proc.send_signal(sig)
    assert run.wait(30) == 75
    text = run.text
    for i in range(2):
        assert f"fake {i} stopping on signal {int(sig)}" in text
    assert "restarting the group" not in text and "attempt 2" not in text


def test_workers_die_with_the_launcher(launch, fake_env):
    run = launch("--module=fake_worker", "--", "--steps=100000", env=fake_env)
    run.wait_for(r"^\[worker 1\] fake 1 step 1", 30)
    pids = [p for ps in run.worker_pids().values() for p in ps]
    run.proc.kill()  # no chance to clean up: the parent-death signal must do it
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


# --------------------------------------------------------------------------- real workers

def _read_metrics(model_dir: Path) -> dict:
    return json.loads((model_dir / "metrics.json").read_text())


def _epoch_rows(lines: list[str]) -> list[str]:
    """'epoch N: epoch=N, step=S, train_loss=L, ...' without the timestamps."""
    return [m.group(1) for line in lines
            for m in [re.search(r"(epoch \d+: epoch=\d+, step=\d+, train_loss=\S+)", line)] if m]


def test_two_workers_train_to_completion(launch, tmp_path):
    model_dir = tmp_path / "run"
    run = launch("--num_workers=2", "--", *TINY, "--train_steps=8", "--checkpoint_steps=4",
                 f"--model_dir={model_dir}")
    assert run.wait(240) == 0, run.text
    text = run.text
    w0, w1 = worker_lines(text, 0), worker_lines(text, 1)
    assert any("MultiWorkerMirroredStrategy" in line for line in w0), text
    assert any("MultiWorkerMirroredStrategy" in line for line in w1), text
    # Lockstep: both workers log the same epochs with the same steps and (all-reduced) losses.
    assert _epoch_rows(w0) == _epoch_rows(w1) != []
    metrics = _read_metrics(model_dir)
    assert metrics["workers"] == 2 and metrics["steps"] == 8
    assert (model_dir / "checkpoints" / "ckpt-8.index").is_file()
    assert "[launcher] all 2 worker(s) finished (exit status 0)" in text


@pytest.mark.slow
def test_killed_worker_stops_the_group(launch, tmp_path):
    grace, collective_timeout = 5, 30
    run = launch("--num_workers=2", f"--grace_seconds={grace}", "--", *TINY,
                 "--train_steps=2000", f"--model_dir={tmp_path / 'run'}")
    run.wait_for(r"^\[worker 0\] .*step 3/2000", 180)
    pid1 = run.worker_pids()[1][0]
    killed_at = time.monotonic()
    os.kill(pid1, signal.SIGKILL)
    rc = run.wait(collective_timeout + grace + 30)
    took = time.monotonic() - killed_at
    text = run.text
    assert rc == 128 + signal.SIGKILL, text
    assert "[launcher] worker 1 failed first: killed by SIGKILL" in text
    assert re.search(r"^\[launcher\] FAILED: worker 1 failed first", text, re.M)
    assert took < collective_timeout + grace + 10, took
    assert not _alive(run.worker_pids()[0][0])


@pytest.mark.slow
def test_restart_resumes_from_the_last_checkpoint(launch, tmp_path):
    model_dir = tmp_path / "run"
    run = launch("--num_workers=2", "--max_restarts=1", "--grace_seconds=5", "--", *TINY,
                 "--train_steps=30", "--checkpoint_steps=2", f"--model_dir={model_dir}")
    run.wait_for(r"^\[worker 0\] .*step ([5-9]|[12]\d)/30", 180)
    assert (model_dir / "checkpoints" / "checkpoint").is_file()
    os.kill(run.worker_pids()[1][0], signal.SIGKILL)
    assert run.wait(240) == 0, run.text
    text = run.text
    assert "[launcher] worker 1 failed first: killed by SIGKILL" in text
    assert "restarting the group (restart 1 of 1)" in text
    second = text.split("attempt 2 of 2", 1)[1]
    resumed = {int(i): int(s) for i, s in re.findall(
        r"^\[worker (\d)\] .*resumed from \S+ at step (\d+)", second, re.M)}
    assert set(resumed) == {0, 1} and resumed[0] == resumed[1] > 0, second
    metrics = _read_metrics(model_dir)
    assert metrics["steps"] == 30 and metrics["steps_this_run"] == 30 - resumed[0]
