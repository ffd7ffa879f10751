"""Where the official CIFAR-10 files are: their names, a local copy, the Keras cache,
TensorFlow Datasets' data_dir, or the download. data.py reads what this module finds.

Without --data_dir: $CIFAR10_DIR, the Keras cache, TFDS' default data_dir, in this order
(locate_cifar10); else the official tarball is downloaded into the Keras cache, checked
against its published MD5 (download_cifar10). In a multi-worker run only worker 0
downloads; the others wait for the file to appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from typing import Optional

from absl import logging

from cifar_dist import atomic
from cifar_dist.errors import DataError

BATCH_FOLDER = "cifar-10-batches-py"
TARBALL = "cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"


def find_local_cifar10(data_dir: str) -> Optional[str]:
    """Path of a local CIFAR-10 python copy under data_dir, or None."""
    for candidate in (os.path.join(data_dir, BATCH_FOLDER), data_dir):
        if os.path.isfile(os.path.join(candidate, TEST_FILE)) or \
                os.path.isfile(os.path.join(candidate, TRAIN_FILES[0])):
            return candidate
    for candidate in (os.path.join(data_dir, TARBALL), data_dir):
        if candidate.endswith(".tar.gz") and os.path.isfile(candidate):
            return candidate
    return None


# The official CIFAR-10 python version and its published MD5. The environment variable
# CIFAR10_URL (a mirror, or a test's loopback server) replaces the address; CIFAR10_MD5 is
# honoured only together with it, so the official address always gets the official hash.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
# How long a non-chief worker waits for the chief's download (env CIFAR10_WAIT_SECONDS).
DOWNLOAD_WAIT_SECONDS = 1800
# A stalled server must not hang the run forever: seconds without a byte.
DOWNLOAD_SOCKET_TIMEOUT = 60
# What keras.datasets.cifar10.load_data leaves in the Keras cache (Keras 2 and Keras 3).
KERAS_CACHE_NAMES = (BATCH_FOLDER, "cifar-10-batches-py-target", TARBALL,
                     "cifar-10-batches-py-target_archive")


def keras_home() -> str:
    """Keras' own rule (keras/src/backend/config.py): $KERAS_HOME, else ~/.keras, else
    /tmp/.keras when the home folder is not writable."""
    if "KERAS_HOME" in os.environ:
        return os.path.expanduser(os.environ["KERAS_HOME"])
    base = os.path.expanduser("~")
    return os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")


def keras_cache() -> str:
    return os.path.join(keras_home(), "datasets")


def tfds_data_dir() -> str:
    """TensorFlow Datasets' default data_dir, without importing tfds."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def locate_cifar10():
    """Where CIFAR-10 is when no --data_dir is given: (kind, path, places looked), kind
    "local" (the python layout, for load_local_cifar10), "tfds" (a TFDS data_dir holding a
    prepared cifar10) or None (not found: download)."""
    looked = []
    env_dir = os.environ.get("CIFAR10_DIR")
    if env_dir:
        found = find_local_cifar10(os.path.expanduser(env_dir))
        if found:
            return "local", found, looked
        looked.append(f"$CIFAR10_DIR={env_dir}")
        logging.warning("CIFAR10_DIR=%s holds no CIFAR-10 python layout; looking further", env_dir)
    else:
        looked.append("$CIFAR10_DIR (not set)")
    cache = keras_cache()
    for name in KERAS_CACHE_NAMES:
        candidate = os.path.join(cache, name)
        if name.endswith("_archive"):  # load_data's tarball, without .tar.gz in its name
            if os.path.isfile(candidate):
                return "local", candidate, looked
        elif os.path.exists(candidate) and find_local_cifar10(candidate):
            return "local", find_local_cifar10(candidate), looked
    looked.append(f"the Keras cache {cache}")
    tfds_dir = tfds_data_dir()
    if os.path.isdir(os.path.join(tfds_dir, "cifar10")):
        return "tfds", tfds_dir, looked
    looked.append(f"TensorFlow Datasets' data_dir {tfds_dir}")
    return None, "", looked


def not_found(looked, why: str) -> DataError:
    return DataError(f"CIFAR-10 not found (looked in {', '.join(looked)}) and {why}; pass "
                     f"--data_dir=DIR (a folder holding {BATCH_FOLDER}/ or {TARBALL}), or "
                     "train on the sample shipped with cifar_dist: --dataset=sample")


def download_origin():
    """(url, md5) of the download: the official ones unless CIFAR10_URL names a mirror."""
    url = os.environ.get("CIFAR10_URL")
    if not url:
        return CIFAR10_URL, CIFAR10_MD5
    return url, os.environ.get("CIFAR10_MD5") or CIFAR10_MD5


def is_download_chief(cfg) -> bool:
    """Worker 0 of a multi-worker run (as distribute.py numbers them) or a single process:
    read from TF_CONFIG / SLURM_PROCID, as the strategy does not exist yet."""
    if cfg.strategy != "multi_worker":
        return True
    raw = os.environ.get("TF_CONFIG") if cfg.cluster in ("auto", "tf_config") else None
    if raw:
        try:
            tf_config = json.loads(raw)
            task, cluster = tf_config["task"], tf_config["cluster"]
            if task["type"] == "chief":
                return True
            return task["type"] == "worker" and task["index"] == 0 and "chief" not in cluster
        except (ValueError, KeyError, TypeError):
            return True  # a bad TF_CONFIG fails with its own message when the strategy starts
    procid = os.environ.get("SLURM_PROCID")
    return procid is None or procid.strip() == "0"


def download_cifar10(looked, is_chief: bool = True) -> str:
    """Downloads cifar-10-python.tar.gz into the Keras cache; returns its path.

    The file appears under its final name only complete and with the right MD5
    (atomic.staged); other workers wait for that name to appear."""
    cache = keras_cache()
    target = os.path.join(cache, TARBALL)
    url, md5 = download_origin()
    if not is_chief:
        wait = float(os.environ.get("CIFAR10_WAIT_SECONDS") or DOWNLOAD_WAIT_SECONDS)
        logging.info("waiting up to %.0f s for worker 0 to download CIFAR-10 into %s", wait, target)
        deadline = time.monotonic() + wait
        while not os.path.isfile(target):
            if time.monotonic() > deadline:
                raise DataError(f"waited {wait:.0f} s for worker 0 to download CIFAR-10 into "
                                f"{target} (see its log; each host has its own Keras cache "
                                "unless the home folder is shared); pass --data_dir=DIR on a "
                                "filesystem every worker sees, or --dataset=sample")
            time.sleep(1)
        return target
    try:
        os.makedirs(cache, exist_ok=True)
        tempfile.TemporaryFile(dir=cache).close()  # writable? (os.access misjudges some mounts)
    except OSError as e:
        raise not_found(looked, f"the Keras cache {cache} is not writable ({e.strerror}); "
                                "set KERAS_HOME to a writable folder") from None
    logging.info("CIFAR-10 not found (looked in %s): downloading %s (163 MiB) into %s",
                 ", ".join(looked), url, target)
    old_timeout = socket.getdefaulttimeout()
    # Keras' get_file writes straight to the name it is given and keeps a file whose hash
    # is wrong: it is given a private temporary name, renamed only when complete and right.
    try:
        with atomic.staged(target, private=True) as partial:
            import keras  # noqa: PLC0415 (slow import, only when downloading)

            socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT)
            try:
                keras.utils.get_file(os.path.basename(partial), origin=url, file_hash=md5,
                                     hash_algorithm="md5", cache_dir=cache, cache_subdir="")
            except ValueError:  # get_file: the hash does not match (the file is still there)
                got = _md5(partial) if os.path.isfile(partial) else "?"
                raise DataError(f"download from {url}: MD5 {got} is not the expected {md5} (a "
                                "truncated or damaged download, or another file); nothing was "
                                f"kept in {cache}; retry, or pass --data_dir=DIR, or use "
                                "--dataset=sample") from None
            except Exception as e:  # noqa: BLE001 - URL errors, short reads, resets, timeouts
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise not_found(looked, f"the download from {url} failed ({first})") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    logging.info("downloaded CIFAR-10 (MD5 %s) to %s", md5, target)
    return target


def _md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()
