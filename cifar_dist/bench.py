"""Throughput benchmark: cifar_dist's XLA step against the Keras ways of training the same net.

    python -m cifar_dist.bench --flagfile=configs/bench.cfg --data=real \
        --data_dir=/path/to/cifar10 --output=/tmp/bench.json          # full run (~13 min, 2 CPUs)
    python -m cifar_dist.bench --tiny --output=/tmp/tiny.json       # plumbing check (tests)
    python -m cifar_dist.bench --projection --model=seed            # GPU scaling on paper

Same machine, same network (cifar_dist.model.build_model), same global batch, same dtype:

  cifar_dist        (1)  the training call as Trainer.run makes it: --steps_per_window steps
                         in one tf.function call; on one device each step (gather, augment,
                         forward, loss, gradients, update) is one XLA program
  cifar_dist_noaug  (1b) the same with --augment=false (cost of on-device augmentation)
  keras_fit         (2)  Keras 3 model.fit, the seed's augmentation as Keras preprocessing
                         layers in a tf.data map (RandomRotation/RandomTranslation/RandomFlip,
                         fill 'nearest'), jit_compile left at Keras' default ('auto')
  keras_fit_xla     (2x) the same with jit_compile=True (separates "XLA" from "custom loop")
  keras_fit_host    (3)  the seed's way: model.fit on a keras.utils.PyDataset that augments
                         each image on the host with scipy (ImageDataGenerator's arithmetic)
  pipeline          (4)  cifar_dist.pipeline.train_dataset alone, no model (host images/s)
  matmul            (5)  an n x n float32 tf.linalg.matmul: the roofline, timed at the start
                         and at the end of the run; every training method also times a short
                         matmul in its own process right before and after its windows (the
                         "adjacent" roofline: this VM's speed drifts by tens of percent)
  profile           (1p) (1) once more under the TensorFlow profiler with XLA's per-HLO-op
                         trace events on (XLA_FLAGS=--xla_cpu_enable_xprof_traceme, its own
                         process): where the step's time goes, by kind of HLO op
  multiworker       (7)  (1) on 2 workers on localhost (TF_CONFIG, ring all-reduce) at the
                         same global batch, plus a bare all-reduce of gradient-shaped tensors

Each method runs in its own fresh process (unless --noisolate) so that its peak resident
memory (ru_maxrss) is its own and no method's threads, caches or compiled code affect
another. Every method discards --warmup_windows windows (compilation, autotuning) and then
times --windows windows of --steps_per_window steps; a window ends with a device->host read
so the time covers finished work. Reported: the median window, and min / quartiles / max;
the cores the method kept busy, and the cores everything else on the machine kept busy
meanwhile (from /proc/stat: a measured record of competing work); peak resident memory.

FLOPs are the hand count (model.train_flops_per_image = 3 x conv+dense forward FLOPs, which
tests/test_gpu.py checks against the compiled HLO); GFLOP/s = FLOPs/image x images/s.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from absl import flags  # noqa: E402

from cifar_dist import cli  # noqa: E402
from cifar_dist.errors import ConfigError  # noqa: E402

METHODS = ("matmul", "pipeline", "cifar_dist", "cifar_dist_noaug", "keras_fit",
           "keras_fit_xla", "keras_fit_host", "profile")
LABELS = {
    "cifar_dist": "(1) cifar_dist XLA step, on-device aug",
    "cifar_dist_noaug": "(1b) cifar_dist XLA step, no aug",
    "keras_fit": "(2) Keras fit + aug layers in tf.data",
    "keras_fit_xla": "(2x) same, jit_compile=True",
    "keras_fit_host": "(3) Keras fit + host scipy aug (seed)",
    "pipeline": "(4) input pipeline alone",
    "matmul": "(5) fp32 matmul (roofline)",
    "multiworker": "(7) cifar_dist, 2 workers localhost",
    "profile": "(1p) cifar_dist step, profiled",
}
TINY = {"model": "tiny", "batch_size": 32, "windows": 2, "steps_per_window": 3,
        "warmup_windows": 1, "synthetic_size": 1024, "matmul_size": 512,
        "pipeline_batches": 20, "isolate": False, "multiworker": False,
        "methods": ",".join(m for m in METHODS if m not in ("keras_fit_xla", "profile"))}


def define_flags(fv: flags.FlagValues) -> None:
    """The bench command's flags (defined when it runs: cli.run_command)."""
    flags.DEFINE_bool("tiny", False, "a plumbing check in well under a minute: tiny model, batch 32, "
                      "2 short windows, all methods in this process, no multi-worker part "
                      "(flags given explicitly still win)", flag_values=fv)
    flags.DEFINE_string("output", "", "write the results as JSON here", flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "GLOBAL batch size of every training method",
                         flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"],
                      "compute dtype (mixed precision for float16/bfloat16) of every training method",
                      flag_values=fv)
    flags.DEFINE_enum("model", "seed", ["seed", "tiny"], "network", flag_values=fv)
    flags.DEFINE_enum("data", "synthetic", ["synthetic", "real"],
                      "random uint8 images, or CIFAR-10 from --data_dir", flag_values=fv)
    flags.DEFINE_string("data_dir", "", "CIFAR-10 location for --data=real (as cifar_dist.main)",
                        flag_values=fv)
    flags.DEFINE_integer("synthetic_size", 50000, "training images for --data=synthetic",
                         flag_values=fv)
    flags.DEFINE_integer("windows", 5, "timed windows per method", flag_values=fv)
    flags.DEFINE_integer("steps_per_window", 4, "training steps per window", flag_values=fv)
    flags.DEFINE_integer("warmup_windows", 1, "untimed windows first (compilation, autotuning)",
                         flag_values=fv)
    flags.DEFINE_integer("pipeline_batches", 200, "batches per window of the input-pipeline method",
                         flag_values=fv)
    flags.DEFINE_integer("matmul_size", 2048, "n of the n x n float32 roofline matmul",
                         flag_values=fv)
    flags.DEFINE_list("methods", ",".join(METHODS), f"subset of {', '.join(METHODS)}",
                      flag_values=fv)
    flags.DEFINE_bool("multiworker", True, "also run (7): 2 workers on localhost vs 1",
                      flag_values=fv)
    flags.DEFINE_enum("all_reduce", "ring", ["ring", "nccl", "auto"],
                      "(7): the workers' all-reduce (ring over gRPC on CPUs; nccl on GPUs)",
                      flag_values=fv)
    flags.DEFINE_bool("isolate", True, "each method in its own process (independent peak memory)",
                      flag_values=fv)
    flags.DEFINE_integer("timeout", 1200, "seconds any one method may take", flag_values=fv)
    # paper projection for GPUs (no training; from the FLOP and byte counts)
    flags.DEFINE_bool("projection", False, "print the GPU scaling projection from the counts and exit",
                      flag_values=fv)
    flags.DEFINE_float("gpu_tflops", 93.6, "projection: achieved TFLOP/s per GPU on this network",
                       flag_values=fv)
    flags.DEFINE_string("gpu_label", "A100, bf16, 30% of its 312 TFLOP/s dense peak",
                        "projection: what --gpu_tflops stands for", flag_values=fv)
    flags.DEFINE_list("link_gbits", "25,100,400", "projection: per-GPU ring bandwidths, Gbit/s",
                      flag_values=fv)
    flags.DEFINE_list("gpu_counts", "2,4,8,16,32,64", "projection: numbers of GPUs", flag_values=fv)
    flags.DEFINE_list("per_gpu_batches", "256,512", "projection: per-GPU batch sizes",
                      flag_values=fv)
    # the loop's fixed costs (bench_overhead.py)
    flags.DEFINE_bool("overhead", False, "measure the training loop's per-step overhead (tiny "
                      "network, 2 images per replica, one device and mirrored on 2 CPUs, SGD and "
                      "AdamW) and exit", flag_values=fv)
    flags.DEFINE_string("overhead_case", "", "internal: run one overhead case STRATEGY,OPTIMIZER",
                        flag_values=fv)
    # internal: a child process running one method
    flags.DEFINE_string("child", "", "internal: run this one method and write --child_output",
                        flag_values=fv)
    flags.DEFINE_string("child_output", "", "internal", flag_values=fv)


# The parsed flags of the running command (main sets it; #15 turns it into a settings value).
FLAGS: flags.FlagValues = None


# --------------------------------------------------------------------------- statistics

def quantile(values, q):
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarise(window_seconds, items_per_window, steps_per_window, unit="images"):
    """Per-window rates -> median / min / quartiles / max (rates in unit per second)."""
    rates = [items_per_window / t for t in window_seconds]
    return {f"{unit}_per_second": quantile(rates, 0.5),
            f"{unit}_per_second_min": min(rates), f"{unit}_per_second_max": max(rates),
            f"{unit}_per_second_q1": quantile(rates, 0.25),
            f"{unit}_per_second_q3": quantile(rates, 0.75),
            f"window_{unit}_per_second": rates,
            "window_seconds": list(window_seconds),
            "warmup_seconds": LAST_WARMUP_SECONDS[0],
            "step_seconds_median": quantile(window_seconds, 0.5) / steps_per_window,
            **load_fields()}


def load_fields() -> dict:
    """cores_busy: this process's CPU time / wall time over the timed windows (how many of
    the machine's cores the method used; os.cpu_count() is the ceiling). other_cores_busy:
    the same for everything else on the machine (competing work); steal_cores: hypervisor."""
    others = LAST_OTHERS[0] or {}
    return {"cores_busy": LAST_CORES_BUSY[0], "other_cores_busy": others.get("other_cores_busy"),
            "steal_cores": others.get("steal_cores")}


LAST_WARMUP_SECONDS = [0.0]
LAST_CORES_BUSY = [None]


def cpu_seconds() -> float:
    """CPU time of this process so far, all threads, user + system."""
    t = os.times()
    return t.user + t.system


def system_cpu_seconds():
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


LAST_OTHERS = [None]


def timed_windows(run_window, warmup, windows):
    """Calls run_window() warmup + windows times; returns the timed windows' seconds (the
    warm-up's, which include tracing and XLA compilation, go to LAST_WARMUP_SECONDS; the
    CPU cores this process kept busy during the timed windows go to LAST_CORES_BUSY)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        run_window()
    LAST_WARMUP_SECONDS[0] = time.perf_counter() - t0
    out = []
    cpu0, sys0 = cpu_seconds(), system_cpu_seconds()
    for _ in range(windows):
        t0 = time.perf_counter()
        run_window()
        out.append(time.perf_counter() - t0)
    record_load(cpu0, sys0, sum(out))
    return out


def record_load(cpu0, sys0, wall):
    """Cores this process kept busy, and cores everything else on the machine kept busy
    (machine busy time from /proc/stat minus this process's CPU time) over `wall` seconds:
    a measurement of how much other work competed with the method."""
    own = cpu_seconds() - cpu0
    LAST_CORES_BUSY[0] = own / wall if wall else None
    sys1 = system_cpu_seconds()
    if sys0 and sys1 and wall:
        LAST_OTHERS[0] = {"other_cores_busy": max(0.0, (sys1[0] - sys0[0] - own) / wall),
                          "steal_cores": (sys1[1] - sys0[1]) / wall}
    else:
        LAST_OTHERS[0] = None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --------------------------------------------------------------------------- shared set-up

def make_config(**overrides):
    from cifar_dist.config import Config  # noqa: PLC0415

    steps = (FLAGS.warmup_windows + FLAGS.windows) * FLAGS.steps_per_window + 1
    real = FLAGS.data == "real"
    values = dict(
        dataset="cifar10" if real else "synthetic", data_dir=FLAGS.data_dir,
        synthetic_train_size=FLAGS.synthetic_size, synthetic_test_size=16,
        test_subset=16 if real else 0, model=FLAGS.model, batch_size=FLAGS.batch_size,
        # SGD as in the Keras methods (2) and (3), not the seed recipe's AdamW: like with like
        optimizer="sgd", learning_rate=0.1, weight_decay=5e-4,
        train_steps=steps, dtype=FLAGS.dtype, strategy="one_device", model_dir="",
        enable_tensorboard=False, export=False, skip_eval=True, log_steps=10 ** 9)
    values.update(overrides)
    return Config(**values)


def load_bundle(cfg):
    from cifar_dist import data  # noqa: PLC0415
    return data.load(cfg)


def model_counts(model):
    from cifar_dist.model import forward_flops_per_image, train_flops_per_image  # noqa: PLC0415

    params = list(model.trainable_variables)
    n = int(sum(math.prod(tuple(v.shape)) for v in params))
    return {"forward_flops_per_image": forward_flops_per_image(model),
            "train_flops_per_image": train_flops_per_image(model),
            "trainable_params": n,
            # fp32 gradients (variables stay fp32 under mixed precision): what is all-reduced
            "gradient_bytes_per_step": 4 * n,
            "gradient_tensors": len(params)}


# --------------------------------------------------------------------------- compiled-step checks

from cifar_dist.graph_checks import (HOST_CALLBACK_OPS, function_op_types, hlo_flops,  # noqa: E402,F401
                                     images_dtype, loop_counts, step_hlo, xla_functions)



# --------------------------------------------------------------------------- (5) matmul

_ADJACENT = {}


def adjacent_matmul_gflops(reps: int = 3) -> float:
    """A short n x n float32 matmul measurement in this process, taken right before and right
    after a method's timed windows: the roofline under the same conditions as the method
    (this machine's speed drifts by tens of percent within minutes)."""
    import tensorflow as tf  # noqa: PLC0415

    n = FLAGS.matmul_size
    if not _ADJACENT:
        _ADJACENT["a"] = tf.random.normal([n, n], seed=3)
        _ADJACENT["b"] = tf.random.normal([n, n], seed=4)
        _ADJACENT["fn"] = tf.function(tf.linalg.matmul)
        float(_ADJACENT["fn"](_ADJACENT["a"], _ADJACENT["b"])[0, 0].numpy())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        float(_ADJACENT["fn"](_ADJACENT["a"], _ADJACENT["b"])[0, 0].numpy())
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / quantile(times, 0.5) / 1e9


def run_matmul():
    import tensorflow as tf  # noqa: PLC0415

    n = FLAGS.matmul_size
    a = tf.random.normal([n, n], seed=1)
    b = tf.random.normal([n, n], seed=2)
    matmul = tf.function(tf.linalg.matmul)
    reps = max(1, int(round(2e10 / (2 * n ** 3))))  # ~0.2 s per window at ~100 GFLOP/s

    def window():
        c = None
        for _ in range(reps):
            c = matmul(a, b)
        float(c[0, 0].numpy())

    secs = timed_windows(window, max(FLAGS.warmup_windows, 1), max(FLAGS.windows, 3))
    flop = 2.0 * n ** 3 * reps
    rates = [flop / t / 1e9 for t in secs]
    return {"n": n, "matmuls_per_window": reps, "gflops": quantile(rates, 0.5),
            "gflops_min": min(rates), "gflops_max": max(rates), "window_gflops": rates,
            **load_fields()}


# --------------------------------------------------------------------------- (4) pipeline

def run_pipeline(bundle):
    from cifar_dist import pipeline  # noqa: PLC0415

    b = FLAGS.batch_size
    per = FLAGS.pipeline_batches
    total = (FLAGS.warmup_windows + FLAGS.windows) * per + 1
    steps_epoch = pipeline.steps_per_epoch(len(bundle.train), b)
    ds = pipeline.train_dataset(bundle.train.images, bundle.train.labels, global_batch=b,
                                seed=0, start_step=0, total_steps=max(total, steps_epoch),
                                num_replicas=1)
    it = iter(ds)
    checksum = [0]

    def window():
        for _ in range(per):
            images, _, _ = next(it)
        checksum[0] += int(images.shape[0])  # the last batch is materialised on the host

    secs = timed_windows(window, FLAGS.warmup_windows, FLAGS.windows)
    out = summarise(secs, per * b, per)
    out["batches_per_window"] = per
    out["element_dtype"] = str(ds.element_spec[0].dtype.name)
    return out


# --------------------------------------------------------------------------- (1) cifar_dist

def build_trainer(cfg):
    from cifar_dist import distribute, train  # noqa: PLC0415

    strategy, cluster = distribute.make_strategy(cfg)  # first: before any other op
    bundle = load_bundle(cfg)
    return train.Trainer(cfg, strategy, cluster, bundle), bundle


def time_trainer(trainer):
    """Times the compiled training call exactly as Trainer.run makes it (one window = one
    call of --steps_per_window steps, then its one host read), minus logging/checkpoints."""
    import numpy as np  # noqa: PLC0415

    iterator = None if trainer.data_on_device else trainer.train_iterator(0)
    last = {"step": 0}

    def window():
        step = last["step"]
        totals = trainer.steps.run(trainer._inputs(step, iterator), FLAGS.steps_per_window,
                                   stop=False)
        last["totals"] = totals.numpy()  # waits for the window's last step (and so all)
        last["step"] = step + FLAGS.steps_per_window

    t0 = time.perf_counter()
    for _ in range(FLAGS.warmup_windows):
        window()
    warmup = time.perf_counter() - t0
    before = adjacent_matmul_gflops()
    secs = timed_windows(window, 0, FLAGS.windows)
    after = adjacent_matmul_gflops()
    totals = last["totals"]
    out = summarise(secs, FLAGS.steps_per_window * trainer.cfg.batch_size,
                    FLAGS.steps_per_window)
    out["warmup_seconds"] = warmup  # tracing + XLA compilation + the first window's steps
    out["adjacent_matmul_gflops"] = [before, after]
    out["last_step_loss"] = float(totals[0] / max(totals[2], 1))
    out["finite"] = bool(np.isfinite(totals[0]))
    out["input_dtype"] = ("uint8 (on the device)" if trainer.data_on_device
                          else images_dtype(iterator.element_spec))
    return out


def time_grads_only(trainer):
    """One replica's XLA function alone, called directly step by step on a fixed batch: the
    loop's time minus this is the time outside XLA (the while loop, the all-reduce and, with
    many replicas, the separate update)."""
    import tensorflow as tf  # noqa: PLC0415

    steps = trainer.steps
    per_replica = trainer.cfg.batch_size // trainer.replicas
    fn = steps.fused_step if trainer.replicas == 1 else steps.grads_step
    with tf.device(trainer.strategy.extended.worker_devices[0]):
        if steps.device_data is not None:
            inputs = trainer._inputs(0, None)
        else:
            inputs = (tf.constant(trainer.bundle.train.images[:per_replica]),
                      tf.constant(trainer.bundle.train.labels[:per_replica], tf.int32))
        replica, stop = tf.constant(0), tf.constant(0)

        def window():
            for _ in range(FLAGS.steps_per_window):
                fn(inputs, replica, stop)
            float(trainer.global_step.numpy() if trainer.replicas == 1 else 0)

        secs = timed_windows(window, 1, max(2, min(FLAGS.windows, 3)))
    return {"seconds_per_step": quantile(secs, 0.5) / FLAGS.steps_per_window,
            "cores_busy": LAST_CORES_BUSY[0]}


def time_augmentation(trainer):
    """The augmentation alone, XLA-compiled on the step's device, on one replica's batch."""
    import tensorflow as tf  # noqa: PLC0415

    from cifar_dist import augment as augment_lib  # noqa: PLC0415

    per_replica = trainer.cfg.batch_size // trainer.replicas
    device = trainer.strategy.extended.worker_devices[0]
    with tf.device(device):
        images = tf.constant(trainer.bundle.train.images[:per_replica])
        fn = tf.function(augment_lib.augment_batch, jit_compile=True)
        calls = 20
        counter = [0]

        def window():
            out = None
            for _ in range(calls):
                counter[0] += 1
                out = fn(images, tf.constant([0, counter[0]], tf.int64))
            float(out[0, 0, 0, 0].numpy())

        secs = timed_windows(window, 1, max(FLAGS.windows, 3))
    return {"seconds_per_batch": quantile(secs, 0.5) / calls, "batch": per_replica}


def run_cifar_dist(augment: bool):
    import tensorflow as tf  # noqa: PLC0415

    cfg = make_config(augment=augment)
    t0 = time.perf_counter()
    trainer, _ = build_trainer(cfg)
    build_seconds = time.perf_counter() - t0
    out = time_trainer(trainer)
    out["build_seconds"] = build_seconds
    out.update(model_counts(trainer.model))
    try:  # cross-check of the hand FLOP count against what XLA was given
        counted = hlo_flops(step_hlo(trainer))
        out["hlo_train_flops_per_image"] = counted["total"] / (cfg.batch_size // trainer.replicas)
    except Exception as e:  # noqa: BLE001 - a failed cross-check must not stop the benchmark
        out["hlo_error"] = f"{type(e).__name__}: {e}"[:300]
    out.update(loop_counts(trainer))
    out["replicas"] = trainer.replicas
    out["device"] = trainer.strategy.extended.worker_devices[0]
    out["jit_compile"] = cfg.jit_compile
    if augment and not FLAGS.tiny:
        out["augmentation_alone"] = time_augmentation(trainer)
        out["xla_function_alone"] = time_grads_only(trainer)
        out["outside_xla_seconds_per_step"] = (out["step_seconds_median"]
                                               - out["xla_function_alone"]["seconds_per_step"])
    del tf
    return out


# --------------------------------------------------------------------------- (1p) profile

PROFILE_XLA_FLAG = "--xla_cpu_enable_xprof_traceme"
PROFILE_CATEGORIES = (  # (category, substrings of the HLO instruction name), first match wins
    ("convolution", ("convolution",)),
    ("dot (dense layers)", ("dot", "matmul")),
    ("select-and-scatter (max-pool gradient)", ("select-and-scatter", "select_and_scatter")),
    ("reduce-window (pooling)", ("reduce-window", "reduce_window")),
    ("gather (augmentation sampling)", ("gather",)),
    # XLA:CPU expands the max-pool gradient (select-and-scatter) into activation-sized iota
    # index planes + a variadic reduce-window + compares/selects (SelectAndScatterExpander)
    ("iota (index planes of the max-pool gradient)", ("iota",)),
    ("reduce (BatchNorm statistics, loss)", ("reduce",)),
    ("transpose / copy (layouts)", ("transpose", "copy")),
)


def hlo_category(name: str) -> str:
    low = name.lower()
    for category, keys in PROFILE_CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other (elementwise fusions, iota, broadcast, ...)"


def xplane_summary(logdir: str) -> dict:
    """Sums the profiler's XLA events: per-HLO-op thunks (events carrying an `hlo_op` stat)
    by category, and the wall time of the XLA executable runs."""
    import glob  # noqa: PLC0415

    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: PLC0415

    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as f:
        space.ParseFromString(f.read())
    by_category, by_op, executable, ops = {}, {}, 0.0, 0
    for plane in space.planes:
        hlo_stat = [k for k, m in plane.stat_metadata.items() if m.name == "hlo_op"]
        for line in plane.lines:
            for ev in line.events:
                name = plane.event_metadata[ev.metadata_id].name
                ms = ev.duration_ps / 1e9
                if name == "CpuExecutable::ExecuteAsyncOnStream":
                    executable += ms
                elif hlo_stat and any(st.metadata_id in hlo_stat for st in ev.stats):
                    cat = hlo_category(name)
                    by_category[cat] = by_category.get(cat, 0.0) + ms
                    by_op[name] = by_op.get(name, 0.0) + ms
                    ops += 1
    return {"by_category_ms": by_category, "by_op_ms": by_op, "executable_ms": executable,
            "hlo_events": ops}


def run_profile():
    """(1) again, one window under the profiler; time by kind of HLO op.

    Read with care: XLA:CPU runs convolutions and dots as asynchronous thunks (the event
    ends when the work is handed to the Eigen pool), so their events undercount them; the
    other kinds (iota, reduce-window, fusions, transposes) run synchronously and their
    events are their cost. Compare the sums with xla_executable_wall_ms_per_step: the gap
    is mostly convolution time. The profiler itself slows the step (step_wall_ms)."""
    import tensorflow as tf  # noqa: PLC0415

    if PROFILE_XLA_FLAG not in os.environ.get("XLA_FLAGS", ""):
        raise RuntimeError(f"the profile method needs XLA_FLAGS={PROFILE_XLA_FLAG} set before "
                           "TensorFlow starts (run it isolated)")
    cfg = make_config()
    trainer, _ = build_trainer(cfg)
    iterator = None if trainer.data_on_device else trainer.train_iterator(0)
    steps = FLAGS.steps_per_window
    warm = FLAGS.warmup_windows * steps + 1
    trainer.steps.run(trainer._inputs(0, iterator), warm, stop=False).numpy()
    logdir = tempfile.mkdtemp(prefix="cifar_dist_profile_")
    tf.profiler.experimental.start(logdir)
    t0, cpu0, sys0 = time.perf_counter(), cpu_seconds(), system_cpu_seconds()
    trainer.steps.run(trainer._inputs(warm, iterator), steps, stop=False).numpy()
    wall = time.perf_counter() - t0
    record_load(cpu0, sys0, wall)
    tf.profiler.experimental.stop()
    summary = xplane_summary(logdir)
    per_step = {k: v / steps for k, v in summary["by_category_ms"].items()}
    total = sum(per_step.values())
    top = sorted(summary["by_op_ms"].items(), key=lambda kv: -kv[1])[:12]
    return {
        "step_wall_ms": 1e3 * wall / steps,
        **load_fields(),
        "xla_executable_wall_ms_per_step": summary["executable_ms"] / steps,
        "hlo_op_ms_per_step_summed_over_threads": total,
        "by_category_ms_per_step": per_step,
        "by_category_share": {k: v / total for k, v in per_step.items()} if total else {},
        "top_ops_ms_per_step": [[k, v / steps] for k, v in top],
        "hlo_events": summary["hlo_events"],
        "profiled_steps": steps,
        "images_per_second": cfg.batch_size * steps / wall,
    }


# --------------------------------------------------------------------------- (2), (3) Keras fit

def keras_model_and_optimizer(cfg, num_classes):
    """The same network and optimizer type/settings as cifar_dist; a small constant learning
    rate (speed does not depend on it; it only keeps the short run finite)."""
    import keras  # noqa: PLC0415

    from cifar_dist.model import build_model  # noqa: PLC0415

    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg.model, num_classes, cfg.dtype_policy)
    opt = keras.optimizers.SGD(0.01, momentum=cfg.momentum,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay or None)
    opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    # Keras wraps the optimizer in a LossScaleOptimizer itself under mixed_float16.
    return model, opt


class EpochTimer:
    """Keras callback: seconds of every epoch (an epoch = one window of steps)."""

    def __new__(cls):
        import keras  # noqa: PLC0415

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.seconds, self.losses = [], []

                self.cpu, self.system = [], []

            def on_epoch_begin(self, epoch, logs=None):
                if epoch == self.warmup_windows:  # the roofline just before the timed epochs
                    self.matmul_before = adjacent_matmul_gflops()
                self._t0, self._c0 = time.perf_counter(), cpu_seconds()
                self._s0 = system_cpu_seconds()

            def on_epoch_end(self, epoch, logs=None):
                self.losses.append(float((logs or {}).get("loss", float("nan"))))  # syncs
                self.seconds.append(time.perf_counter() - self._t0)
                self.cpu.append(cpu_seconds() - self._c0)
                s1 = system_cpu_seconds()
                self.system.append((s1[0] - self._s0[0], s1[1] - self._s0[1])
                                   if s1 and self._s0 else None)

        return _Timer()


def fit_and_time(model, optimizer, data, cfg, jit_compile):
    import keras  # noqa: PLC0415

    model.compile(optimizer=optimizer, jit_compile=jit_compile,
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing))
    timer = EpochTimer()
    timer.warmup_windows = FLAGS.warmup_windows
    epochs = FLAGS.warmup_windows + FLAGS.windows
    model.fit(data, epochs=epochs, steps_per_epoch=FLAGS.steps_per_window, verbose=0,
              callbacks=[timer])
    matmul_after = adjacent_matmul_gflops()
    secs = timer.seconds[FLAGS.warmup_windows:]
    LAST_WARMUP_SECONDS[0] = sum(timer.seconds[:FLAGS.warmup_windows])
    own = sum(timer.cpu[FLAGS.warmup_windows:])
    LAST_CORES_BUSY[0] = own / sum(secs)
    system = timer.system[FLAGS.warmup_windows:]
    LAST_OTHERS[0] = ({"other_cores_busy": max(0.0, (sum(s[0] for s in system) - own) / sum(secs)),
                       "steal_cores": sum(s[1] for s in system) / sum(secs)}
                      if all(system) else None)
    out = summarise(secs, FLAGS.steps_per_window * cfg.batch_size, FLAGS.steps_per_window)
    out.update(model_counts(model))
    out["adjacent_matmul_gflops"] = [timer.matmul_before, matmul_after]
    out["jit_compile"] = bool(model.jit_compile)
    out["last_window_loss"] = timer.losses[-1]
    out["finite"] = bool(math.isfinite(timer.losses[-1]))
    return out


def keras_augmentation_layers():
    """The seed's augmentation as Keras 3 preprocessing layers (rotation factor is a
    fraction of a full turn: 15/360 -> +/-15 degrees)."""
    import keras  # noqa: PLC0415

    return keras.Sequential([
        keras.layers.RandomRotation(15 / 360, fill_mode="nearest"),
        keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest"),
        keras.layers.RandomFlip("horizontal"),
    ], name="augmentation")


def run_keras_fit(jit_compile="auto"):
    import tensorflow as tf  # noqa: PLC0415

    cfg = make_config()
    bundle = load_bundle(cfg)
    n, classes = len(bundle.train), bundle.num_classes
    model, opt = keras_model_and_optimizer(cfg, classes)
    augmentation = keras_augmentation_layers()

    def prepare(images, labels):
        x = tf.cast(images, tf.float32) / 255.0
        return augmentation(x, training=True), tf.one_hot(labels, classes)

    # The documented tf.data recipe: shuffle, batch, augment in a parallel map, prefetch.
    ds = (tf.data.Dataset.from_tensor_slices((bundle.train.images, bundle.train.labels))
          .shuffle(min(n, 10000), seed=cfg.seed).repeat()
          .batch(cfg.batch_size, drop_remainder=True)
          .map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE))
    out = fit_and_time(model, opt, ds, cfg, jit_compile)
    out["shuffle_buffer"] = min(n, 10000)
    return out


def host_affine(x, theta_degrees, tx, ty, flip):
    """keras' ImageDataGenerator.apply_transform for rotation + shift (+ flip) on one float
    HxWxC image: the same matrices (rotation @ shift about the centre (h/2 - 0.5, w/2 - 0.5),
    x/y swapped into numpy's row/column order) and the same scipy.ndimage.affine_transform
    call per channel (order 1, fill 'nearest'). tx moves along rows, ty along columns."""
    import numpy as np  # noqa: PLC0415
    from scipy import ndimage  # noqa: PLC0415

    h, w = x.shape[0], x.shape[1]
    theta = np.deg2rad(theta_degrees)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0],
                    [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    move = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    ox, oy = h / 2.0 - 0.5, w / 2.0 - 0.5
    m = (np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]]) @ (rot @ move)
         @ np.array([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]]))
    m[:, [0, 1]] = m[:, [1, 0]]  # M' = P M P: the matrix is written for (x, y) coordinates
    m[[0, 1]] = m[[1, 0]]
    out = np.stack([ndimage.affine_transform(x[..., c], m[:2, :2], m[:2, 2], order=1,
                                             mode="nearest", cval=0.0)
                    for c in range(x.shape[2])], axis=-1)
    return out[:, ::-1] if flip else out


def host_augment_image(x, rng, rotation=15.0, shift=0.1):
    """ImageDataGenerator(rotation_range=15, width_shift_range=0.1, height_shift_range=0.1,
    horizontal_flip=True).random_transform on one float image, drawn from a numpy Generator."""
    h, w = x.shape[0], x.shape[1]
    theta = rng.uniform(-rotation, rotation)
    tx = rng.uniform(-shift, shift) * h
    ty = rng.uniform(-shift, shift) * w
    return host_affine(x, theta, tx, ty, rng.uniform() < 0.5)


def run_keras_fit_host():
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    cfg = make_config()
    bundle = load_bundle(cfg)
    images, labels = bundle.train.images, bundle.train.labels
    classes, batch = bundle.num_classes, cfg.batch_size

    class HostAugmented(keras.utils.PyDataset):
        """datagen.flow(x, y, batch_size): shuffled batches, each image augmented in Python."""

        def __init__(self):
            super().__init__()  # workers=1, no multiprocessing: the old fit defaults
            self.rng = np.random.default_rng(cfg.seed)
            self.order = self.rng.permutation(len(labels))

        def __len__(self):
            return len(labels) // batch

        def __getitem__(self, i):
            ids = self.order[i * batch:(i + 1) * batch]
            x = np.stack([host_augment_image(images[j].astype(np.float32) / 255.0, self.rng)
                          for j in ids]).astype(np.float32)
            return x, np.eye(classes, dtype=np.float32)[labels[ids]]

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(labels))

    model, opt = keras_model_and_optimizer(cfg, classes)
    seq = HostAugmented()
    t0 = time.perf_counter()
    for i in range(3):
        seq[i]
    host_seconds_per_batch = (time.perf_counter() - t0) / 3
    out = fit_and_time(model, opt, seq, cfg, "auto")
    out["host_augment_seconds_per_batch"] = host_seconds_per_batch
    return out


# --------------------------------------------------------------------------- (7) multi-worker

def bare_all_reduce(trainer):
    """Seconds per all-reduce of gradient-shaped float32 tensors, the way Keras' optimizer
    does it (replica_context.all_reduce(SUM, list of gradients)), under the same strategy."""
    import tensorflow as tf  # noqa: PLC0415

    strategy = trainer.strategy
    shapes = [v.shape for v in trainer.model.trainable_variables]

    @tf.function
    def reduce_once(step):
        def fn():
            ctx = tf.distribute.get_replica_context()
            grads = [tf.fill(s, tf.cast(step, tf.float32)) for s in shapes]
            reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            return tf.add_n([r[(0,) * len(r.shape)] for r in reduced])
        return strategy.run(fn)

    counter = [0]

    def window():
        out = None
        for _ in range(FLAGS.steps_per_window):
            counter[0] += 1
            out = reduce_once(tf.constant(counter[0]))
        strategy.experimental_local_results(out)[0].numpy()

    secs = timed_windows(window, FLAGS.warmup_windows, FLAGS.windows)
    per = [s / FLAGS.steps_per_window for s in secs]
    return {"all_reduce_seconds": quantile(per, 0.5), "all_reduce_seconds_min": min(per),
            "all_reduce_seconds_max": max(per), "window_all_reduce_seconds": per}


def run_multiworker_child():
    cfg = make_config(strategy="multi_worker", all_reduce=FLAGS.all_reduce, cluster="tf_config",
                      collective_timeout=float(FLAGS.timeout))
    trainer, _ = build_trainer(cfg)
    out = time_trainer(trainer)
    out.update(model_counts(trainer.model))
    out.update(bare_all_reduce(trainer))
    out["replicas"] = trainer.replicas
    out["workers"] = trainer.cluster.num_workers
    out["worker_index"] = trainer.cluster.worker_index
    return out


# --------------------------------------------------------------------------- dispatch

def run_method(name):
    """Runs one method in this process; returns its result dict (with peak memory)."""
    t0 = time.time()
    if name == "matmul":
        out = run_matmul()
    elif name == "pipeline":
        out = run_pipeline(load_bundle(make_config()))
    elif name == "cifar_dist":
        out = run_cifar_dist(True)
    elif name == "cifar_dist_noaug":
        out = run_cifar_dist(False)
    elif name == "keras_fit":
        out = run_keras_fit("auto")
    elif name == "keras_fit_xla":
        out = run_keras_fit(True)
    elif name == "keras_fit_host":
        out = run_keras_fit_host()
    elif name == "multiworker":
        out = run_multiworker_child()
    elif name == "profile":
        out = run_profile()
    else:
        raise ValueError(f"unknown method {name!r}")
    out["peak_rss_mib"] = peak_rss_mib()
    out["wall_seconds"] = time.time() - t0
    return out


def child_argv(name, output):
    """This program's flags, re-passed to a child that runs one method."""
    keep = ["tiny", "batch_size", "dtype", "model", "data", "data_dir", "synthetic_size", "windows",
            "steps_per_window", "warmup_windows", "pipeline_batches", "matmul_size", "timeout",
            "all_reduce"]
    argv = [sys.executable, "-m", "cifar_dist.bench", f"--child={name}",
            f"--child_output={output}"]
    argv += [f"--{k}={FLAGS[k].value}" for k in keep]
    return argv


def child_env(**extra):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def run_isolated(name, tmp):
    output = os.path.join(tmp, f"{name}.json")
    extra = {}
    if name == "profile":
        extra["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + PROFILE_XLA_FLAG).strip()
    proc = subprocess.Popen(child_argv(name, output), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(**extra))
    stderr = ""
    try:
        _, stderr = proc.communicate(timeout=FLAGS.timeout)
    finally:  # a timeout, Ctrl-C or SIGTERM of this process ends the child too
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or not os.path.exists(output):
        raise RuntimeError(f"method {name} failed (exit {proc.returncode}):\n"
                           f"{stderr[-4000:]}")
    with open(output) as f:
        return json.load(f)


def run_two_workers(tmp):
    from cifar_dist.preflight import free_ports  # noqa: PLC0415

    ports = free_ports(2)
    procs, outputs = [], []
    for i in range(2):
        tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                     "task": {"type": "worker", "index": i}}
        output = os.path.join(tmp, f"multiworker_{i}.json")
        outputs.append(output)
        procs.append(subprocess.Popen(child_argv("multiworker", output), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=child_env(TF_CONFIG=json.dumps(tf_config))))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=FLAGS.timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs) or not all(os.path.exists(o) for o in outputs):
        raise RuntimeError("multiworker failed:\n" + "\n".join(x[-3000:] for x in logs))
    results = []
    for o in outputs:
        with open(o) as f:
            results.append(json.load(f))
    return results


def top_processes(n=8):
    """What else was using the CPUs (for the record of the run)."""
    try:
        text = subprocess.run(["ps", "-eo", "pid,pcpu,etimes,comm,args", "--sort=-pcpu"],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[:160] for line in text.splitlines()[1:n + 1]]


# --------------------------------------------------------------------------- report

def derive(results, matmul_runs):
    """Ratios, GFLOP/s, roofline fractions, goals: everything computed from the raw results."""
    methods = results["methods"]
    base = methods.get("cifar_dist", {}).get("images_per_second")
    counts = results["counts"]
    roof = max(r["gflops"] for r in matmul_runs) if matmul_runs else None
    results["roofline"] = {"matmul_n": FLAGS.matmul_size,
                           "gflops_each_run": [r["gflops"] for r in matmul_runs],
                           "gflops": roof,
                           "rule": "the higher of the matmul medians at the start and end"}
    flop = counts.get("train_flops_per_image") if counts else None
    for name, m in methods.items():
        if name in ("matmul",):
            continue
        ips = m.get("images_per_second")
        if base and ips is not None:
            m["ratio_to_cifar_dist"] = ips / base
        if flop and ips is not None and name != "pipeline":
            m["gflops"] = flop * ips / 1e9
            if roof:
                m["roofline_fraction"] = m["gflops"] / roof
            if m.get("adjacent_matmul_gflops"):
                m["roofline_fraction_adjacent"] = m["gflops"] / (
                    sum(m["adjacent_matmul_gflops"]) / len(m["adjacent_matmul_gflops"]))
    goals = {}

    def goal(key, text, value, target, higher=True):
        if value is None:
            return
        goals[key] = {"goal": text, "measured": value, "target": target,
                      "met": bool(value >= target if higher else value <= target)}

    c1 = methods.get("cifar_dist", {})
    if base:
        if "keras_fit" in methods:
            goal("vs_keras_fit", "(1) >= 2x images/s of (2)",
                 base / methods["keras_fit"]["images_per_second"], 2.0)
        if "keras_fit_host" in methods:
            goal("vs_seed_host_aug", "(1) >= 3x images/s of (3)",
                 base / methods["keras_fit_host"]["images_per_second"], 3.0)
        goal("roofline", "(1) >= 90% of the matmul roofline (the matmul timed in the same "
             "process right before and after (1)'s windows)",
             c1.get("roofline_fraction_adjacent", c1.get("roofline_fraction")), 0.9)
        goal("roofline_run", "(1) >= 90% of the run's roofline (higher of the matmul medians "
             "at the start and the end of the run)", c1.get("roofline_fraction"), 0.9)
        if "cifar_dist_noaug" in methods:
            t_aug = 1.0 / base
            t_no = 1.0 / methods["cifar_dist_noaug"]["images_per_second"]
            frac = (t_aug - t_no) / t_aug
            results["augmentation"] = {
                "step_fraction_from_1_vs_1b": frac,
                "standalone": c1.get("augmentation_alone"),
                "standalone_fraction_of_step": (
                    c1["augmentation_alone"]["seconds_per_batch"] / c1["step_seconds_median"]
                    if c1.get("augmentation_alone") else None)}
            goal("augmentation", "on-device augmentation <= 10% of the step", frac, 0.10,
                 higher=False)
    if "pipeline" in methods:
        goal("pipeline", "(4) >= 50,000 images/s", methods["pipeline"]["images_per_second"],
             50000.0)
    results["goals"] = goals
    mw = results.get("multiworker")
    if mw and base:
        w0 = mw["workers"][0]
        one = c1["step_seconds_median"]
        two = w0["step_seconds_median"]
        grad_bytes = counts["gradient_bytes_per_step"]
        t_ar = w0["all_reduce_seconds"]
        n = len(mw["workers"])
        mw["summary"] = {
            "step_seconds_1_worker": one, "step_seconds_2_workers": two,
            "images_per_second_1_worker": base,
            "images_per_second_2_workers": w0["images_per_second"],
            "speedup": one / two,
            "all_reduce_seconds_bare": t_ar,
            "all_reduce_fraction_of_2_worker_step": t_ar / two,
            "step_difference_seconds": two - one,
            "gradient_bytes_per_step": grad_bytes,
            "ring_bytes_sent_per_worker": 2 * (n - 1) / n * grad_bytes,
            "ring_bus_bandwidth_gbit_s": 2 * (n - 1) / n * grad_bytes * 8 / t_ar / 1e9,
        }
    return results


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _percent(m: dict, key: str):
    return 100 * m[key] if key in m else None


def _method_row(label: str, m: dict) -> tuple:
    """One table row from a method's (or the chief worker's) measurements."""
    return (label, fmt(m.get("images_per_second"), ",.1f"),
            f"{fmt(m.get('images_per_second_min'), ',.1f')}-"
            f"{fmt(m.get('images_per_second_max'), ',.1f')}",
            fmt(m.get("ratio_to_cifar_dist"), ".2f"), fmt(m.get("gflops"), ".1f"),
            fmt(_percent(m, "roofline_fraction"), ".1f"),
            fmt(_percent(m, "roofline_fraction_adjacent"), ".1f"),
            fmt(m.get("cores_busy"), ".2f"), fmt(m.get("other_cores_busy"), ".2f"),
            fmt(m.get("peak_rss_mib"), ",.0f"))


def table(results) -> str:
    rows = [("method", "images/s", "min-max", "x (1)", "GFLOP/s", "% roof", "% adj roof",
             "cores busy", "others busy", "peak MiB")]
    for name, m in results["methods"].items():
        if name == "matmul":
            continue
        rows.append(_method_row(LABELS.get(name, name), m))
    mm = results["methods"].get("matmul")
    if mm:
        roof = results["roofline"]
        rows.append((LABELS["matmul"] + f" n={roof['matmul_n']}", "-",
                     "/".join(f"{g:.1f}" for g in roof["gflops_each_run"]) + " GF/s", "-",
                     fmt(roof["gflops"], ".1f"), "100.0", "-", fmt(mm.get("cores_busy"), ".2f"),
                     "/".join(fmt(r.get("other_cores_busy"), ".2f") for r in mm.get("runs", [mm])),
                     fmt(mm.get("peak_rss_mib"), ",.0f")))
    mw = results.get("multiworker")
    if mw and "summary" in mw:
        rows.append(_method_row(LABELS["multiworker"], mw["workers"][0]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out = ["\n".join(lines)]
    for key, g in results.get("goals", {}).items():
        out.append(f"goal {key}: {g['goal']}: measured {g['measured']:.3f} -> "
                   f"{'met' if g['met'] else 'MISSED'}")
    aug = results.get("augmentation")
    if aug:
        line = (f"augmentation: {100 * aug['step_fraction_from_1_vs_1b']:.1f}% of the step "
                "((1) vs (1b))")
        if aug.get("standalone_fraction_of_step") is not None:
            line += (f"; alone under XLA {1e3 * aug['standalone']['seconds_per_batch']:.1f} ms "
                     f"per batch = {100 * aug['standalone_fraction_of_step']:.1f}% of the step")
        out.append(line)
    c1 = results["methods"].get("cifar_dist", {})
    if c1.get("xla_function_alone"):
        alone = c1["xla_function_alone"]["seconds_per_step"]
        out.append(f"(1) split: XLA function alone {alone:.3f} s per step, outside it "
                   f"{c1['outside_xla_seconds_per_step']:.3f} s "
                   f"({100 * c1['outside_xla_seconds_per_step'] / c1['step_seconds_median']:.1f}% "
                   f"of the {c1['step_seconds_median']:.3f} s step; "
                   f"{c1['ops_outside_xla_per_replica_per_step']:g} ops outside XLA per replica per step)")
    prof = results.get("profile")
    if prof:
        shares = sorted(prof["by_category_share"].items(), key=lambda kv: -kv[1])
        out.append(f"profile of (1) (HLO-op time summed over threads, "
                   f"{prof['hlo_op_ms_per_step_summed_over_threads']:.0f} ms per "
                   f"{prof['step_wall_ms']:.0f} ms step): "
                   + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares))
    if mw and "summary" in mw:
        s = mw["summary"]
        out.append(
            f"2 workers vs 1 (global batch {results['config']['batch_size']}): step "
            f"{s['step_seconds_2_workers']:.3f} s vs {s['step_seconds_1_worker']:.3f} s "
            f"(speed-up {s['speedup']:.2f}); bare ring all-reduce of "
            f"{s['gradient_bytes_per_step'] / 1e6:.2f} MB: "
            f"{1e3 * s['all_reduce_seconds_bare']:.1f} ms "
            f"({100 * s['all_reduce_fraction_of_2_worker_step']:.1f}% of the 2-worker step, "
            f"{s['ring_bus_bandwidth_gbit_s']:.2f} Gbit/s bus bandwidth)")
    return "\n".join(out)


def ring_all_reduce_seconds(num_gpus: int, nbytes: float, gbits: float) -> float:
    """Bandwidth term of a ring all-reduce: each GPU sends (and receives) 2(N-1)/N x bytes."""
    return 2 * (num_gpus - 1) / num_gpus * nbytes * 8 / (gbits * 1e9)


def projection(model_name: str, tflops: float, label: str, links, gpus, batches) -> dict:
    """Scaling on paper: per-GPU compute time from the FLOP count at an assumed achieved rate;
    the all-reduce does not overlap the compute (the gradients leave the XLA function all at
    once and are then all-reduced), so efficiency = t_compute / (t_compute + t_all_reduce)."""
    from cifar_dist.model import build_model  # noqa: PLC0415

    counts = model_counts(build_model(model_name))
    nbytes, flop = counts["gradient_bytes_per_step"], counts["train_flops_per_image"]
    rows = []
    for b in batches:
        t_c = b * flop / (tflops * 1e12)
        for link in links:
            for n in gpus:
                t_ar = ring_all_reduce_seconds(n, nbytes, link)
                rows.append({"per_gpu_batch": b, "link_gbits": link, "gpus": n,
                             "compute_ms": 1e3 * t_c, "all_reduce_ms": 1e3 * t_ar,
                             "efficiency": t_c / (t_c + t_ar),
                             # what 90% needs: t_ar <= t_c / 9
                             "link_gbits_for_90": 9 * 2 * (n - 1) / n * nbytes * 8 / t_c / 1e9,
                             "per_gpu_batch_for_90": 9 * t_ar * tflops * 1e12 / flop})
    return {"model": model_name, "counts": counts, "gpu_tflops": tflops, "gpu_label": label,
            "host_to_device_bytes_per_image": 32 * 32 * 3, "rows": rows}


def projection_text(p) -> str:
    c = p["counts"]
    lines = [f"{p['model']}: {c['train_flops_per_image'] / 1e9:.4f} GFLOP per trained image "
             f"(forward {c['forward_flops_per_image'] / 1e9:.4f}), {c['trainable_params']:,} "
             f"parameters -> {c['gradient_bytes_per_step'] / 1e6:.3f} MB of fp32 gradients "
             f"all-reduced per step; {p['host_to_device_bytes_per_image']} B uint8 per image "
             "host->device",
             f"assumed per-GPU rate: {p['gpu_tflops']:.1f} TFLOP/s ({p['gpu_label']})", ""]
    lines.append("| per-GPU batch | compute ms | link Gb/s | " + " | ".join(
        f"N={n}" for n in sorted({r['gpus'] for r in p['rows']})) + " |")
    lines.append("|---|---|---|" + "---|" * len({r['gpus'] for r in p['rows']}))
    keyed = {}
    for r in p["rows"]:
        keyed.setdefault((r["per_gpu_batch"], r["link_gbits"], r["compute_ms"]), []).append(r)
    for (b, link, t_c), rs in keyed.items():
        cells = [f"{r['all_reduce_ms']:.2f} ms / {100 * r['efficiency']:.0f}%" for r in rs]
        lines.append(f"| {b} | {t_c:.2f} | {link:g} | " + " | ".join(cells) + " |")
    lines += ["", "what 90% efficiency needs (t_all_reduce <= t_compute / 9, no overlap):"]
    done = set()
    for r in p["rows"]:
        key = (r["gpus"], r["per_gpu_batch"])
        if r["gpus"] in (8, 64) and key not in done:
            done.add(key)
            lines.append(f"  N={r['gpus']:>2}, per-GPU batch {r['per_gpu_batch']}: a ring link of "
                         f">= {r['link_gbits_for_90']:.0f} Gb/s per GPU")
    done = set()
    for r in p["rows"]:
        key = (r["gpus"], r["link_gbits"])
        if r["gpus"] in (8, 64) and key not in done:
            done.add(key)
            lines.append(f"  N={r['gpus']:>2}, {r['link_gbits']:g} Gb/s: a per-GPU batch of >= "
                         f"{r['per_gpu_batch_for_90']:,.0f}")
    return "\n".join(lines)


def run_projection():
    p = projection(FLAGS.model, FLAGS.gpu_tflops, FLAGS.gpu_label,
                   [float(x) for x in FLAGS.link_gbits], [int(x) for x in FLAGS.gpu_counts],
                   [int(x) for x in FLAGS.per_gpu_batches])
    print(projection_text(p))
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(p, f, indent=2, sort_keys=True)


def run_overhead():
    from cifar_dist import bench_overhead  # noqa: PLC0415

    if FLAGS.overhead_case:  # a child: one case, in this fresh process
        result = bench_overhead.run_case(*FLAGS.overhead_case.split(","), FLAGS.windows)
        with open(FLAGS.child_output, "w") as f:
            json.dump(result, f)
        return
    results = bench_overhead.run_all(FLAGS.windows)
    print(bench_overhead.table(results))
    if FLAGS.output:
        with open(FLAGS.output + ".tmp", "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        os.replace(FLAGS.output + ".tmp", FLAGS.output)


def apply_tiny_defaults():
    if not FLAGS.tiny:
        return
    for name, value in TINY.items():
        if not FLAGS[name].present:
            FLAGS[name].value = value.split(",") if name == "methods" else value


def bench_command(fv, args) -> int:
    global FLAGS
    FLAGS = fv
    cli.no_positional_args(args)
    if FLAGS.child:
        result = run_method(FLAGS.child)
        with open(FLAGS.child_output + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(FLAGS.child_output + ".tmp", FLAGS.child_output)
        return
    if FLAGS.projection:
        run_projection()
        return
    if FLAGS.overhead:
        run_overhead()
        return
    # SIGTERM -> SystemExit, so that `finally` blocks stop the child processes
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    apply_tiny_defaults()
    unknown = set(FLAGS.methods) - set(METHODS)
    if unknown:
        raise ConfigError(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    if FLAGS.data == "real" and not FLAGS.data_dir:
        raise ConfigError("--data=real needs --data_dir")
    import tensorflow as tf  # noqa: PLC0415  (after flags: children must not start it twice)

    t_start = time.time()
    results = {"config": {k: FLAGS[k].value for k in (
        "tiny", "batch_size", "dtype", "model", "data", "data_dir", "synthetic_size", "windows",
        "steps_per_window", "warmup_windows", "pipeline_batches", "matmul_size", "isolate",
        "multiworker", "all_reduce")}, "methods": {}}
    results["config"]["methods"] = list(FLAGS.methods)
    results["machine"] = {
        "cpus": os.cpu_count(), "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "tensorflow": tf.__version__, "python": sys.version.split()[0],
        "load_average_before": os.getloadavg(), "top_processes_before": top_processes()}
    order = [m for m in METHODS if m in FLAGS.methods and m != "matmul"]
    matmul_runs = []
    with tempfile.TemporaryDirectory(prefix="cifar_dist_bench_") as tmp:
        def run(name):
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            t0 = time.time()
            # the profile needs XLA_FLAGS before TensorFlow starts: always its own process
            isolate = FLAGS.isolate or name == "profile"
            out = run_isolated(name, tmp) if isolate else run_method(name)
            print(f"[bench] {name}: {out.get('images_per_second', out.get('gflops')):.1f} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            return out

        if "matmul" in FLAGS.methods:
            matmul_runs.append(run("matmul"))
        for name in order:
            if name == "profile":
                results["profile"] = run(name)
            else:
                results["methods"][name] = run(name)
        if FLAGS.multiworker:
            print("[bench] multiworker (2 workers) ...", file=sys.stderr, flush=True)
            workers = run_two_workers(tmp)
            results["multiworker"] = {"workers": workers}
        if "matmul" in FLAGS.methods and len(order) > 0:
            matmul_runs.append(run("matmul"))
    if matmul_runs:
        results["methods"]["matmul"] = dict(matmul_runs[0], runs=matmul_runs)
    if "cifar_dist" in results["methods"]:
        results["counts"] = {k: results["methods"]["cifar_dist"][k] for k in (
            "forward_flops_per_image", "train_flops_per_image", "trainable_params",
            "gradient_bytes_per_step", "gradient_tensors")}
        results["counts"]["host_to_device_bytes_per_step"] = FLAGS.batch_size * 32 * 32 * 3
    else:
        results["counts"] = {}
    results = derive(results, matmul_runs)
    mw = results.get("multiworker")
    if mw and results["counts"]:
        w0 = mw["workers"][0]
        base = results["methods"]["cifar_dist"]["images_per_second"]
        w0["ratio_to_cifar_dist"] = w0["images_per_second"] / base
        w0["gflops"] = results["counts"]["train_flops_per_image"] * w0["images_per_second"] / 1e9
        if results["roofline"]["gflops"]:
            w0["roofline_fraction"] = w0["gflops"] / results["roofline"]["gflops"]
        # no adjacent roofline here: both workers time their matmul at the same moment on
        # the same cores, so each sees about half the machine
    results["machine"]["load_average_after"] = os.getloadavg()
    results["machine"]["top_processes_after"] = top_processes()
    results["wall_seconds"] = time.time() - t_start
    text = table(results)
    print(text)
    print(f"load average before {results['machine']['load_average_before']}, after "
          f"{results['machine']['load_average_after']}; {results['wall_seconds']:.0f} s")
    if FLAGS.output:
        with open(FLAGS.output + ".tmp", "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        os.replace(FLAGS.output + ".tmp", FLAGS.output)


def main(argv) -> int:
    """Runs the command for argv (program name first); returns the exit status."""
    return cli.run_command(argv, __doc__, define_flags, bench_command)


def run():
    """Console-script entry point (cifar-dist-bench)."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
