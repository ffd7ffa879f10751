"""Issue #25, kind 2 (every wait has a bound, and a signal ends it within about 2 s) and
the download's environment variables checked before a byte is fetched (kind 3)."""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import sys
import time

import pytest

from cifar_dist import cifar10_files, data
from cifar_dist.config import Config
from cifar_dist.errors import DataError
from conftest import REPO, TINY_RECIPE, env_for_subprocess, error_lines
from test_data_find import (LoopbackServer, cache_files, places, serve,  # noqa: F401 (fixtures)
                            tarball_bytes)


class Trickle(LoopbackServer):
    """An HTTP server on 127.0.0.1 that announces `size` bytes and sends one every `every` s."""

    def __init__(self, size=1000, every=0.2):
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                try:
                    for _ in range(size):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(every)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self._listen(Handler, threaded=True)


@pytest.fixture
def trickle():
    server = Trickle()
    yield server
    server.close()


def test_a_trickling_download_ends_at_the_minimum_rate(places, trickle, monkeypatch):
    # (It never ended: no overall deadline and no minimum rate, only a per-read timeout.)
    monkeypatch.setenv("CIFAR10_URL", trickle.url)
    monkeypatch.setenv("CIFAR10_MD5", "0" * 32)
    monkeypatch.setattr(cifar10_files, "DOWNLOAD_RATE_WINDOW", 1.0)
    monkeypatch.setattr(cifar10_files, "DOWNLOAD_MIN_RATE", 100)
    started = time.monotonic()
    with pytest.raises(DataError, match="too slow"):
        data.load(Config())
    assert time.monotonic() - started < 10
    assert cache_files(places) == []


def _popen(args, env):
    return subprocess.Popen([sys.executable, "-m", "cifar_dist.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


CIFAR_ARGS = ["--dataset=cifar10", "--model=tiny", "--batch_size=64", "--train_steps=2",
              "--export=false", "--skip_eval", "--enable_tensorboard=false", *TINY_RECIPE]


def _stop(proc, sig=signal.SIGTERM):
    proc.send_signal(sig)
    sent = time.time()
    out = proc.communicate(timeout=60)[0]
    return out, time.time() - sent


@pytest.mark.slow
def test_a_signal_ends_a_stalled_download_at_once_leaving_nothing(tmp_path, trickle):
    home = tmp_path / "home"
    home.mkdir()
    env = env_for_subprocess(HOME=home, TFDS_DATA_DIR=tmp_path / "tfds", CIFAR10_URL=trickle.url,
                             CIFAR10_MD5="0" * 32)
    proc = _popen([*CIFAR_ARGS, f"--model_dir={tmp_path / 'run'}"], env)
    try:
        deadline = time.time() + 120
        while not cache_files(home):  # the download's temporary: it is reading now
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        out, took = _stop(proc)
    finally:
        proc.kill()
    assert proc.returncode == 76, out[-3000:]
    assert took < 5, took  # was 10 s: only the watchdog ended it
    lines = error_lines(out)
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], out[-2000:]
    assert cache_files(home) == []


@pytest.mark.slow
def test_a_signal_ends_the_wait_for_worker_0s_download_at_once(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    tf_config = {"cluster": {"worker": ["localhost:1", "localhost:2"]},
                 "task": {"type": "worker", "index": 1}}
    env = env_for_subprocess(HOME=home, TFDS_DATA_DIR=tmp_path / "tfds",
                             TF_CONFIG=json.dumps(tf_config))
    proc = _popen([*CIFAR_ARGS, "--strategy=multi_worker", f"--model_dir={tmp_path / 'run'}"],
                  env)
    try:
        for line in proc.stdout:
            if "for worker 0 to download" in line:
                break
        time.sleep(0.5)
        out, took = _stop(proc)
    finally:
        proc.kill()
    assert proc.returncode == 76, out[-3000:]
    assert took < 5, took
    lines = error_lines(out)
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], out[-2000:]


@pytest.mark.parametrize("name, value, message", [
    ("CIFAR10_MD5", "xyz", "CIFAR10_MD5='xyz' is not an MD5"),
    ("CIFAR10_URL", "not a url", "CIFAR10_URL='not a url' is not a URL"),
    ("CIFAR10_URL", "gopher://x/y", "is not a URL"),
])
def test_download_variables_are_checked_before_a_byte_is_fetched(places, serve, monkeypatch,
                                                                   name, value, message):
    server = serve(tarball_bytes(10))
    monkeypatch.setenv(name, value)
    with pytest.raises(DataError, match=message) as info:
        data.load(Config())
    assert "\n" not in str(info.value)
    assert server.requests == 0 and cache_files(places) == []
