"""Runs the benchmark: every method in a fresh child process (`python -m cifar_dist.bench
--child=METHOD --child_output=FILE`, unless --noisolate), the matmul at the start and the
end, (7)'s two workers, and the record of the machine; the raw results then go to
report.derive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from cifar_dist.bench import hlo_profile
from cifar_dist.bench.settings import METHODS, Settings

# the directory that holds the cifar_dist package: children import this copy of it
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_argv(settings: Settings, name: str, output: str) -> list:
    """The command of a child process that runs one method and writes its result."""
    return [sys.executable, "-m", "cifar_dist.bench", f"--child={name}",
            f"--child_output={output}", *settings.child_args()]


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


POLL_SECONDS = 0.2  # how often a wait for children looks at the stop flag


def _wait(procs, timeout):
    """Each process's output; a timeout, or a signal to this process (signals.py: the
    flag is checked every POLL_SECONDS, Interrupted raised) ends them too."""
    from cifar_dist import signals  # noqa: PLC0415

    stop = signals.current() or signals.StopRequest()
    deadline = None if timeout is None else time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            while True:
                stop.check()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(p.args, timeout)
                try:
                    outputs.append(p.communicate(timeout=min(POLL_SECONDS, left or POLL_SECONDS)))
                    break
                except subprocess.TimeoutExpired:
                    continue
        return outputs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def run_child(cmd, env) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True), ended by a signal to this one."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    [(out, err)] = _wait([proc], None)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def run_isolated(settings: Settings, name: str, tmp: str) -> dict:
    output = os.path.join(tmp, f"{name}.json")
    extra = {}
    if name == "profile":
        flag = hlo_profile.PROFILE_XLA_FLAG
        extra["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    proc = subprocess.Popen(child_argv(settings, name, output), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(**extra))
    [(_, stderr)] = _wait([proc], settings.timeout)
    if proc.returncode != 0 or not os.path.exists(output):
        raise RuntimeError(f"method {name} failed (exit {proc.returncode}):\n"
                           f"{(stderr or '')[-4000:]}")
    return _read_json(output)


def run_two_workers(settings: Settings, tmp: str) -> list:
    from cifar_dist.preflight import free_ports  # noqa: PLC0415

    ports = free_ports(2)
    procs, outputs = [], []
    for i in range(2):
        tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                     "task": {"type": "worker", "index": i}}
        output = os.path.join(tmp, f"multiworker_{i}.json")
        outputs.append(output)
        procs.append(subprocess.Popen(child_argv(settings, "multiworker", output), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=child_env(TF_CONFIG=json.dumps(tf_config))))
    logs = [out for out, _ in _wait(procs, settings.timeout)]
    if any(p.returncode for p in procs) or not all(os.path.exists(o) for o in outputs):
        raise RuntimeError("multiworker failed:\n" + "\n".join(x[-3000:] for x in logs))
    return [_read_json(o) for o in outputs]


def top_processes(n=8):
    """What else was using the CPUs (for the record of the run)."""
    try:
        text = subprocess.run(["ps", "-eo", "pid,pcpu,etimes,comm,args", "--sort=-pcpu"],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[:160] for line in text.splitlines()[1:n + 1]]


def run_benchmark(settings: Settings) -> dict:
    """Every method the settings name, in order, and the machine's record: the raw results."""
    import tensorflow as tf  # noqa: PLC0415  (after the flags: a child starts its own)

    from cifar_dist.bench.methods import run_method  # noqa: PLC0415

    t_start = time.time()
    results = {"config": settings.reported(), "methods": {}}
    results["machine"] = {
        "cpus": os.cpu_count(), "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "tensorflow": tf.__version__, "python": sys.version.split()[0],
        "load_average_before": os.getloadavg(), "top_processes_before": top_processes()}
    order = [m for m in METHODS if m in settings.methods and m != "matmul"]
    matmul_runs = []
    with tempfile.TemporaryDirectory(prefix="cifar_dist_bench_") as tmp:
        def run(name):
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            t0 = time.time()
            # the profile needs XLA_FLAGS before TensorFlow starts: always its own process
            isolate = settings.isolate or name == "profile"
            out = run_isolated(settings, name, tmp) if isolate else run_method(name, settings)
            print(f"[bench] {name}: {out.get('images_per_second', out.get('gflops')):.1f} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            return out

        if "matmul" in settings.methods:
            matmul_runs.append(run("matmul"))
        for name in order:
            if name == "profile":
                results["profile"] = run(name)
            else:
                results["methods"][name] = run(name)
        if settings.multiworker:
            print("[bench] multiworker (2 workers) ...", file=sys.stderr, flush=True)
            results["multiworker"] = {"workers": run_two_workers(settings, tmp)}
        if "matmul" in settings.methods and len(order) > 0:
            matmul_runs.append(run("matmul"))
    if matmul_runs:
        results["methods"]["matmul"] = dict(matmul_runs[0], runs=matmul_runs)
    results["machine"]["load_average_after"] = os.getloadavg()
    results["machine"]["top_processes_after"] = top_processes()
    results["wall_seconds"] = time.time() - t_start
    return results
