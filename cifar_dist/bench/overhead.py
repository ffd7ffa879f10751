"""The training loop's fixed costs, where compute is negligible: `python -m cifar_dist.bench --overhead`.

For one device and for mirrored on 2 logical CPUs, with SGD and with AdamW (each case in its
own process, since devices are fixed at start-up):

  loop        seconds per step of the training call as Trainer.run makes it (--steps_per_loop
              steps per call), tiny network at 2 images per replica
  stub        the same with the network replaced by a trivial one (global average pool +
              dense): what is left is the loop's own cost per step
  tight       (one device) the tightest loop TensorFlow runs for the same network: one
              jit_compile step holding gather, augmentation, forward, backward and a plain
              SGD update, called in a tf.range loop, data on the device
  counts      graph ops outside XLA per replica per step and per call (graph_checks)
  host reads  per 100 steps: one per call (the call's stats), from the loop's own call
              schedule (Trainer.loop_end) with log lines every 50 steps

and `main`: `python -m cifar_dist.main` itself (tiny network, batch 2, one device, 2 epochs
of 200 steps), its last epoch's images/s from history.csv, as a user runs it.

--overhead_pairs=N answers one question only, main against tight, on a machine whose speed
drifts (this VM's moved by 45% between two rounds minutes apart): N rounds, each a tight
loop and a main run of 2,000-step epochs, one right after the other (alternating which goes
first), each in a fresh process; the ratio within each round, then their median and range.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time

from cifar_dist import atomic
from cifar_dist.bench.runner import child_env, run_child
from cifar_dist.bench.settings import Settings

CASES = [("one_device", "sgd"), ("one_device", "adamw"), ("mirrored", "sgd"), ("mirrored", "adamw")]
PER_REPLICA_BATCH = 2
STEPS_PER_CALL = 100
IMAGES = 2000


def _config(strategy, optimizer, **overrides):
    from cifar_dist.config import Config  # noqa: PLC0415

    replicas = 2 if strategy == "mirrored" else 1
    values = dict(dataset="synthetic", synthetic_train_size=IMAGES, synthetic_test_size=16,
                  model="tiny", batch_size=PER_REPLICA_BATCH * replicas, train_steps=10 ** 6,
                  optimizer=optimizer, strategy=strategy,
                  num_cpu_devices=replicas if strategy == "mirrored" else 0,
                  steps_per_loop=str(STEPS_PER_CALL), log_steps=50, model_dir="",
                  enable_tensorboard=False, export=False, skip_eval=True)
    values.update(overrides)
    return Config(**values)


def _seconds_per_step(call, steps, windows):
    call()  # tracing and XLA compilation
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) / steps)
    return sorted(times)[len(times) // 2]


def _time_loop(trainer, windows):
    step = [0]

    def call():
        per_epoch = trainer.steps_per_epoch
        if step[0] % per_epoch + STEPS_PER_CALL > per_epoch:  # a call never spans an epoch
            step[0] = (step[0] // per_epoch + 1) * per_epoch
        trainer.steps.run(trainer.inputs(step[0], None), STEPS_PER_CALL, stop=False).numpy()
        step[0] += STEPS_PER_CALL

    return _seconds_per_step(call, STEPS_PER_CALL, windows)


def host_reads_per_100_steps(trainer, start=0) -> int:
    """Calls (one host read each) the loop makes for steps [start, start + 100)."""
    calls, step = 0, start
    while step < start + 100:
        step = trainer.loop_end(step)
        calls += 1
    return calls


def _stub_model(name, num_classes=10, dtype_policy="float32", sync_batch_norm=False):
    import keras  # noqa: PLC0415

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax",
                                                  dtype="float32")(x), name="stub")


def tight_loop_seconds_per_step(windows) -> float:
    """One XLA step (gather, augmentation, forward, backward, SGD) in a tf.range loop."""
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    import keras  # noqa: PLC0415

    from cifar_dist import augment  # noqa: PLC0415
    from cifar_dist.model import build_model  # noqa: PLC0415

    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (IMAGES, 32, 32, 3), dtype=np.uint8))
    labels = tf.constant(rng.integers(0, 10, IMAGES, dtype=np.int32))
    model = build_model("tiny")
    variables = model.trainable_variables
    loss_fn = keras.losses.CategoricalCrossentropy()

    @tf.function(jit_compile=True)
    def step(i):
        ids = (i * PER_REPLICA_BATCH + tf.range(PER_REPLICA_BATCH)) % IMAGES
        x = augment.augment_batch(tf.gather(images, ids), tf.stack([0, tf.cast(i, tf.int64)]))
        with tf.GradientTape() as tape:
            loss = loss_fn(tf.one_hot(tf.gather(labels, ids), 10), model(x, training=True))
        for v, g in zip(variables, tape.gradient(loss, variables)):
            v.assign_sub(0.01 * g)

    @tf.function
    def loop(n):
        for i in tf.range(n):
            step(i)
        return tf.convert_to_tensor(variables[0])[0, 0, 0, 0]

    return _seconds_per_step(lambda: loop(tf.constant(STEPS_PER_CALL)).numpy(),
                             STEPS_PER_CALL, windows)


def run_case(strategy, optimizer, windows) -> dict:
    """One (strategy, optimizer) case, in this (fresh) process."""
    from cifar_dist import graph_checks, train  # noqa: PLC0415
    from cifar_dist.bench.workload import build_trainer  # noqa: PLC0415

    trainer, bundle = build_trainer(_config(strategy, optimizer))
    out = {"strategy": strategy, "optimizer": optimizer, "replicas": trainer.replicas,
           "loop_seconds_per_step": _time_loop(trainer, windows),
           "host_reads_per_100_steps": host_reads_per_100_steps(trainer),
           **graph_checks.loop_counts(trainer)}
    real_build = train.build_model
    train.build_model = _stub_model
    try:
        stub = train.Trainer(trainer.cfg, trainer.strategy, trainer.cluster, bundle)
        out["stub_seconds_per_step"] = _time_loop(stub, windows)
    finally:
        train.build_model = real_build
    if strategy == "one_device":
        out["tight_seconds_per_step"] = tight_loop_seconds_per_step(windows)
    return out


def run_main_as_users_do(extra=(), train_images=400) -> dict:
    """`python -m cifar_dist.main`, tiny network, batch 2: the last epoch's images/s."""
    with tempfile.TemporaryDirectory(prefix="cifar_dist_overhead_") as tmp:
        cmd = [sys.executable, "-m", "cifar_dist.main", "--dataset=synthetic",
               f"--synthetic_train_size={train_images}", "--synthetic_test_size=16",
               "--model=tiny",
               f"--batch_size={PER_REPLICA_BATCH}", "--train_epochs=2", "--skip_eval",
               "--export=false", "--enable_tensorboard=false", f"--model_dir={tmp}/run", *extra]
        result = run_child(cmd, child_env())
        if result.returncode != 0:
            raise RuntimeError(f"cifar_dist.main failed:\n{result.stderr[-3000:]}")
        with open(os.path.join(tmp, "run", "history.csv")) as f:
            rows = list(csv.DictReader(f))
    ips = float(rows[-1]["images_per_second"])
    return {"command": " ".join(cmd[1:]), "images_per_second": ips,
            "seconds_per_step": PER_REPLICA_BATCH / ips}


def _child_case(case: str, windows: int, tmp: str) -> dict:
    out = os.path.join(tmp, "case.json")
    cmd = [sys.executable, "-m", "cifar_dist.bench", "--overhead", f"--overhead_case={case}",
           f"--windows={windows}", f"--child_output={out}"]
    result = run_child(cmd, child_env())
    if result.returncode != 0:
        raise RuntimeError(f"overhead case {case} failed:\n{result.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


PAIR_TRAIN_IMAGES = 4000  # 2,000-step epochs at batch 2: seconds, not a fraction of one


def run_pairs(rounds: int, windows: int) -> dict:
    """--overhead_pairs: (tight, main) side by side, `rounds` times; ratios within rounds."""
    pairs = []
    with tempfile.TemporaryDirectory(prefix="cifar_dist_overhead_") as tmp:
        for r in range(rounds):
            got = {}
            for what in (("tight", "main") if r % 2 == 0 else ("main", "tight")):
                print(f"[overhead] round {r + 1}/{rounds}: {what} ...", file=sys.stderr,
                      flush=True)
                if what == "tight":
                    got["tight"] = _child_case("tight", windows, tmp)["tight_seconds_per_step"]
                else:
                    main = run_main_as_users_do(train_images=PAIR_TRAIN_IMAGES)
                    got["main"], command = main["seconds_per_step"], main["command"]
            pairs.append({**got, "ratio": got["main"] / got["tight"]})
    ratios = sorted(p["ratio"] for p in pairs)
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])
    return {"pairs": pairs, "command": command, "windows": windows, "median_ratio": median,
            "min_ratio": ratios[0], "max_ratio": ratios[-1]}


def pairs_table(results) -> str:
    rows = ["| round | tight ms/step | main ms/step | main / tight |", "|---|---|---|---|"]
    for i, p in enumerate(results["pairs"], 1):
        rows.append(f"| {i} | {1e3 * p['tight']:.2f} | {1e3 * p['main']:.2f} | "
                    f"{p['ratio']:.2f}x |")
    rows.append(f"main / tight over {len(results['pairs'])} rounds: median "
                f"{results['median_ratio']:.2f}x, range {results['min_ratio']:.2f}-"
                f"{results['max_ratio']:.2f}x (main: python {results['command']})")
    return "\n".join(rows)


def run_all(windows: int, cases=CASES) -> dict:
    """Every case in its own process, then cifar_dist.main twice (auto and 100 per call)."""
    results = {"cases": [], "windows": windows, "per_replica_batch": PER_REPLICA_BATCH,
               "steps_per_call": STEPS_PER_CALL}
    with tempfile.TemporaryDirectory(prefix="cifar_dist_overhead_") as tmp:
        for strategy, optimizer in cases:
            print(f"[overhead] {strategy} {optimizer} ...", file=sys.stderr, flush=True)
            results["cases"].append(_child_case(f"{strategy},{optimizer}", windows, tmp))
    print("[overhead] cifar_dist.main ...", file=sys.stderr, flush=True)
    results["main_auto"] = run_main_as_users_do()
    results["main_100"] = run_main_as_users_do([f"--steps_per_loop={STEPS_PER_CALL}"])
    return results


def table(results) -> str:
    ms = 1e3
    rows = ["| strategy | optimizer | loop ms/step | stub ms/step | tight ms/step | loop / tight "
            "| ops outside XLA per replica per step | per call | host reads per 100 steps |",
            "|---|---|---|---|---|---|---|---|---|"]
    tight = next((c["tight_seconds_per_step"] for c in results["cases"]
                  if "tight_seconds_per_step" in c), None)
    for c in results["cases"]:
        t = c.get("tight_seconds_per_step")
        cells = [f"{c['strategy']} ({c['replicas']})", c["optimizer"],
                 f"{ms * c['loop_seconds_per_step']:.2f}", f"{ms * c['stub_seconds_per_step']:.2f}",
                 f"{ms * t:.2f}" if t else "-",
                 f"{c['loop_seconds_per_step'] / t:.2f}x" if t else "-",
                 f"{c['ops_outside_xla_per_replica_per_step']:g}",
                 str(c["ops_outside_xla_per_call"]), str(c["host_reads_per_100_steps"])]
        rows.append("| " + " | ".join(cells) + " |")
    lines = ["\n".join(rows)]
    for key in ("main_auto", "main_100"):
        m = results.get(key)
        if m:
            ratio = f", {m['seconds_per_step'] / tight:.2f}x the tight loop" if tight else ""
            lines.append(f"python {m['command']}: last epoch {m['images_per_second']:.1f} "
                         f"img/s = {ms * m['seconds_per_step']:.2f} ms per step{ratio}")
    return "\n".join(lines)


def run_overhead(settings: Settings) -> None:
    """--overhead: every case (each a child: --overhead_case), the table, --output."""
    if settings.overhead_case == "tight":  # a child of --overhead_pairs
        atomic.write_json(settings.child_output, {
            "tight_seconds_per_step": tight_loop_seconds_per_step(settings.windows)})
        return
    if settings.overhead_case:  # a child: one case, in this fresh process
        result = run_case(*settings.overhead_case.split(","), settings.windows)
        atomic.write_json(settings.child_output, result)
        return
    if settings.overhead_pairs:
        results = run_pairs(settings.overhead_pairs, settings.windows)
        print(pairs_table(results))
    else:
        results = run_all(settings.windows)
        print(table(results))
    if settings.output:
        atomic.write_json(settings.output, results)
