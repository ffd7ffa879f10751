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
import tempfile
import time
import urllib.parse
from typing import Optional

from absl import logging

from cifar_dist import atomic
from cifar_dist.errors import DataError, Interrupted

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
# Every wait of the download has a bound. A stalled server: seconds without a byte. A
# trickling one (a byte a second never stalls): under DOWNLOAD_MIN_RATE bytes/s over any
# DOWNLOAD_RATE_WINDOW seconds. And the whole download: DOWNLOAD_DEADLINE seconds.
DOWNLOAD_SOCKET_TIMEOUT = 60
DOWNLOAD_MIN_RATE = 20_000
DOWNLOAD_RATE_WINDOW = 60.0
DOWNLOAD_DEADLINE = 3 * 3600.0
DOWNLOAD_SCHEMES = ("http", "https", "ftp", "file")
# How often a worker waiting for worker 0's download looks for the file and for a signal.
WAIT_POLL_SECONDS = 0.2
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
    if _tfds_prepared(os.path.join(tfds_dir, "cifar10")):
        return "tfds", tfds_dir, looked
    if os.path.isdir(os.path.join(tfds_dir, "cifar10")):
        # An interrupted TFDS build leaves cifar10/ without a finished version: not data,
        # and no reason to skip the download.
        logging.warning("%s holds no prepared CIFAR-10 (an interrupted TFDS build?); "
                        "ignored (delete it to silence this)", os.path.join(tfds_dir, "cifar10"))
    looked.append(f"TensorFlow Datasets' data_dir {tfds_dir}")
    return None, "", looked


def _tfds_prepared(folder: str) -> bool:
    """Whether a TFDS dataset folder holds a finished version (VERSION/dataset_info.json:
    TFDS writes it last, in a folder renamed from VERSION.incomplete* when the build ends)."""
    try:
        versions = os.listdir(folder)
    except OSError:
        return False
    return any(os.path.isfile(os.path.join(folder, v, "dataset_info.json"))
               for v in versions if "incomplete" not in v)


def not_found(looked, why: str) -> DataError:
    return DataError(f"CIFAR-10 not found (looked in {', '.join(looked)}) and {why}; pass "
                     f"--data_dir=DIR (a folder holding {BATCH_FOLDER}/ or {TARBALL}), or "
                     "train on the sample shipped with cifar_dist: --dataset=sample")


def download_origin():
    """(url, md5) of the download: the official ones unless CIFAR10_URL names a mirror."""
    url = os.environ.get("CIFAR10_URL")
    if not url:
        return CIFAR10_URL, CIFAR10_MD5
    md5 = os.environ.get("CIFAR10_MD5") or CIFAR10_MD5
    # Checked before a byte is fetched (not after the whole download, as an MD5 mismatch).
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in DOWNLOAD_SCHEMES or not (parsed.netloc or parsed.scheme == "file") \
            or not url.isprintable():
        raise DataError(f"CIFAR10_URL={url!r} is not a URL ({', '.join(DOWNLOAD_SCHEMES)}: "
                        "e.g. https://host/cifar-10-python.tar.gz); unset it for the official one")
    if len(md5) != 32 or any(c not in "0123456789abcdefABCDEF" for c in md5):
        raise DataError(f"CIFAR10_MD5={md5!r} is not an MD5 (32 hexadecimal digits)")
    return url, md5.lower()


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
        stop = _stop_request()
        while not os.path.isfile(target):
            stop.check()  # a signal ends the wait within WAIT_POLL_SECONDS
            if time.monotonic() > deadline:
                raise DataError(f"waited {wait:.0f} s for worker 0 to download CIFAR-10 into "
                                f"{target} (see its log; each host has its own Keras cache "
                                "unless the home folder is shared); pass --data_dir=DIR on a "
                                "filesystem every worker sees, or --dataset=sample")
            time.sleep(WAIT_POLL_SECONDS)
        return target
    try:
        os.makedirs(cache, exist_ok=True)
        tempfile.TemporaryFile(dir=cache).close()  # writable? (os.access misjudges some mounts)
    except OSError as e:
        raise not_found(looked, f"the Keras cache {cache} is not writable ({e.strerror}); "
                                "set KERAS_HOME to a writable folder") from None
    logging.info("CIFAR-10 not found (looked in %s): downloading %s (163 MiB) into %s",
                 ", ".join(looked), url, target)
    # Written under a private temporary name, renamed only when complete and right.
    stop = _stop_request()
    with atomic.staged(target) as partial:
        try:
            with stop.interruptible():  # a signal ends even a blocked read at once
                got = _fetch(url, partial, stop)
        except DataError:
            raise
        except Interrupted:
            raise
        except Exception as e:  # noqa: BLE001 - URL errors, short reads, resets, timeouts
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise not_found(looked, f"the download from {url} failed ({first})") from None
        if got != md5:
            raise DataError(f"download from {url}: MD5 {got} is not the expected {md5} (a "
                            "truncated or damaged download, or another file); nothing was "
                            f"kept in {cache}; retry, or pass --data_dir=DIR, or use "
                            "--dataset=sample")
    logging.info("downloaded CIFAR-10 (MD5 %s) to %s", md5, target)
    return target


def _stop_request():
    from cifar_dist import signals  # noqa: PLC0415

    return signals.current() or signals.StopRequest()  # none in force: checks never fire


def _fetch(url: str, path: str, stop) -> str:
    """Downloads url into path; returns its MD5. Every wait is bounded (the DOWNLOAD_*
    limits above: DataError naming the one exceeded); progress is logged every 10%."""
    import urllib.request  # noqa: PLC0415

    digest = hashlib.md5()
    start = window_start = time.monotonic()
    total = window_bytes = 0
    with urllib.request.urlopen(url, timeout=DOWNLOAD_SOCKET_TIMEOUT) as response, \
            open(path, "wb") as out:
        size = int(response.headers.get("Content-Length") or 0)
        next_note = 0.1
        while True:
            stop.check()
            chunk = response.read1(1 << 16) if hasattr(response, "read1") \
                else response.read(1 << 16)
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            total += len(chunk)
            window_bytes += len(chunk)
            now = time.monotonic()
            if now - start > DOWNLOAD_DEADLINE:
                raise DataError(f"download from {url}: not done after {DOWNLOAD_DEADLINE:.0f} s "
                                f"({total} bytes); nothing was kept; retry, or pass "
                                "--data_dir=DIR, or use --dataset=sample")
            if now - window_start >= DOWNLOAD_RATE_WINDOW:
                rate = window_bytes / (now - window_start)
                if rate < DOWNLOAD_MIN_RATE:
                    raise DataError(f"download from {url}: too slow ({rate:.0f} bytes/s over "
                                    f"{now - window_start:.0f} s, under {DOWNLOAD_MIN_RATE}); "
                                    "nothing was kept; retry later, or pass --data_dir=DIR, "
                                    "or use --dataset=sample")
                window_start, window_bytes = now, 0
            if size and total >= next_note * size:
                logging.info("downloaded %.0f%% (%d MiB)", 100 * total / size, total >> 20)
                next_note += 0.1
    if size and total < size:
        raise DataError(f"download from {url}: retrieval incomplete (got {total} of {size} "
                        "bytes); nothing was kept; retry, or pass --data_dir=DIR, or use "
                        "--dataset=sample")
    return digest.hexdigest()


def _md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()
