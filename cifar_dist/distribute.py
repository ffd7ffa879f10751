"""Devices, cluster and strategy: one function maps --strategy to a tf.distribute strategy.

Call `make_strategy` first thing in the program, before any TensorFlow op runs: logical
CPU devices and collective ops can only be configured at start-up.

  one_device    the first GPU, else the CPU
  mirrored      all local GPUs (or --num_gpus), or --num_cpu_devices logical CPUs
  multi_worker  MultiWorkerMirroredStrategy; the cluster comes from TF_CONFIG or SLURM
  default       TensorFlow's default strategy (no distribution)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import socket
import time

import tensorflow as tf
from absl import logging

from cifar_dist import preflight, signals
from cifar_dist.errors import ClusterError, ConfigError, PeersMissing, peer_cause, printable


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """Where this process sits: workers, its index, and whether it writes model_dir."""

    num_workers: int = 1
    worker_index: int = 0

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0


# --------------------------------------------------------------------------- cluster resolution

def parse_tf_config(raw: str) -> dict:
    """Validates TF_CONFIG and returns it; every problem names the variable.

    Whatever JSON it holds: types are checked before use (task.type a job name, task.index
    an integer, not a bool), and each address is "host:port" with an ASCII host (IPv6 in
    brackets, "[::1]:2222") and a port in 1..65535, no address listed twice."""
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ClusterError(f"TF_CONFIG is not valid JSON ({e})") from None
    except RecursionError:
        raise ClusterError("TF_CONFIG is nested too deeply to be a cluster") from None
    if not isinstance(tf_config, dict):
        raise ClusterError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster, task = tf_config.get("cluster"), tf_config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ClusterError("TF_CONFIG has no 'cluster' (e.g. {\"worker\": [\"host1:port\", ...]})")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ClusterError("TF_CONFIG has no 'task' with 'type' and 'index'")
    jobs = {name: hosts for name, hosts in cluster.items()}
    seen = {}
    for name, hosts in jobs.items():
        if not isinstance(hosts, list) or not hosts or not all(
                isinstance(h, str) and ":" in h for h in hosts):
            raise ClusterError(f"TF_CONFIG cluster.{name} must be a list of 'host:port' strings")
        for index, address in enumerate(hosts):
            where = f"TF_CONFIG cluster.{name}[{index}]={address!r}"
            host, port = split_address(address, where)
            key = (host.lower(), port)
            if key in seen:
                raise ClusterError(f"{where}: the same address as {seen[key]}: each worker "
                                   "needs its own port")
            seen[key] = f"cluster.{name}[{index}]"
    kind, index = task["type"], task["index"]
    if not isinstance(kind, str) or kind not in jobs:
        raise ClusterError(f"TF_CONFIG task.type={kind!r} is not a job in cluster "
                           f"({', '.join(jobs)})")
    if isinstance(index, bool) or not isinstance(index, int) \
            or not 0 <= index < len(jobs[kind]):
        raise ClusterError(f"TF_CONFIG task.index={index!r} is out of range for "
                           f"{len(jobs[kind])} {kind} task(s) (an integer, 0 to "
                           f"{len(jobs[kind]) - 1})")
    if set(jobs) - {"worker", "chief"}:
        raise ClusterError(f"TF_CONFIG jobs {sorted(set(jobs) - {'worker', 'chief'})} are not "
                           "used by multi_worker: list every process under 'worker'")
    if len(jobs.get("chief", [])) > 1:
        raise ClusterError(f"TF_CONFIG cluster.chief lists {len(jobs['chief'])} addresses: "
                           "there is at most one chief (list the others under 'worker')")
    return tf_config


def split_address(address: str, where: str) -> tuple:
    """"host:port" -> (host, port); ClusterError naming `where` unless the host is printable
    ASCII without spaces (an IPv6 address in brackets) and the port is in 1..65535."""
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or ":" not in host:
            raise ClusterError(f"{where}: brackets are for IPv6 addresses ([::1]:2222)")
    elif ":" in host:
        raise ClusterError(f"{where}: an IPv6 address needs brackets, [{host}]:{port}")
    if not host or not (host.isascii() and host.isprintable()) or any(
            c.isspace() or c in "/@[]" for c in host):
        raise ClusterError(f"{where}: bad host {host!r} (a host name or IP address, then "
                           ":port)")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ClusterError(f"{where}: bad port {port!r} (1 to 65535)")
    return host, int(port)


def slurm_port_base() -> int:
    """A per-job port range, so two jobs sharing a node do not collide (8 ports per job)."""
    return 15000 + (_slurm_int("SLURM_JOB_ID", default="0") % 5000) * 8


def _slurm_int(name: str, default: str = "") -> int:
    value = os.environ.get(name, default)
    # ASCII digits only: str.isdigit also takes '²', which int() then refuses.
    if not (value.isascii() and value.isdigit()):
        raise ClusterError(f"{name}={value!r} is not a number")
    return int(value)


def bind_local_gpus(local_id: int, tasks_here: int) -> None:
    """Gives this task its own slice of the node's GPUs (CUDA_VISIBLE_DEVICES).

    When SLURM already bound GPUs per task (fewer visible than tasks here), or there is
    one task per node, nothing changes. Ids are taken from the visible list, never
    renumbered from 0 (a shared node's "4,5" stays "4,5").
    """
    if tasks_here <= 1:
        return
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        visible = preflight.nvidia_smi_gpus() or []
    if len(visible) < tasks_here:
        return  # bound per task by SLURM (or no GPUs): leave it alone
    per_task = len(visible) // tasks_here
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[local_id * per_task:
                                                          (local_id + 1) * per_task])


def slurm_resolver():
    """The cluster from SLURM's step variables, in SLURM's own rank order.

    Not tf.distribute's SlurmClusterResolver: it sorts host names as strings (node10 before
    node9, while SLURM gives rank 0 to node9), needs nvidia-smi even on CPU nodes, and
    renumbers CUDA_VISIBLE_DEVICES from 0 (see BUILD_NOTES.md). Only its host-list parsers
    are reused.
    """
    from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (  # noqa: PLC0415
        expand_hostlist, expand_tasks_per_node)

    for name in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                 "SLURM_STEP_TASKS_PER_NODE"):
        if name not in os.environ:
            raise ClusterError(f"{name} is not set: run multi_worker under `srun` inside an "
                               "allocation (sbatch slurm/train.sh), or set TF_CONFIG")
    rank, ntasks = _slurm_int("SLURM_PROCID"), _slurm_int("SLURM_STEP_NUM_TASKS")
    if rank >= ntasks:
        raise ClusterError(f"SLURM_PROCID={rank} and SLURM_STEP_NUM_TASKS={ntasks} are "
                           "inconsistent")
    try:
        hosts = expand_hostlist(os.environ["SLURM_STEP_NODELIST"])
        counts = expand_tasks_per_node(os.environ["SLURM_STEP_TASKS_PER_NODE"])
    except (ValueError, IndexError) as e:
        raise ClusterError(f"SLURM_STEP_NODELIST / SLURM_STEP_TASKS_PER_NODE cannot be parsed "
                           f"({e})") from None
    if len(hosts) != len(counts) or sum(counts) != ntasks:
        raise ClusterError(f"SLURM_STEP_NODELIST has {len(hosts)} host(s) and "
                           f"SLURM_STEP_TASKS_PER_NODE {counts} task(s), but "
                           f"SLURM_STEP_NUM_TASKS={ntasks}: inconsistent")
    base = slurm_port_base()
    # SLURM's default block distribution: ranks fill the nodes in nodelist order.
    addresses = [f"{host}:{base + j}" for host, n in zip(hosts, counts) for j in range(n)]
    for address in addresses:  # a host name with a space, a newline, non-ASCII bytes
        split_address(address, f"SLURM_STEP_NODELIST: address {address!r}")
    node = next(i for i, end in enumerate(itertools.accumulate(counts)) if rank < end)
    local_id = rank - sum(counts[:node])
    if os.environ.get("SLURM_LOCALID", str(local_id)) != str(local_id):
        raise ClusterError(f"SLURM_LOCALID={os.environ['SLURM_LOCALID']} but rank {rank} should "
                           f"be task {local_id} on {hosts[node]}: only block distribution "
                           "(srun's default) is supported")
    bind_local_gpus(local_id, counts[node])
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": addresses}), task_type="worker", task_id=rank,
        rpc_layer="grpc")


def cluster_resolver(cfg):
    source = cfg.cluster
    if source == "auto":
        if "TF_CONFIG" in os.environ:
            source = "tf_config"
        elif "SLURM_PROCID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ:
            source = "slurm"
        else:
            raise ClusterError("--strategy=multi_worker needs a cluster: set TF_CONFIG "
                               "(launch/local.py does), or run under srun (slurm/train.sh)")
    if source == "tf_config":
        if "TF_CONFIG" not in os.environ:
            raise ClusterError("--cluster=tf_config but TF_CONFIG is not set")
        parse_tf_config(os.environ["TF_CONFIG"])
        preflight.check_cluster_addresses(os.environ["TF_CONFIG"])
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return slurm_resolver()


# --------------------------------------------------------------------------- start-up wait
#
# Creating MultiWorkerMirroredStrategy blocks inside one TensorFlow call (starting the
# server, registering with the coordination service, a barrier of all workers) that holds
# the GIL: no Python signal handler, watchdog thread or timer runs until it returns, and it
# replaces the SIGTERM handler. So a worker first waits for the others here, in Python,
# where a signal ends the wait at once and a deadline bounds it; TensorFlow's own wait
# that follows is then short, and bounded by the same timeout (see BUILD_NOTES.md,
# "Start-up: waiting for the workers").

POLL_SECONDS = 0.5  # between rounds of probes, and the connect timeout of each probe
REMIND_SECONDS = 60.0  # a "still waiting" line this often
NAMES_SHOWN = 8  # workers named in one line; more are counted


def cluster_tasks(spec: dict) -> list:
    """(job, index, "host:port") of every task of a ClusterSpec.as_dict(), chief first."""
    tasks = []
    for job in sorted(spec, key=lambda name: name != "chief"):
        hosts = spec[job]
        pairs = sorted(hosts.items()) if isinstance(hosts, dict) else enumerate(hosts)
        tasks += [(job, int(i), address) for i, address in pairs]
    return tasks


def describe(tasks) -> str:
    """worker 1 (host:23456), worker 2 (...) [and N more]: one printable line."""
    names = [f"{job} {i} ({printable(address)})" for job, i, address in tasks]
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + more


def answers(address: str, timeout: float) -> bool:
    """Whether something accepts TCP connections at host:port (a worker that has started:
    it listens on its port, in wait_for_workers and then as TensorFlow's server)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _listen(port: int) -> socket.socket:
    """This worker's own port, held open while it waits so the others can see it started."""
    dual = socket.has_dualstack_ipv6()  # peers may reach this host over IPv4 or IPv6
    try:
        listener = socket.create_server(("", port), family=socket.AF_INET6 if dual
                                        else socket.AF_INET, dualstack_ipv6=dual, backlog=64)
    except OSError as e:
        raise ClusterError(f"this worker cannot listen on its port {port} ({e.strerror}): "
                           "another process holds it?") from None
    listener.setblocking(False)
    return listener


def _drain(listener: socket.socket) -> None:
    """Accepts and closes the peers' probes, so the backlog never fills up."""
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.close()


def wait_for_workers(tasks, me, timeout: float) -> None:
    """Returns when every task other than `me` (job, index) has been seen listening on its
    port; raises PeersMissing, naming the rest, after `timeout` seconds.

    Each worker listens on its own port meanwhile, so the others see it; a worker that has
    seen everyone closes its port and hands it to TensorFlow's server, which answers the
    probes of workers that have not finished waiting. A signal ends the wait within about
    POLL_SECONDS (signals.current() raises Interrupted)."""
    own = next(address for job, i, address in tasks if (job, i) == me)
    missing = [t for t in tasks if t[:2] != me]
    if not missing:
        return
    stop = signals.current()
    deadline = time.monotonic() + timeout
    logging.info("waiting up to %.0f s (--startup_timeout) for %d other worker(s) to start: "
                 "%s", timeout, len(missing), describe(missing))
    remind = time.monotonic() + REMIND_SECONDS
    with _listen(int(own.rpartition(":")[2])) as listener:
        while True:
            still = []
            for task in missing:  # seen once is enough: it is in this wait, or past it
                if stop is not None:
                    stop.check()
                _drain(listener)
                if not answers(task[2], POLL_SECONDS):
                    still.append(task)
            missing = still
            if not missing:
                break
            now = time.monotonic()
            if now >= deadline:
                raise PeersMissing(
                    f"{describe(missing)} did not start within --startup_timeout={timeout:g} s "
                    "(nothing listens at its address): start every worker of the cluster "
                    "(or fix its address), then rerun them all")
            if now >= remind:
                logging.info("still waiting for %s", describe(missing))
                remind = now + REMIND_SECONDS
            time.sleep(min(POLL_SECONDS, deadline - now))  # a signal's handler runs here
    logging.info("every worker has started: forming the cluster")


def _bound_tensorflow_wait(resolver, timeout: float) -> None:
    """The backstop: TensorFlow's own registration waits at most `timeout` too.

    MultiWorkerMirroredStrategy configures the coordination service itself, with no bound
    on the leader's wait for the others (a barrier of one hour), unless one is configured
    already: this is its configuration plus a registration barrier with a timeout. It
    matters only if a worker dies between wait_for_workers and registering."""
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2  # noqa: PLC0415
    from tensorflow.python.distribute import multi_worker_util  # noqa: PLC0415
    from tensorflow.python.eager import context  # noqa: PLC0415

    if context.context().coordination_service is not None:
        return
    spec = multi_worker_util.normalize_cluster_spec(resolver.cluster_spec())
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(
            name=job, num_tasks=spec.num_tasks(job)) for job in ("chief", "worker")
            if job in spec.jobs],
        cluster_register_timeout_in_ms=int(timeout * 1000))
    # Not a parameter of configure_coordination_service: without it the timeout bounds only
    # the other workers' attempts to reach the leader, not the leader's wait for them.
    context.context().coordination_service.cluster_register_with_barrier = True


# --------------------------------------------------------------------------- strategies

def _communication(cfg):
    impl = {"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
            "ring": tf.distribute.experimental.CommunicationImplementation.RING,
            "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL}[cfg.all_reduce]
    return tf.distribute.experimental.CommunicationOptions(
        implementation=impl, timeout_seconds=cfg.collective_timeout)


def _split_cpu(n: int) -> None:
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
        raise ClusterError(f"cannot split the CPU into {n} devices after TensorFlow started "
                           f"({e}); make_strategy must run first") from None


def make_strategy(cfg):
    """Returns (strategy, ClusterInfo). Must run before any other TensorFlow op."""
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:  # take GPU memory as needed, so several processes can share a node in tests
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    if cfg.all_reduce == "nccl" and not gpus:
        raise ConfigError("--all_reduce=nccl needs GPUs; use ring (or auto) on CPUs")

    if cfg.strategy == "default":
        return tf.distribute.get_strategy(), ClusterInfo()
    if cfg.strategy == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0"), ClusterInfo()
    if cfg.strategy == "mirrored":
        if gpus and not cfg.num_cpu_devices:
            n = len(gpus) if cfg.num_gpus < 0 else cfg.num_gpus
            if not 1 <= n <= len(gpus):
                raise ConfigError(f"--num_gpus={cfg.num_gpus} but {len(gpus)} GPU(s) are visible")
            devices = [f"/gpu:{i}" for i in range(n)]
            cross = {"nccl": tf.distribute.NcclAllReduce(),
                     "ring": tf.distribute.HierarchicalCopyAllReduce()}.get(cfg.all_reduce)
        else:
            n = cfg.num_cpu_devices or 1
            if cfg.num_gpus > 0 and not gpus:
                raise ConfigError(f"--num_gpus={cfg.num_gpus} but no GPU is visible; "
                                  "use --num_cpu_devices=N to run N replicas on the CPU")
            if n > 1:
                _split_cpu(n)
            devices = [f"/cpu:{i}" for i in range(n)]
            cross = None  # MirroredStrategy picks collective all-reduce for CPU devices
        logging.info("MirroredStrategy on %s", devices)
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross), ClusterInfo()

    # multi_worker
    resolver = cluster_resolver(cfg)
    spec = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, resolver.task_id
    wait_for_workers(cluster_tasks(spec), (task_type, task_id), cfg.startup_timeout)
    _bound_tensorflow_wait(resolver, cfg.startup_timeout)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=_communication(cfg))
    workers = len(cluster_tasks(spec))
    index = task_id + (1 if task_type == "worker" and "chief" in spec else 0)
    logging.info("MultiWorkerMirroredStrategy: %s:%d of %d workers", task_type, task_id, workers)
    return strategy, ClusterInfo(num_workers=workers, worker_index=index)


# --------------------------------------------------------------------------- the end

# How long a worker waits at the end for the others (the chief's export and evaluation).
LEAVE_TIMEOUT_SECONDS = 3600.0


def leave_together(cluster: ClusterInfo, timeout: float = LEAVE_TIMEOUT_SECONDS) -> None:
    """Every worker of a finished multi-worker run waits here for the others (the chief
    exports and evaluates after training), so none exits while the chief still works:
    TensorFlow's coordination service would log a missing worker's heartbeats as an
    error on the chief. A worker whose peers are gone (the chief died in its export) or
    late past `timeout` logs one line and ends normally: its own part is done."""
    if cluster.num_workers <= 1:
        return
    from tensorflow.python.eager import context  # noqa: PLC0415

    try:
        context.context().wait_at_barrier("cifar_dist_finished", int(timeout * 1000))
    except tf.errors.OpError as e:
        logging.warning("finished, but not every worker reached the end together (%s)",
                        peer_cause(e.message))
