"""The SLURM cluster resolver on simulated step variables (no SLURM, no GPU needed)."""

from __future__ import annotations

import os
import stat

import pytest

from cifar_dist import distribute
from cifar_dist.errors import ClusterError

BASE_ENV = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_STEP_NODELIST": "node[9-10]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


@pytest.fixture
def slurm_env(monkeypatch, tmp_path):
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_LOCALID", "TF_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    for key, value in BASE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi unless a test adds one
    return monkeypatch


def test_workers_follow_slurm_rank_order_not_string_order(slurm_env):
    slurm_env.setenv("SLURM_PROCID", "1")
    resolver = distribute.slurm_resolver()
    base = distribute.slurm_port_base()
    assert resolver.cluster_spec().as_dict()["worker"] == [
        f"node9:{base}", f"node9:{base + 1}", f"node10:{base}", f"node10:{base + 1}"]
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)
    assert base == 15000 + 1234 * 8


@pytest.mark.parametrize("rank, visible, expected", [
    ("0", "0,1,2,3", "0,1"), ("1", "0,1,2,3", "2,3"),   # a node's 4 GPUs split in two
    ("3", "4,5", "5"),                                   # ids kept, not renumbered from 0
    ("1", "7", "7"),                                     # SLURM bound one GPU per task already
])
def test_each_task_gets_its_own_gpus(slurm_env, rank, visible, expected):
    slurm_env.setenv("SLURM_PROCID", rank)
    slurm_env.setenv("CUDA_VISIBLE_DEVICES", visible)
    distribute.slurm_resolver()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == expected


def test_gpus_found_with_nvidia_smi_when_nothing_is_bound(slurm_env, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: Fake (UUID: x)\"; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    slurm_env.setenv("SLURM_PROCID", "2")  # first task on node10
    distribute.slurm_resolver()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


@pytest.mark.parametrize("change, message", [
    ({"SLURM_STEP_NUM_TASKS": "3"}, "inconsistent"),
    ({"SLURM_PROCID": "4"}, "inconsistent"),
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not a number"),
    ({"SLURM_LOCALID": "0"}, "only block distribution"),
])
def test_inconsistent_variables_are_refused(slurm_env, change, message):
    slurm_env.setenv("SLURM_PROCID", "1")
    for key, value in change.items():
        slurm_env.setenv(key, value)
    with pytest.raises(ClusterError, match=message):
        distribute.slurm_resolver()
