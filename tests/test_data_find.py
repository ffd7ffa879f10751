"""CIFAR-10 without --data_dir: the search order ($CIFAR10_DIR, the Keras cache, TFDS'
data_dir) and the download (loopback HTTP server only: never another address)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import pickle
import socket
import tarfile
import threading

import numpy as np
import pytest

from cifar_dist import cifar10_files, data
from cifar_dist.config import Config
from cifar_dist.errors import DataError
from conftest import TINY_RECIPE, env_for_subprocess, error_lines, run_module

SAMPLE = data.load_sample()


def batch_bytes(first: int, n: int) -> bytes:
    """An official-layout batch file of n real images (from the shipped sample)."""
    images = SAMPLE.train.images[first:first + n]
    raw = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # back to channel planes
    return pickle.dumps({b"data": raw, b"labels": SAMPLE.train.labels[first:first + n].tolist()},
                        protocol=2)


def layout_files(n: int) -> dict:
    """{name: bytes} of a small CIFAR-10 python layout with n images per batch file: the
    number tells the test which copy was loaded."""
    files = {name: batch_bytes(i * n, n) for i, name in enumerate(data.TRAIN_FILES)}
    files[data.TEST_FILE] = batch_bytes(5 * n, n)
    return files


def write_folder(parent, n):
    folder = parent / data.BATCH_FOLDER
    folder.mkdir(parents=True)
    for name, blob in layout_files(n).items():
        (folder / name).write_bytes(blob)
    return folder


def tarball_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in layout_files(n).items():
            info = tarfile.TarInfo(f"{data.BATCH_FOLDER}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


@pytest.fixture
def places(tmp_path, monkeypatch):
    """An empty HOME, KERAS_HOME and TFDS_DATA_DIR of our own; no CIFAR10_* variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("KERAS_HOME", "TFDS_DATA_DIR", "CIFAR10_DIR", "CIFAR10_URL", "CIFAR10_MD5",
                 "TF_CONFIG", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    return home


def train_count(**cfg):
    return len(data.load(Config(**cfg)).train)


def test_search_order_cifar10_dir_keras_cache_tfds(places, tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    write_folder(env_dir, 11)
    monkeypatch.setenv("CIFAR10_DIR", str(env_dir))
    cache = places / ".keras" / "datasets"  # KERAS_HOME unset: ~/.keras, as Keras does
    write_folder(cache, 12)
    (cache / data.TARBALL).write_bytes(tarball_bytes(13))
    assert data.locate_cifar10()[:2] == ("local", str(env_dir / data.BATCH_FOLDER))
    assert train_count() == 5 * 11
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "empty"))  # set but empty: look further
    assert train_count() == 5 * 12
    monkeypatch.delenv("CIFAR10_DIR")
    (cache / data.BATCH_FOLDER / data.TEST_FILE).unlink()
    (cache / data.BATCH_FOLDER / data.TRAIN_FILES[0]).unlink()
    assert data.locate_cifar10()[:2] == ("local", str(cache / data.TARBALL))
    assert train_count() == 5 * 13
    # KERAS_HOME replaces ~/.keras, Keras 3's load_data folder is found too
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    write_folder(tmp_path / "kh" / "datasets" / "cifar-10-batches-py-target", 14)
    assert train_count() == 5 * 14
    # then TFDS' data_dir, only when a prepared cifar10 folder is there
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh2"))
    tfds_dir = tmp_path / "tfds"
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    assert data.locate_cifar10()[0] is None
    assert not data.needs_tensorflow(Config())
    (tfds_dir / "cifar10" / "3.0.2").mkdir(parents=True)  # a prepared version
    (tfds_dir / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
    assert data.locate_cifar10()[:2] == ("tfds", str(tfds_dir))
    assert data.needs_tensorflow(Config())  # TFDS starts TensorFlow: after the strategy
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        bundle = data.load(Config())
    assert len(bundle.train) == 24 and bundle.source.startswith("tfds")


def test_not_found_and_download_forbidden_names_every_place(places, tmp_path):
    with pytest.raises(DataError) as info:
        data.load(Config(download=False))
    message = str(info.value)
    assert "\n" not in message and "--download=false" in message
    for where in ("$CIFAR10_DIR (not set)", str(places / ".keras" / "datasets"),
                  str(places / "tensorflow_datasets"), "--data_dir=", "--dataset=sample"):
        assert where in message, where


# --------------------------------------------------------------------------- download

class LoopbackServer:
    """An HTTP server on 127.0.0.1 (a free port) serving CIFAR-10's tarball name at `url`,
    in a daemon thread; subclasses give the request handler."""

    def _listen(self, handler, threaded: bool = False):
        cls = http.server.ThreadingHTTPServer if threaded else http.server.HTTPServer
        self.httpd = cls(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/{data.TARBALL}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Server(LoopbackServer):
    """Serves one body; `short` sends fewer bytes than the Content-Length it announces."""

    def __init__(self, body: bytes, short: bool = False):
        self.body, self.short, self.requests = body, short, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body[: len(outer.body) // 2] if outer.short else outer.body)

            def log_message(self, *args):
                pass

        self._listen(Handler)


@pytest.fixture
def serve(monkeypatch):
    servers = []

    def _serve(body, short=False, md5=None):
        server = Server(body, short)
        servers.append(server)
        monkeypatch.setenv("CIFAR10_URL", server.url)
        monkeypatch.setenv("CIFAR10_MD5", md5 or hashlib.md5(body).hexdigest())
        return server

    yield _serve
    for server in servers:
        server.close()


def cache_files(home):
    cache = home / ".keras" / "datasets"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_download_into_the_keras_cache_then_found_there(places, serve):
    body = tarball_bytes(10)
    server = serve(body)
    bundle = data.load(Config())
    assert len(bundle.train) == 50 and len(bundle.test) == 10
    np.testing.assert_array_equal(bundle.train.images, SAMPLE.train.images[:50])
    assert cache_files(places) == [data.TARBALL]  # no temporary folder left
    assert (places / ".keras" / "datasets" / data.TARBALL).read_bytes() == body
    data.load(Config())  # the second run finds it: no second request
    assert server.requests == 1


@pytest.mark.parametrize("case, message", [
    ("short_read", "retrieval incomplete"),  # fewer bytes than Content-Length
    ("truncated_tarball", "MD5"),  # complete response, but the tarball was cut: wrong hash
    ("wrong_checksum", "is not the expected 0123"),
])
def test_a_bad_download_is_one_line_and_leaves_nothing(places, serve, case, message):
    body = tarball_bytes(10)
    if case == "short_read":
        serve(body, short=True)
    elif case == "truncated_tarball":
        serve(body[: len(body) // 2], md5=hashlib.md5(body).hexdigest())
    else:
        serve(body, md5="0123456789abcdef0123456789abcdef")
    with pytest.raises(DataError, match=message) as info:
        data.load(Config())
    assert "\n" not in str(info.value)
    assert cache_files(places) == []  # nothing half-written, no temporary folder


def test_official_address_always_gets_the_official_md5(monkeypatch):
    monkeypatch.delenv("CIFAR10_URL", raising=False)
    monkeypatch.setenv("CIFAR10_MD5", "0" * 32)  # alone it means nothing
    assert cifar10_files.download_origin() == (cifar10_files.CIFAR10_URL, "c58f30108f718f92721af3b95e74349a")


def test_only_the_chief_downloads_the_others_wait(places, serve, monkeypatch):
    worker = {"cluster": {"worker": ["localhost:1", "localhost:2"]},
              "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(worker))
    cfg = Config(strategy="multi_worker")
    assert not data.is_download_chief(cfg)
    assert data.is_download_chief(Config(strategy="multi_worker", cluster="slurm"))  # no SLURM_PROCID
    monkeypatch.setenv("CIFAR10_WAIT_SECONDS", "2")
    server = serve(tarball_bytes(10))
    with pytest.raises(DataError, match="waited 2 s for worker 0 to download"):
        data.load(cfg)
    assert server.requests == 0 and cache_files(places) == []
    # the chief's file appears while this worker waits
    monkeypatch.setenv("CIFAR10_WAIT_SECONDS", "60")
    cache = places / ".keras" / "datasets"
    cache.mkdir(parents=True)
    timer = threading.Timer(1.5, lambda: (cache / data.TARBALL).write_bytes(tarball_bytes(10)))
    timer.start()
    assert len(data.load(cfg).train) == 50 and server.requests == 0
    timer.join()
    worker["task"]["index"] = 0
    monkeypatch.setenv("TF_CONFIG", json.dumps(worker))
    assert data.is_download_chief(cfg)
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert not data.is_download_chief(cfg)


def test_offline_from_the_command_line_is_one_line_exit_2(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path / "home"
    home.mkdir()
    env = env_for_subprocess(HOME=home, TFDS_DATA_DIR=tmp_path / "tfds",
                             CIFAR10_URL=f"http://127.0.0.1:{port}/{data.TARBALL}")
    for name in ("KERAS_HOME", "CIFAR10_DIR", "CIFAR10_MD5", "TF_CONFIG"):
        env.pop(name, None)
    result = run_module("cifar_dist.main", "--model=tiny", "--train_steps=1", *TINY_RECIPE,
                        f"--model_dir={tmp_path / 'run'}", env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    for part in ("CIFAR-10 not found", "$CIFAR10_DIR (not set)", str(home / ".keras" / "datasets"),
                 f"127.0.0.1:{port}", "--data_dir=DIR", "--dataset=sample"):
        assert part in lines[0], (part, lines[0])
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
    assert cache_files(home) == []


def test_download_from_the_command_line_then_train_on_two_replicas(tmp_path):
    """The whole path in a fresh process: nothing found, the download (Keras imports
    TensorFlow before the strategy exists), then 2 logical CPUs still split."""
    body = tarball_bytes(64)
    server = Server(body)
    home = tmp_path / "home"
    home.mkdir()
    env = env_for_subprocess(HOME=home, TFDS_DATA_DIR=tmp_path / "tfds", CIFAR10_URL=server.url,
                             CIFAR10_MD5=hashlib.md5(body).hexdigest())
    for name in ("KERAS_HOME", "CIFAR10_DIR", "TF_CONFIG"):
        env.pop(name, None)
    try:
        result = run_module("cifar_dist.main", "--model=tiny", "--batch_size=64",
                            "--train_steps=2", *TINY_RECIPE, "--strategy=mirrored",
                            "--num_cpu_devices=2", "--jit_compile=false", "--export=false",
                            "--enable_tensorboard=false", f"--model_dir={tmp_path / 'run'}",
                            env=env, timeout=600)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr[-3000:]
    assert server.requests == 1 and cache_files(home) == [data.TARBALL]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["test_examples"] == 64
