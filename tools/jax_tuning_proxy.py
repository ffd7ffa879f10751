"""A fast tuning proxy for issue #7: the seed network on Keras' JAX backend, on a GPU.

Why: the GPU machine this workplace lends has JAX but no TensorFlow, and TensorFlow with
its CUDA libraries is far larger than one call may carry (64 MiB). Keras 3 runs
cifar_dist/model.py unchanged on JAX, with the same optimizer classes (SGD with Nesterov,
AdamW; decoupled weight decay off gamma/beta/bias), the same loss (categorical
cross-entropy with label smoothing, mean over the batch), the same schedule and the same
45,000 / 5,000 split. The augmentation is cifar_dist/augment.py's sampling in keras.ops
(tests/test_jax_tuning_proxy.py checks both against cifar_dist) with JAX's random draws.
Not shared: TensorFlow's kernels, cifar_dist's loop, the random streams. A setting this
proxy prefers is a candidate; only a cifar_dist run records it (docs/tuning.md).

  python tools/jax_tuning_proxy.py --export=split.npz      # here: the split, 154 MB
  python tools/jax_tuning_proxy.py --data=split.npz --runs=runs.txt --out=results.jsonl
  python tools/jax_tuning_proxy.py --summarize=docs/tuning_proxy_runs.jsonl

A line of --runs (or one --run) is a comma list of key=value overriding DEFAULTS, e.g.
"optimizer=adamw,learning_rate=0.006,weight_decay=0.2,seed=1"; an empty one is the starting
point of docs/tuning.md. Each finished run is one JSON line on stdout and appended to --out. How the
split reached the GPU machine: BUILD_NOTES.md, "Tuning on a lent GPU".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The starting point of docs/tuning.md (configs/seed.cfg before the tuning). ema > 0: the
# optimizer's moving average of the weights, evaluated with the last BatchNorm statistics.
DEFAULTS = dict(learning_rate=0.2, batch_size=256, epochs=10, momentum=0.9, nesterov=1,
                weight_decay=5e-4, label_smoothing=0.1, warmup_fraction=0.15,
                schedule="onecycle", seed=0, ema=0.0, optimizer="sgd")


def export_split(path, data_dir):
    sys.path.insert(0, REPO)
    from cifar_dist import data
    bundle = data.hold_out_validation(
        data.load_local_cifar10(data.find_local_cifar10(data_dir)), 5000)
    np.savez(path, train_x=bundle.train.images, train_y=bundle.train.labels,
             val_x=bundle.validation.images, val_y=bundle.validation.labels)


def load_model_module():
    # cifar_dist/model.py imports only keras: load it alone, without the package (TF).
    spec = importlib.util.spec_from_file_location(
        "seed_model", os.path.join(REPO, "cifar_dist", "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_run(line):
    """"key=value,..." -> a full run config; ValueError names what is wrong."""
    cfg = dict(DEFAULTS)
    for item in filter(None, (p.strip() for p in line.split(","))):
        key, _, value = item.partition("=")
        if key not in cfg:
            raise ValueError(f"unknown key {key!r} in run {line!r} (keys: {', '.join(cfg)})")
        try:
            cfg[key] = type(DEFAULTS[key])(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} in run {line!r} is not a "
                             f"{type(DEFAULTS[key]).__name__}") from None
    return cfg


def make_schedule(peak, total, warmup, kind):
    """cifar_dist.optimizer.LearningRateSchedule, in keras.ops (any backend)."""
    import keras

    class Schedule(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = keras.ops.cast(step, "float32")
            progress = keras.ops.clip((step - warmup) / float(max(total - warmup, 1)), 0.0, 1.0)
            if kind == "onecycle":
                after = peak * (1.0 - progress)
            else:
                after = peak * 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
            if warmup == 0:
                return after
            return keras.ops.where(step < warmup, peak * (step + 1.0) / float(warmup), after)

    return Schedule()


def affine_sample(images, angle, shift_x, shift_y, flip):
    """cifar_dist.augment.affine_sample in keras.ops: float images [B, H, W, C], one
    (angle, shift_x, shift_y, flip) per image; flip, shift, rotation about the centre,
    bilinear, nearest fill (clamped source coordinates)."""
    from keras import ops
    b = ops.shape(images)[0]
    h, w, c = images.shape[1], images.shape[2], images.shape[3]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    rows = ops.broadcast_to(ops.arange(h, dtype="float32")[:, None], (h, w))[None]
    cols = ops.broadcast_to(ops.arange(w, dtype="float32")[None, :], (h, w))[None]

    def per_image(v):
        return v[:, None, None]

    cols = per_image(flip) * (w - 1 - cols) + (1 - per_image(flip)) * cols
    u, v = cols - cx - per_image(shift_x), rows - cy - per_image(shift_y)
    cos, sin = per_image(ops.cos(angle)), per_image(ops.sin(angle))
    src_x = ops.clip(cos * u - sin * v + cx, 0.0, w - 1.0)
    src_y = ops.clip(sin * u + cos * v + cy, 0.0, h - 1.0)
    x0, y0 = ops.floor(src_x), ops.floor(src_y)
    wx, wy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    x0, y0 = ops.cast(x0, "int32"), ops.cast(y0, "int32")
    x1, y1 = ops.minimum(x0 + 1, w - 1), ops.minimum(y0 + 1, h - 1)
    flat = ops.reshape(images, (b, h * w, c))

    def gather(y, x):
        index = ops.reshape(y * w + x, (b, h * w, 1))
        return ops.reshape(ops.take_along_axis(flat, index, axis=1), (b, h, w, c))

    top = gather(y0, x0) * (1 - wx) + gather(y0, x1) * wx
    bottom = gather(y1, x0) * (1 - wx) + gather(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def summarize(rows):
    """Markdown rows, best mean validation first: one per setting, its seeds pooled."""
    import statistics
    groups = {}
    for row in rows:
        setting = {k: row[k] for k in DEFAULTS if k != "seed" and row[k] != DEFAULTS[k]}
        if setting.get("optimizer") == "adamw":      # SGD's knobs mean nothing to AdamW
            setting = {k: v for k, v in setting.items() if k not in ("momentum", "nesterov")}
        groups.setdefault(json.dumps(setting, sort_keys=True), []).append(row)
    lines = ["| change from the starting point | runs | validation, mean (sd) | "
             "validation with flip TTA, mean |", "| --- | --- | --- | --- |"]
    stats = []
    for key, group in groups.items():
        val = [r["val"] for r in group]
        spread = f"{statistics.stdev(val):.2f}" if len(val) > 1 else "-"
        tta = statistics.mean(r["val_tta"] for r in group)
        change = ", ".join(f"{k}={v}" for k, v in json.loads(key).items()) or "none"
        stats.append((statistics.mean(val), f"| {change} | {len(val)} | "
                      f"{statistics.mean(val):.2f}% ({spread}) | {tta:.2f}% |"))
    return lines + [line for _, line in sorted(stats, key=lambda s: -s[0])]


def train_one(cfg, arrays):
    import jax
    import jax.numpy as jnp
    import keras

    keras.utils.set_random_seed(cfg["seed"])
    model = load_model_module().build_seed_model()
    n = arrays["train_x"].shape[0]
    batch = cfg["batch_size"]
    steps_per_epoch = n // batch                      # drop the remainder, as cifar_dist
    total = steps_per_epoch * cfg["epochs"]
    schedule = make_schedule(cfg["learning_rate"], total,
                             int(round(cfg["warmup_fraction"] * total)), cfg["schedule"])
    ema = cfg["ema"] > 0
    if cfg["optimizer"] == "adamw":
        opt = keras.optimizers.AdamW(schedule, weight_decay=cfg["weight_decay"],
                                     use_ema=ema, ema_momentum=cfg["ema"] or 0.99)
    else:
        opt = keras.optimizers.SGD(schedule, momentum=cfg["momentum"],
                                   nesterov=bool(cfg["nesterov"]),
                                   weight_decay=cfg["weight_decay"] or None,
                                   use_ema=ema, ema_momentum=cfg["ema"] or 0.99)
    opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    opt.build(model.trainable_variables)
    loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=cfg["label_smoothing"])

    train_x = jnp.asarray(arrays["train_x"])
    train_y = jnp.asarray(arrays["train_y"].astype(np.int32))
    val_x = jnp.asarray(arrays["val_x"])
    val_y = np.asarray(arrays["val_y"])

    def augment(images_u8, key):
        # cifar_dist/augment.py's draws (rotation +/-15 deg, shifts +/-10%, flip p=0.5),
        # from JAX's random stream.
        b, h, w = images_u8.shape[:3]
        u = jax.random.uniform(key, (4, b))
        return affine_sample(images_u8.astype(jnp.float32) / 255.0,
                             (2 * u[0] - 1) * (15.0 * math.pi / 180.0),
                             (2 * u[1] - 1) * 0.1 * w, (2 * u[2] - 1) * 0.1 * h,
                             (u[3] < 0.5).astype(jnp.float32))

    def compute_loss(tv, ntv, x, y):
        probs, ntv = model.stateless_call(tv, ntv, x, training=True)
        return loss_fn(y, probs), (ntv, probs)

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

    # The data are arguments, not closed-over constants (which XLA would embed).
    @jax.jit
    def step(state, train_x, train_y, idx, key):
        tv, ntv, ov = state
        x = augment(train_x[idx], key)
        labels = train_y[idx]
        y = jax.nn.one_hot(labels, 10)
        (loss, (ntv, probs)), grads = grad_fn(tv, ntv, x, y)
        tv, ov = opt.stateless_apply(ov, grads, tv)
        correct = jnp.sum(jnp.argmax(probs, -1) == labels)
        return (tv, ntv, ov), loss, correct

    @jax.jit
    def predict(tv, ntv, images_u8):
        probs, _ = model.stateless_call(tv, ntv, images_u8.astype(jnp.float32) / 255.0,
                                        training=False)
        flipped, _ = model.stateless_call(tv, ntv,
                                          images_u8[:, :, ::-1].astype(jnp.float32) / 255.0,
                                          training=False)
        return probs, flipped

    def evaluate(tv, ntv):
        plain, both = [], []
        for i in range(0, val_x.shape[0], 1000):
            p, f = predict(tv, ntv, val_x[i:i + 1000])
            plain.append(np.asarray(p))
            both.append(np.asarray(p + f))
        plain, both = np.concatenate(plain), np.concatenate(both)
        return (float(np.mean(plain.argmax(-1) == val_y)),
                float(np.mean(both.argmax(-1) == val_y)))

    state = ([v.value for v in model.trainable_variables],
             [v.value for v in model.non_trainable_variables],
             [v.value for v in opt.variables])
    rng = np.random.default_rng(cfg["seed"])
    key = jax.random.PRNGKey(cfg["seed"])
    curve, start = [], time.time()
    for epoch in range(cfg["epochs"]):
        order = rng.permutation(n)
        loss_sum, correct_sum = 0.0, 0
        for s in range(steps_per_epoch):
            key, sub = jax.random.split(key)
            idx = jnp.asarray(order[s * batch:(s + 1) * batch])
            state, loss, correct = step(state, train_x, train_y, idx, sub)
            loss_sum, correct_sum = loss_sum + loss, correct_sum + correct
        last = evaluate(state[0], state[1])        # (plain, flip TTA) on validation
        curve.append(round(100 * last[0], 2))
        train_acc = float(correct_sum) / (steps_per_epoch * batch)
    tv, ntv, ov = state
    result = dict(cfg, val_curve=curve, train_accuracy=round(100 * train_acc, 2),
                  train_loss=round(float(loss_sum) / steps_per_epoch, 4))
    if ema:
        # The optimizer's moving average of the trainable weights (BatchNorm statistics
        # stay those of the last weights).
        for var, value in zip(model.trainable_variables, tv):
            var.assign(value)
        for var, value in zip(opt.variables, ov):
            var.assign(value)
        opt.finalize_variable_values(model.trainable_variables)
        last = evaluate([v.value for v in model.trainable_variables], ntv)
    val, val_tta = last
    result.update(val=round(100 * val, 2), val_tta=round(100 * val_tta, 2),
                  seconds=round(time.time() - start, 1))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help=".npz with train_x, train_y, val_x, val_y")
    parser.add_argument("--runs", help="file: one run per line (key=value,...); # comments")
    parser.add_argument("--run", action="append", default=[], help="one run (repeatable)")
    parser.add_argument("--out", default="proxy_results.jsonl")
    parser.add_argument("--export", help="write the 45,000/5,000 split to this .npz, exit")
    parser.add_argument("--data_dir", help="with --export: CIFAR-10 in the official python "
                        "layout (a folder holding cifar-10-batches-py/, or the tarball)")
    parser.add_argument("--summarize", help="print a results .jsonl as a markdown table, exit")
    args = parser.parse_args()
    if args.summarize:
        with open(args.summarize) as f:
            print("\n".join(summarize([json.loads(line) for line in f if line.strip()])))
        return
    if args.export:
        if not args.data_dir:
            parser.error("--export needs --data_dir")
        export_split(args.export, args.data_dir)
        return
    os.environ.setdefault("KERAS_BACKEND", "jax")   # before anything imports keras
    # Bad input is one error line and exit 2, before any run starts (nothing is appended).
    try:
        lines = list(args.run)                 # --run="" is the starting point
        if args.runs:
            with open(args.runs) as f:
                lines += [ln for ln in (raw.split("#")[0].strip() for raw in f) if ln]
        runs = [parse_run(ln) for ln in lines]
        if not args.data:
            raise ValueError("--data is required to train (see --export)")
        with np.load(args.data) as npz:
            arrays = {k: npz[k] for k in ("train_x", "train_y", "val_x", "val_y")}
    except (OSError, ValueError, KeyError) as e:
        print(f"jax_tuning_proxy: error: {e}", file=sys.stderr)
        return 2
    for cfg in runs:
        result = train_one(cfg, arrays)
        print(json.dumps(result), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0

if __name__ == "__main__":
    sys.exit(main())
