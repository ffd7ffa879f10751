"""slurm/train.sh on a real single-node SLURM started on this machine (CPU, 2 tasks).

slurm/setup_local_slurm.sh installs slurm-wlm + munge with apt and starts the daemons;
the tests are skipped (with the reason) when that cannot work here: not root, not Linux,
no apt-get and no SLURM, or the set-up fails. Each test submits `sbatch slurm/train.sh`
with the #SBATCH GPU request overridden (--gpus-per-task=0) and 2 tasks on one node,
then waits for the job with a deadline (scontrol; there is no accounting database).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "slurm" / "setup_local_slurm.sh"
TRAIN = REPO / "slurm" / "train.sh"

TINY = ["--model=tiny", "--dataset=synthetic", "--synthetic_train_size=256",
        "--synthetic_test_size=64", "--batch_size=64", "--jit_compile=false",
        "--export=false", "--enable_tensorboard=false", "--log_steps=1",
        "--collective_timeout=60"]
# 2 tasks on this node, 1 CPU each, no GPU (overrides the script's #SBATCH GPU lines).
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-task=0",
           "--time=00:10:00"]
# Seconds a requeued job stays held before the test lets it start (see Job.wait_done).
REQUEUE_SETTLE_S = 5
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="module")
def slurm():
    if sys.platform != "linux":
        pytest.skip("the local SLURM needs Linux")
    if os.geteuid() != 0:
        pytest.skip("starting a local SLURM needs root (slurm/setup_local_slurm.sh)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no apt-get to install slurm-wlm and munge, and no SLURM installed")
    try:
        result = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True,
                                timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("slurm/setup_local_slurm.sh did not finish within 10 minutes")
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        pytest.skip(f"local SLURM could not start: {last}")
    return True


class Job:
    def __init__(self, job_id: str, out: Path):
        self.id, self.out = job_id, out

    def info(self) -> dict:
        r = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True,
                           text=True, timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    @property
    def log(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def fail(self, why: str):
        pytest.fail(f"job {self.id}: {why}\nscontrol: {self.info()}\nlog tail:\n"
                    + "\n".join(self.log.splitlines()[-60:]))

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log, re.M)
            if m:
                return m
            if self.info().get("JobState") in DONE_STATES:
                break
            time.sleep(0.5)
        self.fail(f"no log line matching {pattern!r}")

    def wait_done(self, timeout: float, expedite_requeue: bool = False) -> dict:
        """Waits for a final state. A requeued job waits ~2 min (SLURM's BeginTime after a
        requeue); expedite_requeue moves that to now so the test does not sit it out.

        Not at once: slurmd revokes the old run's job credential at the requeue, with a
        one-second clock, and a restart within that second is refused ("Job credential
        revoked", the job then FAILS with exit 1). Waiting REQUEUE_SETTLE_S first is safe.
        """
        deadline = time.monotonic() + timeout
        pending_since = None
        while time.monotonic() < deadline:
            info = self.info()
            if info.get("JobState") in DONE_STATES:
                return info
            held = info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime"
            if held and pending_since is None:
                pending_since = time.monotonic()
            if (expedite_requeue and held
                    and time.monotonic() - pending_since >= REQUEUE_SETTLE_S):
                subprocess.run(["scontrol", "update", f"JobId={self.id}", "StartTime=now"],
                               capture_output=True, timeout=30)
            time.sleep(1)
        self.fail(f"not finished after {timeout} s")


@pytest.fixture
def submit(slurm, tmp_path):
    jobs: list[Job] = []

    def _submit(*flags) -> Job:
        env = dict(os.environ, PYTHON=sys.executable)
        env.pop("TF_CONFIG", None)
        r = subprocess.run(["sbatch", "--parsable", *CPU_JOB,
                            f"--output={tmp_path}/job-%j.out", str(TRAIN), *flags],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip().split(";")[0]
        job = Job(job_id, tmp_path / f"job-{job_id}.out")
        jobs.append(job)
        return job

    yield _submit
    for job in jobs:
        subprocess.run(["scancel", job.id], capture_output=True, timeout=30)


def task_lines(log: str, task: int) -> list[str]:
    return [line.split(": ", 1)[1] for line in log.splitlines()
            if line.startswith(f"{task}: ")]


def epoch_rows(lines: list[str]) -> list[str]:
    return [m.group(1) for line in lines
            for m in [re.search(r"(epoch \d+: epoch=\d+, step=\d+, train_loss=\S+)", line)] if m]


def test_two_tasks_train_in_lockstep(submit, tmp_path):
    model_dir = tmp_path / "run"
    job = submit(*TINY, "--train_steps=8", "--checkpoint_steps=4", f"--model_dir={model_dir}")
    info = job.wait_done(300)
    log = job.log
    if info.get("JobState") != "COMPLETED" or info.get("ExitCode") != "0:0":
        job.fail("did not complete with exit code 0")
    t0, t1 = task_lines(log, 0), task_lines(log, 1)
    # Both tasks are workers of one cluster on this node, on the job's own port range.
    spec = re.search(r"cluster_spec = \{'worker': \['([^']+):(\d+)', '([^']+):(\d+)'\]\}",
                     "\n".join(t0))
    assert spec, log
    assert int(spec.group(4)) == int(spec.group(2)) + 1 and int(spec.group(2)) != 8888
    assert any("task_id = 1" in line for line in t1), log
    # Lockstep: the same epochs, steps and all-reduced losses on both tasks.
    assert epoch_rows(t0) == epoch_rows(t1) != [], log
    assert len(epoch_rows(t0)) == 2
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["steps"] == 8
    assert (model_dir / "checkpoints" / "ckpt-8.index").is_file()
    assert "slurm/train.sh: done" in log


def test_preemption_signal_checkpoints_requeues_and_resumes(submit, tmp_path):
    model_dir = tmp_path / "run"
    job = submit(*TINY, "--train_steps=24", f"--model_dir={model_dir}")
    job.wait_for_log(r"^0: .*step 2/24", 240)
    # What --signal=USR1@120 does before the time limit: SIGUSR1 to the tasks (not the
    # batch shell). scancel without --batch/--full sends it exactly there.
    subprocess.run(["scancel", "--signal=USR1", job.id], check=True, timeout=30)
    job.wait_for_log(r"requeueing job", 120)
    info = job.wait_done(300, expedite_requeue=True)
    log = job.log
    if info.get("JobState") != "COMPLETED" or info.get("Restarts") != "1":
        job.fail("expected one requeue and then completion")
    first, second = log.split("(restart 1)", 1)
    stopped = {int(t): int(s) for t, s in re.findall(
        r"^(\d): cifar_dist: stopped by (?:SIG\w+|a signal to another worker) at step (\d+)",
        first, re.M)}
    resumed = {int(t): int(s) for t, s in re.findall(
        r"^(\d): .*resumed from \S+ at step (\d+)", second, re.M)}
    assert set(stopped) == {0, 1} and len(set(stopped.values())) == 1, first
    assert resumed == stopped and resumed[0] > 0, second
    assert epoch_rows(task_lines(second, 0)) == epoch_rows(task_lines(second, 1)) != []
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["steps"] == 24 and metrics["steps_this_run"] == 24 - resumed[0]
