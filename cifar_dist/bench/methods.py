"""The method registry: each method is a function of the settings that runs in this process
and returns its measurements as a dict (the methods are described in cifar_dist.bench).

Here: (5) the matmul roofline, (4) the input pipeline alone, (1)/(1b) the cifar_dist step
and (7)'s worker; (2), (2x), (3) are in keras_fit.py, (1p) in hlo_profile.py.
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from cifar_dist import graph_checks
from cifar_dist.bench import hlo_profile, keras_fit, timing, workload
from cifar_dist.bench.settings import Settings


# --------------------------------------------------------------------------- (5) matmul

def run_matmul(settings: Settings) -> dict:
    n = settings.matmul_size
    a = tf.random.normal([n, n], seed=1)
    b = tf.random.normal([n, n], seed=2)
    matmul = tf.function(tf.linalg.matmul)
    reps = max(1, int(round(2e10 / (2 * n ** 3))))  # ~0.2 s per window at ~100 GFLOP/s

    def window():
        c = None
        for _ in range(reps):
            c = matmul(a, b)
        float(c[0, 0].numpy())

    w = timing.timed_windows(window, max(settings.warmup_windows, 1), max(settings.windows, 3))
    flop = 2.0 * n ** 3 * reps
    rates = [flop / t / 1e9 for t in w.seconds]
    return {"n": n, "matmuls_per_window": reps, "gflops": timing.quantile(rates, 0.5),
            "gflops_min": min(rates), "gflops_max": max(rates), "window_gflops": rates,
            **w.load.fields()}


# --------------------------------------------------------------------------- (4) pipeline

def run_pipeline(settings: Settings) -> dict:
    from cifar_dist import pipeline  # noqa: PLC0415

    bundle = workload.load_bundle(workload.make_config(settings))
    b, per = settings.batch_size, settings.pipeline_batches
    total = (settings.warmup_windows + settings.windows) * per + 1
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

    w = timing.timed_windows(window, settings.warmup_windows, settings.windows)
    out = w.summary(per * b, per)
    out["batches_per_window"] = per
    out["element_dtype"] = str(ds.element_spec[0].dtype.name)
    return out


# --------------------------------------------------------------------------- (1) cifar_dist

def time_trainer(settings: Settings, trainer) -> dict:
    """Times the compiled training call exactly as Trainer.run makes it (one window = one
    call of --steps_per_window steps, then its one host read), minus logging/checkpoints."""
    iterator = None if trainer.data_on_device else trainer.train_iterator(0)
    per = settings.steps_per_window
    last = {"step": 0}

    def window():
        step = last["step"]
        totals = trainer.steps.run(trainer.inputs(step, iterator), per, stop=False)
        last["totals"] = totals.numpy()  # waits for the window's last step (and so all)
        last["step"] = step + per

    t0 = time.perf_counter()
    for _ in range(settings.warmup_windows):
        window()
    warmup = time.perf_counter() - t0  # tracing + XLA compilation + the first window's steps
    adjacent = timing.AdjacentMatmul(settings.matmul_size)
    before = adjacent.gflops()
    w = timing.timed_windows(window, 0, settings.windows)
    after = adjacent.gflops()
    totals = last["totals"]
    out = timing.Windows(w.seconds, warmup, w.load).summary(per * trainer.cfg.batch_size, per)
    out["adjacent_matmul_gflops"] = [before, after]
    out["last_step_loss"] = float(totals[0] / max(totals[2], 1))
    out["finite"] = bool(np.isfinite(totals[0]))
    out["input_dtype"] = ("uint8 (on the device)" if trainer.data_on_device
                          else graph_checks.images_dtype(iterator.element_spec))
    return out


def time_grads_only(settings: Settings, trainer) -> dict:
    """One replica's XLA function alone, called directly step by step on a fixed batch: the
    loop's time minus this is the time outside XLA (the while loop, the all-reduce and, with
    many replicas, the separate update)."""
    steps = trainer.steps
    per_replica = trainer.cfg.batch_size // trainer.replicas
    fn = steps.fused_step if trainer.replicas == 1 else steps.grads_step
    with tf.device(trainer.strategy.extended.worker_devices[0]):
        if steps.device_data is not None:
            inputs = trainer.inputs(0, None)
        else:
            inputs = (tf.constant(trainer.bundle.train.images[:per_replica]),
                      tf.constant(trainer.bundle.train.labels[:per_replica], tf.int32))
        replica, stop = tf.constant(0), tf.constant(0)

        def window():
            for _ in range(settings.steps_per_window):
                fn(inputs, replica, stop)
            float(trainer.global_step.numpy() if trainer.replicas == 1 else 0)

        w = timing.timed_windows(window, 1, max(2, min(settings.windows, 3)))
    return {"seconds_per_step": timing.quantile(w.seconds, 0.5) / settings.steps_per_window,
            "cores_busy": w.load.cores_busy}


def time_augmentation(settings: Settings, trainer) -> dict:
    """The augmentation alone, XLA-compiled on the step's device, on one replica's batch."""
    from cifar_dist import augment as augment_lib  # noqa: PLC0415

    per_replica = trainer.cfg.batch_size // trainer.replicas
    with tf.device(trainer.strategy.extended.worker_devices[0]):
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

        w = timing.timed_windows(window, 1, max(settings.windows, 3))
    return {"seconds_per_batch": timing.quantile(w.seconds, 0.5) / calls, "batch": per_replica}


def run_cifar_dist(settings: Settings, augment: bool) -> dict:
    cfg = workload.make_config(settings, augment=augment)
    t0 = time.perf_counter()
    trainer, _ = workload.build_trainer(cfg)
    build_seconds = time.perf_counter() - t0
    out = time_trainer(settings, trainer)
    out["build_seconds"] = build_seconds
    out.update(workload.model_counts(trainer.model))
    try:  # cross-check of the hand FLOP count against what XLA was given
        counted = graph_checks.hlo_flops(graph_checks.step_hlo(trainer))
        out["hlo_train_flops_per_image"] = counted["total"] / (cfg.batch_size // trainer.replicas)
    except Exception as e:  # noqa: BLE001 - a failed cross-check must not stop the benchmark
        out["hlo_error"] = f"{type(e).__name__}: {e}"[:300]
    out.update(graph_checks.loop_counts(trainer))
    out["replicas"] = trainer.replicas
    out["device"] = trainer.strategy.extended.worker_devices[0]
    out["jit_compile"] = cfg.jit_compile
    if augment and not settings.tiny:
        out["augmentation_alone"] = time_augmentation(settings, trainer)
        out["xla_function_alone"] = time_grads_only(settings, trainer)
        out["outside_xla_seconds_per_step"] = (out["step_seconds_median"]
                                               - out["xla_function_alone"]["seconds_per_step"])
    return out


# --------------------------------------------------------------------------- (7) multi-worker

def bare_all_reduce(settings: Settings, trainer) -> dict:
    """Seconds per all-reduce of gradient-shaped float32 tensors, the way Keras' optimizer
    does it (replica_context.all_reduce(SUM, list of gradients)), under the same strategy."""
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
        for _ in range(settings.steps_per_window):
            counter[0] += 1
            out = reduce_once(tf.constant(counter[0]))
        strategy.experimental_local_results(out)[0].numpy()

    w = timing.timed_windows(window, settings.warmup_windows, settings.windows)
    per = [s / settings.steps_per_window for s in w.seconds]
    return {"all_reduce_seconds": timing.quantile(per, 0.5), "all_reduce_seconds_min": min(per),
            "all_reduce_seconds_max": max(per), "window_all_reduce_seconds": per}


def run_multiworker_child(settings: Settings) -> dict:
    cfg = workload.make_config(settings, strategy="multi_worker", all_reduce=settings.all_reduce,
                               cluster="tf_config", collective_timeout=float(settings.timeout))
    trainer, _ = workload.build_trainer(cfg)
    out = time_trainer(settings, trainer)
    out.update(workload.model_counts(trainer.model))
    out.update(bare_all_reduce(settings, trainer))
    out["replicas"] = trainer.replicas
    out["workers"] = trainer.cluster.num_workers
    out["worker_index"] = trainer.cluster.worker_index
    return out


# --------------------------------------------------------------------------- the registry

REGISTRY = {
    "matmul": run_matmul,
    "pipeline": run_pipeline,
    "cifar_dist": lambda s: run_cifar_dist(s, augment=True),
    "cifar_dist_noaug": lambda s: run_cifar_dist(s, augment=False),
    "keras_fit": lambda s: keras_fit.run_keras_fit(s, "auto"),
    "keras_fit_xla": lambda s: keras_fit.run_keras_fit(s, True),
    "keras_fit_host": keras_fit.run_keras_fit_host,
    "multiworker": run_multiworker_child,  # one of (7)'s two workers (runner.run_two_workers)
    "profile": hlo_profile.run_profile,
}


def run_method(name: str, settings: Settings) -> dict:
    """Runs one method in this process; returns its result dict (with peak memory)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}")
    t0 = time.time()
    out = REGISTRY[name](settings)
    out["peak_rss_mib"] = timing.peak_rss_mib()
    out["wall_seconds"] = time.time() - t0
    return out
