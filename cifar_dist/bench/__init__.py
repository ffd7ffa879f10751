"""Throughput benchmark: cifar_dist's XLA step against the Keras ways of training the same net.

    python -m cifar_dist.bench --flagfile=configs/bench.cfg --data=real \
        --data_dir=/path/to/cifar10 --output=/tmp/bench.json          # full run (~13 min, 2 CPUs)
    python -m cifar_dist.bench --tiny --output=/tmp/tiny.json       # plumbing check (tests)
    python -m cifar_dist.bench --projection --model=seed            # GPU scaling on paper
    python -m cifar_dist.bench --overhead                           # the loop's fixed costs
    python -m cifar_dist.bench --overhead --overhead_pairs=9        # main vs the tight loop, paired

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

The package: settings.py (the flags, read once into Settings), methods.py (the registry:
(5), (4), (1), (7); keras_fit.py (2), (2x), (3) with host_augment.py; hlo_profile.py (1p)),
workload.py (the shared configuration, trainer and counts), timing.py (windows, quantiles,
cores busy, the adjacent matmul), runner.py (child processes), report.py (derived figures
and the table), projection.py (--projection), overhead.py (--overhead). The HLO, FLOP and
graph checks are cifar_dist.graph_checks.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from cifar_dist import atomic, cli  # noqa: E402
from cifar_dist.bench.settings import Settings, define_flags  # noqa: E402

__all__ = ["Settings", "define_flags", "main", "run"]


def bench_command(fv, args) -> int:
    cli.no_positional_args(args)
    settings = Settings.from_flags(fv)
    settings.check()  # every mode: a bad flag is one line before anything runs
    if settings.child:
        from cifar_dist.bench.methods import run_method  # noqa: PLC0415

        atomic.write_json(settings.child_output, run_method(settings.child, settings))
        return 0
    if settings.projection:
        from cifar_dist.bench.projection import run_projection  # noqa: PLC0415

        p = run_projection(settings)
        if settings.output:
            atomic.write_json(settings.output, p)
        return 0
    if settings.overhead:
        from cifar_dist.bench.overhead import run_overhead  # noqa: PLC0415

        run_overhead(settings)
        return 0
    # A signal: cli.run_command's StopRequest; runner's waits check it and stop the children.
    settings = settings.with_tiny_defaults()  # --tiny's values pass check() too
    from cifar_dist.bench import report, runner  # noqa: PLC0415

    results = report.derive(runner.run_benchmark(settings))
    print(report.table(results))
    print(report.load_line(results))
    if settings.output:
        atomic.write_json(settings.output, results)
    return 0


main, run = cli.entry_points(__doc__, define_flags, bench_command)
