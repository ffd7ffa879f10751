"""Checks that run before training starts, so a bad setting fails in seconds, not after an
epoch; and what this host offers a launcher (free ports, the GPUs nvidia-smi lists).

No TensorFlow here: launch/local.py imports this module (and errors.py) too. The model_dir
lock lives in run_dir.py, with everything else under model_dir.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

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
    """n distinct free TCP ports on this host (all n sockets stay open until all are chosen),
    for local workers (launch/local.py, the tests, the benchmark)."""
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


def nvidia_smi_gpus(timeout: float = 60) -> list[str] | None:
    """The GPU ids `nvidia-smi -L` lists ("0", "1", ...), or None when there is no
    nvidia-smi or it fails (no driver, a CPU node)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def check_cluster_addresses(tf_config_raw: str) -> None:
    """Every worker's host must resolve, and this worker's own port must be free."""
    tf_config = json.loads(tf_config_raw)
    task = tf_config["task"]
    for job, hosts in tf_config["cluster"].items():
        for index, address in enumerate(hosts):
            # host:port, [IPv6]:port, port 1..65535: checked first by distribute.parse_tf_config
            host, _, port = address.rpartition(":")
            host = host[1:-1] if host.startswith("[") else host  # [::1] -> ::1
            try:
                socket.getaddrinfo(host, int(port))
            except (socket.gaierror, UnicodeError) as e:
                raise ClusterError(f"TF_CONFIG cluster.{job}[{index}]: host {host!r} does not "
                                   f"resolve ({getattr(e, 'strerror', None) or e})") from None
            if job == task["type"] and index == task["index"]:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind(("", int(port)))
                    except OSError:
                        raise ClusterError(f"TF_CONFIG: this worker's port {port} is already in "
                                           "use (another job on this host?)") from None
