"""Distribution: data across replicas and workers, equivalence with one device, identical
weights on every worker, a dead peer. Each run is a fresh process (devices and collectives
are fixed at start-up)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cifar_dist.preflight import free_ports
from conftest import REPO, env_for_subprocess, error_lines, run_module, run_script

PROBE = REPO / "tests" / "helpers" / "dist_probe.py"
EQUIV = ["--dataset=sample", "--train_subset=512",
         "--test_subset=128", "--model=tiny", "--batch_size=64", "--train_steps=6",
         "--optimizer=sgd", "--learning_rate=0.001", "--weight_decay=5e-4",
         "--augment=false", "--log_steps=2", "--export=false",
         "--enable_tensorboard=false", "--skip_eval"]
# Equivalence tolerance, measured: 2e-4 with --sync_batch_norm, 4e-2 without (float32,
# 6 steps at lr 1e-3; summation order differs between 1 and 2 replicas).
TOLERANCE = 1e-3


def probe(out, *flags, env=None):
    result = run_script(PROBE, out, *flags, f"--model_dir={out}/model", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = np.load(out / "weights_0.npz")
    ids = json.loads((out / "ids_0.json").read_text())
    return [weights[k] for k in weights.files], ids


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def check_epoch_ids(step_lists, num_examples, global_batch):
    """step_lists[s] = ids of every global replica at step s, in replica order."""
    seen = [i for step in step_lists for replica in step for i in replica]
    assert len(seen) == len(set(seen)), "an example was seen twice in one epoch"
    assert len(seen) == (num_examples // global_batch) * global_batch
    assert all(0 <= i < num_examples for i in seen)


@pytest.mark.slow
def test_two_replicas_match_one_device_and_see_each_example_once(tmp_path):
    one_w, one_ids = probe(tmp_path / "one", *EQUIV, "--sync_batch_norm",
                           "--strategy=one_device", "--probe_id_epochs=1")
    two_w, two_ids = probe(tmp_path / "two", *EQUIV, "--sync_batch_norm", "--strategy=mirrored",
                           "--num_cpu_devices=2", "--probe_id_epochs=1")
    assert two_ids["replicas"] == 2 and one_ids["replicas"] == 1
    # Replica r of step s gets the r-th half of what the single device gets at step s.
    for single, pair in zip(one_ids["local_ids"], two_ids["local_ids"]):
        assert single[0] == pair[0] + pair[1]
    check_epoch_ids(two_ids["local_ids"], 512, 64)
    assert max_diff(one_w, two_w) < TOLERANCE
    # The check can fail: per-replica BatchNorm statistics break equivalence.
    unsynced_w, _ = probe(tmp_path / "unsynced", *EQUIV, "--strategy=mirrored",
                          "--num_cpu_devices=2")
    assert max_diff(one_w, unsynced_w) > 10 * TOLERANCE
    metrics = json.loads((tmp_path / "two" / "model" / "metrics.json").read_text())
    assert metrics["replicas"] == 2


def start_workers(n, argv_for, timeout_env=None):
    ports = free_ports(n)
    procs = []
    for i in range(n):
        tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                     "task": {"type": "worker", "index": i}}
        env = env_for_subprocess(TF_CONFIG=json.dumps(tf_config))
        procs.append(subprocess.Popen([sys.executable, *argv_for(i)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


@pytest.mark.multiworker
@pytest.mark.slow
def test_two_workers_end_with_bitwise_identical_weights(tmp_path):
    flags = [*EQUIV, "--augment=true", "--strategy=multi_worker", "--collective_timeout=60",
             "--probe_id_epochs=1", f"--model_dir={tmp_path / 'model'}"]
    procs = start_workers(2, lambda i: [str(PROBE), str(tmp_path), *flags])
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    w0, w1 = (np.load(tmp_path / f"weights_{i}.npz") for i in (0, 1))
    assert all(np.array_equal(w0[k], w1[k]) for k in w0.files)
    ids = [json.loads((tmp_path / f"ids_{i}.json").read_text()) for i in (0, 1)]
    assert ids[0]["num_workers"] == 2 and ids[0]["replicas"] == 2
    # Worker w feeds global replica w: zip the two workers' steps back together.
    steps = [a + b for a, b in zip(ids[0]["local_ids"], ids[1]["local_ids"])]
    check_epoch_ids(steps, 512, 64)
    # Only the chief keeps checkpoints and metrics; the other worker cleaned up.
    assert (tmp_path / "model" / "metrics.json").is_file()
    assert (tmp_path / "model" / "checkpoints" / "checkpoint").is_file()


@pytest.mark.multiworker
@pytest.mark.slow
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP])
def test_a_killed_or_stalled_worker_makes_the_other_fail_within_the_timeout(tmp_path, fault):
    flags = ["-m", "cifar_dist.main", "--dataset=synthetic", "--synthetic_train_size=512",
             "--model=tiny", "--batch_size=64", "--train_steps=400", "--log_steps=1",
             "--strategy=multi_worker", "--collective_timeout=20", "--export=false",
             "--skip_eval", "--enable_tensorboard=false", f"--model_dir={tmp_path}"]
    procs = start_workers(2, lambda i: flags)
    deadline = time.time() + 240
    for line in procs[0].stdout:  # wait until training runs
        if "step 3/" in line:
            break
        assert time.time() < deadline
    procs[1].send_signal(fault)  # SIGSTOP: alive but silent, connections stay open
    started = time.time()
    try:
        out = procs[0].communicate(timeout=180)[0]
    finally:
        procs[1].kill()
        procs[1].wait()
    waited = time.time() - started
    assert procs[0].returncode not in (0, None)
    assert waited < 20 + 60, f"survivor took {waited:.0f} s to notice"
    lines = error_lines(out)
    assert len(lines) == 1 and "lost contact with another worker" in lines[0], out[-3000:]
    assert procs[0].returncode == 3


def test_global_batch_must_divide_among_replicas(tmp_path):
    result = run_module("cifar_dist.main", "--dataset=synthetic", "--model=tiny",
                        "--batch_size=63", "--train_steps=1", "--strategy=mirrored",
                        "--num_cpu_devices=2", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "does not divide among 2 replicas" in error_lines(result.stderr)[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tf_config, message", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {"worker": ["localhost:1"]}}', "TF_CONFIG has no 'task'"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}}',
     "task.index=3 is out of range"),
    ('{"cluster": {"worker": ["nohostport"]}, "task": {"type": "worker", "index": 0}}',
     "'host:port'"),
    # #25 kind 3: a bool index was worker 1's (exit 3 after a wait); a list type a traceback
    ('{"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", '
     '"index": true}}', "task.index=True is out of range"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": ["worker"], "index": 0}}',
     "task.type=['worker'] is not a job"),
])
def test_malformed_tf_config_names_the_variable(tmp_path, tf_config, message):
    env = env_for_subprocess(TF_CONFIG=tf_config)
    result = run_module("cifar_dist.main", "--dataset=synthetic", "--model=tiny",
                        "--train_steps=1", "--strategy=multi_worker",
                        f"--model_dir={tmp_path / 'run'}", env=env)
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]


@pytest.mark.parametrize("env, message", [
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_STEP_NODELIST is not set"),
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost",
      "SLURM_STEP_TASKS_PER_NODE": "2"}, "inconsistent"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost",
      "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID='abc'"),
])
def test_inconsistent_slurm_variables_name_the_variable(tmp_path, env, message):
    full = env_for_subprocess(**env)
    full.pop("TF_CONFIG", None)
    result = run_module("cifar_dist.main", "--dataset=synthetic", "--model=tiny",
                        "--train_steps=1", "--strategy=multi_worker", "--cluster=slurm",
                        f"--model_dir={tmp_path / 'run'}", env=full)
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def _tf_config(workers, task_type="worker", index=0, chief=None):
    cluster = {"worker": workers, **({"chief": chief} if chief else {})}
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize("raw, message", [  # #25 kind 3: each was a traceback or a wrong run
    (_tf_config(["localhost:1", "localhost:2"], index=True), "task.index=True is out of range"),
    (_tf_config(["localhost:1"], index="0"), "task.index='0' is out of range"),
    (_tf_config(["localhost:1"], task_type=["worker"]), "task.type=\\['worker'\\] is not"),
    (_tf_config(["localhost:1"], task_type={"a": 1}), "task.type=.* is not a job"),
    (_tf_config(["localhost:1", "localhost:\u00b2"]), "\\[1\\]=.*bad port '\u00b2'"),
    (_tf_config(["localhost:0"]), "bad port '0'"),
    (_tf_config(["localhost:99999"]), "bad port '99999'"),
    (_tf_config(["localhost:"]), "bad port ''"),
    (_tf_config([":2222"]), "bad host ''"),
    (_tf_config(["a b:2222"]), "bad host 'a b'"),
    (_tf_config(["local\nhost:2222"]), "bad host"),
    ('{"cluster": {"worker": ["a\\udcffb:1"]}, "task": {"type": "worker", "index": 0}}',
     "bad host"),  # was UnicodeError from the idna codec
    (_tf_config(["::1:2222"]), "an IPv6 address needs brackets, \\[::1\\]:2222"),
    (_tf_config(["[]:2222"]), "brackets are for IPv6"),
    (_tf_config(["localhost:2222", "LOCALHOST:2222"]), "\\[1\\]=.*the same address as "
                                                          "cluster.worker\\[0\\]"),
    (_tf_config(["c:1"], "chief", 0, chief=["a:1", "b:1"]), "at most one chief"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_tf_config_of_any_json_is_checked_before_use(raw, message):
    from cifar_dist import distribute
    from cifar_dist.errors import ClusterError
    with pytest.raises(ClusterError, match=message):
        distribute.parse_tf_config(raw)


def test_tf_config_accepts_bracketed_ipv6_and_a_chief():
    from cifar_dist import distribute
    distribute.parse_tf_config(_tf_config(["[::1]:2222", "[::1]:2223"], index=1))
    distribute.parse_tf_config(_tf_config(["h:2"], "chief", 0, chief=["h:1"]))


@pytest.mark.parametrize("nodelist, message", [
    ("node 1", "bad host 'node 1'"), ("n\u00e9ud", "bad host"),
])
def test_slurm_host_names_are_checked(monkeypatch, nodelist, message):
    from cifar_dist import distribute
    from cifar_dist.errors import ClusterError
    for name, value in {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1",
                        "SLURM_STEP_NODELIST": nodelist, "SLURM_STEP_TASKS_PER_NODE": "1",
                        "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    with pytest.raises(ClusterError, match=f"SLURM_STEP_NODELIST: address .*{message}"):
        distribute.slurm_resolver()


def test_slurm_numbers_take_ascii_digits_only(monkeypatch):
    from cifar_dist import distribute
    from cifar_dist.errors import ClusterError
    monkeypatch.setenv("SLURM_PROCID", "\u00b2")  # str.isdigit says yes, int() says no
    with pytest.raises(ClusterError, match="SLURM_PROCID='\u00b2' is not a number"):
        distribute._slurm_int("SLURM_PROCID")
    monkeypatch.setenv("SLURM_JOB_ID", "\u00b9")
    with pytest.raises(ClusterError, match="SLURM_JOB_ID="):
        distribute.slurm_port_base()
