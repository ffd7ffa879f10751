"""Issue #17: forming the cluster is a bounded wait that a signal ends. A worker says which
workers it waits for; if they never start it ends after --startup_timeout with one line
naming them and exit status 3; a SIGTERM at any moment of the wait ends it within
seconds (76: no checkpoint), one line, nothing written."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from cifar_dist.preflight import free_ports
from conftest import REPO, TINY_SYNTHETIC, env_for_subprocess, error_lines, run_module

ALONE = [*TINY_SYNTHETIC, "--train_steps=4", "--strategy=multi_worker"]


def tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


@pytest.mark.multiworker
@pytest.mark.parametrize("index", [0, 1])  # the coordination leader, and a worker waiting for it
def test_a_worker_whose_peer_never_starts_exits_3_naming_it(tmp_path, index):
    ports = free_ports(2)
    other = 1 - index
    model_dir = tmp_path / "run"
    started = time.time()
    result = run_module("cifar_dist.main", *ALONE, "--startup_timeout=4",
                        f"--model_dir={model_dir}", timeout=120,
                        env=env_for_subprocess(TF_CONFIG=tf_config(ports, index)))
    took = time.time() - started
    assert result.returncode == 3, result.stderr[-3000:]
    missing = f"worker {other} (localhost:{ports[other]})"
    waiting = [line for line in result.stderr.splitlines() if "waiting up to 4 s" in line]
    assert len(waiting) == 1 and waiting[0].endswith(f"to start: {missing}"), result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"cifar_dist: {missing} did not start within "
                               "--startup_timeout=4 s"), lines
    assert took < 4 + 40, took  # start-up, 4 s of waiting, exit
    assert not model_dir.exists()


@pytest.mark.multiworker
def test_a_signal_at_a_random_moment_of_the_wait_ends_it_within_seconds(tmp_path):
    ports = free_ports(2)
    model_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_dist.main", *ALONE, "--startup_timeout=120",
         f"--model_dir={model_dir}"], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=env_for_subprocess(TF_CONFIG=tf_config(ports, 0)))
    seen = []
    for line in proc.stdout:  # ends at EOF too, should the wait line never come
        seen.append(line)
        if "waiting up to 120 s" in line:
            break
    delay = random.Random().uniform(0.0, 4.0)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    out = "".join(seen) + proc.communicate(timeout=60)[0]
    took = time.time() - sent
    assert proc.returncode == 76, (delay, out[-3000:])
    assert took < 10, f"SIGTERM {delay:.1f} s into the wait took {took:.1f} s"
    lines = error_lines(out)
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] \
        and "no checkpoint was written" in lines[0], out[-2000:]
    assert not model_dir.exists()  # nothing written, nothing half-written


# --------------------------------------------------------------------------- in process

def test_the_wait_ends_when_every_worker_has_been_seen_and_names_the_rest():
    from cifar_dist import distribute
    from cifar_dist.errors import PeersMissing

    ports = free_ports(3)
    tasks = distribute.cluster_tasks({"worker": [f"localhost:{p}" for p in ports[:2]]})
    assert tasks == [("worker", 0, f"localhost:{ports[0]}"), ("worker", 1, f"localhost:{ports[1]}")]
    done, servers = {}, []

    def worker(i, delay):
        time.sleep(delay)
        distribute.wait_for_workers(tasks, ("worker", i), timeout=30)
        done[i] = time.time()
        # What TensorFlow's server does next: listen on the port the wait handed over.
        servers.append(socket.create_server(("", ports[i])))

    threads = [threading.Thread(target=worker, args=(i, 1.5 * i)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for server in servers:
        server.close()
    assert sorted(done) == [0, 1]  # the late one found the early one, and the other way round

    three = distribute.cluster_tasks({"chief": [f"localhost:{ports[2]}"],
                                      "worker": [f"localhost:{p}" for p in ports[:2]]})
    assert [t[:2] for t in three] == [("chief", 0), ("worker", 0), ("worker", 1)]
    started = time.time()
    with pytest.raises(PeersMissing) as e:
        distribute.wait_for_workers(three, ("worker", 1), timeout=1)
    assert time.time() - started < 10
    assert str(e.value).startswith(f"chief 0 (localhost:{ports[2]}), worker 0 "
                                   f"(localhost:{ports[0]}) did not start within")
    assert e.value.exit_code == 3


def test_startup_timeout_is_checked_and_does_not_shape_a_run():
    from cifar_dist import train
    from cifar_dist.config import Config
    from cifar_dist.errors import ConfigError

    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match="--startup_timeout must be > 0"):
            Config(dataset="synthetic", startup_timeout=bad)
    assert "startup_timeout" not in train.SHAPING_FLAGS  # a resume may change it
