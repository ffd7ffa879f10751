"""Method (1p): the cifar_dist step under the TensorFlow profiler, its time by kind of HLO op.

XLA:CPU emits per-HLO-op trace events only with XLA_FLAGS=--xla_cpu_enable_xprof_traceme
set before TensorFlow starts, so this method always runs in a process of its own.
"""

from __future__ import annotations

import glob
import os
import tempfile
import time

from cifar_dist.bench import timing, workload

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


def run_profile(settings) -> dict:
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
    cfg = workload.make_config(settings)
    trainer, _ = workload.build_trainer(cfg)
    iterator = None if trainer.data_on_device else trainer.train_iterator(0)
    steps = settings.steps_per_window
    warm = settings.warmup_windows * steps + 1
    trainer.steps.run(trainer.inputs(0, iterator), warm, stop=False).numpy()
    logdir = tempfile.mkdtemp(prefix="cifar_dist_profile_")
    tf.profiler.experimental.start(logdir)
    t0, meter = time.perf_counter(), timing.Meter()
    trainer.steps.run(trainer.inputs(warm, iterator), steps, stop=False).numpy()
    wall = time.perf_counter() - t0
    load = meter.load(wall)
    tf.profiler.experimental.stop()
    summary = xplane_summary(logdir)
    per_step = {k: v / steps for k, v in summary["by_category_ms"].items()}
    total = sum(per_step.values())
    top = sorted(summary["by_op_ms"].items(), key=lambda kv: -kv[1])[:12]
    return {
        "step_wall_ms": 1e3 * wall / steps,
        **load.fields(),
        "xla_executable_wall_ms_per_step": summary["executable_ms"] / steps,
        "hlo_op_ms_per_step_summed_over_threads": total,
        "by_category_ms_per_step": per_step,
        "by_category_share": {k: v / total for k, v in per_step.items()} if total else {},
        "top_ops_ms_per_step": [[k, v / steps] for k, v in top],
        "hlo_events": summary["hlo_events"],
        "profiled_steps": steps,
        "images_per_second": cfg.batch_size * steps / wall,
    }
