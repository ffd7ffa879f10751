"""slurm/train.sh's decisions, without SLURM: a fake `srun` exits with a chosen status and a
fake `scontrol` records what it was asked. What is requeued, what is not, and what a job
that ends failed tells its user (model_dir and the command that resumes it)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "slurm" / "train.sh"


@pytest.fixture
def run_script(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\necho "srun $*" >> "$FAKE_LOG"\nexit "$FAKE_RC"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "scontrol $*" >> "$FAKE_LOG"\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    submit = tmp_path / "submit dir"
    submit.mkdir()

    def run(rc, *flags, restarts=0):
        log = tmp_path / "calls.log"
        log.write_text("")
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                   SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(submit), FAKE_RC=str(rc),
                   FAKE_LOG=str(log), SLURM_RESTART_COUNT=str(restarts),
                   CIFAR_DIST_MAX_REQUEUES="3")
        r = subprocess.run(["bash", str(TRAIN), *flags], env=env, capture_output=True,
                           text=True, timeout=60)
        return r, log.read_text(), submit

    return run


@pytest.mark.parametrize("rc", [3, 75, 76, 137])
def test_a_lost_task_or_a_stop_is_requeued(run_script, rc):
    r, calls, submit = run_script(rc, "--train_steps=8")
    assert r.returncode == rc
    assert "scontrol requeue 4242" in calls, r.stdout + r.stderr
    assert "requeueing job 4242 to resume" in r.stdout
    assert f"--model_dir={submit}/runs/slurm-4242 --train_steps=8" in calls
    assert "to resume there" not in r.stderr  # requeued: nothing for the user to do


@pytest.mark.parametrize("rc", [0, 1, 2, 4])
def test_success_and_failures_a_restart_cannot_help_are_not_requeued(run_script, rc):
    r, calls, submit = run_script(rc)
    assert r.returncode == rc and "scontrol requeue" not in calls
    if rc == 0:
        assert "slurm/train.sh: done" in r.stdout and r.stderr == ""
    else:
        assert f"training failed with exit status {rc}" in r.stderr
        assert ("to resume there" in r.stderr) == (rc != 2)  # bad input: nothing to resume


def resume_command(stderr: str) -> list[str]:
    line = [x for x in stderr.splitlines() if "sbatch slurm/train.sh" in x][-1]
    return shlex.split(line.split("slurm/train.sh:", 1)[1])


def test_a_job_out_of_requeues_says_where_its_checkpoints_are_and_how_to_resume(run_script):
    r, calls, submit = run_script(3, "--flagfile=configs/smoke.cfg", "--note=a b", restarts=3)
    assert r.returncode == 3 and "scontrol requeue" not in calls
    assert "already requeued 3 times" in r.stderr
    model_dir = f"{submit}/runs/slurm-4242"
    assert f"the checkpoints are in {model_dir}" in r.stderr
    # The command, quoted for the shell: the same flags, and this job's model_dir.
    assert resume_command(r.stderr) == ["cd", str(submit), "&&", "sbatch", "slurm/train.sh",
                                        "--flagfile=configs/smoke.cfg", "--note=a b",
                                        f"--model_dir={model_dir}"]


def test_the_resume_hint_names_the_model_dir_the_run_used(run_script, tmp_path):
    r, _, submit = run_script(4, "--model_dir", "mine/run1")
    assert f"the checkpoints are in {submit}/mine/run1" in r.stderr
    flagfile = tmp_path / "submit dir" / "my.cfg"
    flagfile.write_text("--model=tiny\n--model_dir=/shared/runs/exp1\n")
    r, _, _ = run_script(4, f"--flagfile={flagfile}")
    assert "the checkpoints are in /shared/runs/exp1" in r.stderr
    assert resume_command(r.stderr)[-1] == "--model_dir=/shared/runs/exp1"
