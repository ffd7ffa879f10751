"""Checks that run before training starts, so a bad setting fails in seconds, not after an
epoch; and the model_dir lock that keeps two runs from writing the same folder."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket

from cifar_dist.errors import ClusterError, ConfigError

# weights + SGD momentum + a second copy while the previous checkpoint is still kept
CHECKPOINT_COPIES = 3


def existing_ancestor(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def check_model_dir(path: str) -> None:
    """model_dir must be (or be creatable as) a writable folder. Writes nothing."""
    if not path:
        raise ConfigError("--model_dir is required (where checkpoints and metrics.json go)")
    probe = existing_ancestor(path)
    if not os.path.isdir(probe):
        raise ConfigError(f"--model_dir={path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--model_dir={path}: {probe} is not writable")


def check_disk_space(path: str, num_params: int, keep: int) -> None:
    """Room for `keep` checkpoints of float32 weights and optimizer slots, with margin."""
    need = num_params * 4 * CHECKPOINT_COPIES * (keep + 1)
    free = shutil.disk_usage(existing_ancestor(path)).free
    if free < need:
        raise ConfigError(f"--model_dir={path}: {free / 2**20:.1f} MiB free, checkpoints need "
                          f"about {need / 2**20:.1f} MiB; free space or lower --keep_checkpoints")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on this host (all n sockets stay open until all are chosen).

    For launching local workers; launch/local.py keeps its own copy so that the launcher
    imports nothing from cifar_dist (and so no TensorFlow)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def check_cluster_addresses(tf_config_raw: str) -> None:
    """Every worker's host must resolve, and this worker's own port must be free."""
    tf_config = json.loads(tf_config_raw)
    task = tf_config["task"]
    for job, hosts in tf_config["cluster"].items():
        for index, address in enumerate(hosts):
            host, _, port = address.rpartition(":")
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ClusterError(f"TF_CONFIG cluster.{job}[{index}]={address!r}: bad port")
            try:
                socket.getaddrinfo(host, int(port))
            except socket.gaierror as e:
                raise ClusterError(f"TF_CONFIG cluster.{job}[{index}]: host {host!r} does not "
                                   f"resolve ({e.strerror})") from None
            if job == task["type"] and index == task["index"]:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind(("", int(port)))
                    except OSError:
                        raise ClusterError(f"TF_CONFIG: this worker's port {port} is already in "
                                           "use (another job on this host?)") from None


class ModelDirLock:
    """An exclusive advisory lock on model_dir/.lock for the life of the run.

    The kernel drops it when the process dies (even by SIGKILL), so a crashed run never
    leaves a stale lock behind. Needs a filesystem with working flock (local disks, most
    cluster filesystems; see BUILD_NOTES.md).
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, ".lock")
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise ConfigError(f"--model_dir={os.path.dirname(self.path)} is in use by another "
                              f"run (pid {owner}); wait for it or use another --model_dir")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        return False


def lock_owner(model_dir: str):
    """The pid (a string, "?" if unknown) of the run holding model_dir/.lock, or None when
    no run holds it. Creates and writes nothing: a shared lock is taken and dropped."""
    try:
        fd = os.open(os.path.join(model_dir, ".lock"), os.O_RDONLY)
    except OSError:  # no lock file (no run ever trained here), or unreadable: cannot tell
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
