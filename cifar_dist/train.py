"""The training loop: one XLA-compiled step per replica, under any tf.distribute strategy.

    outer tf.function  ->  strategy.run(replica_step)
        replica_step:  compiled_grads(images_u8, labels, seed)   # XLA: uint8 -> float,
                                                                  # augment, forward, loss,
                                                                  # loss scaling, gradients
                       optimizer.apply_gradients(...)             # all-reduce + update,
                                                                  # OUTSIDE XLA
    strategy.reduce(stats)                                        # one scalar-vector collective

Why this shape: Keras 3's fit() cannot XLA-compile under tf.distribute and fails under
MultiWorkerMirroredStrategy in TF 2.21; XLA cannot compile the cross-device all-reduce.
Keeping the all-reduce outside the compiled function makes the same step run on one
device, many GPUs and many hosts (see BUILD_NOTES.md).

The host never waits on the device inside a step: loss/accuracy/non-finite counters
accumulate in variables on the device and are read every --log_steps steps (and every
STOP_CHECK_STEPS steps to agree on a pre-emption stop across workers).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from cifar_dist import augment as augment_lib
from cifar_dist import pipeline, preflight
from cifar_dist.errors import CheckpointError, ConfigError, Preempted, TrainingDiverged
from cifar_dist.signals import StopRequest
from cifar_dist.model import build_model, train_flops_per_image, trainable_param_count

STOP_CHECK_STEPS = 10  # how often workers agree on a pre-emption stop (one host sync)
# stats vector each replica returns, summed over replicas: index -> meaning
LOSS, CORRECT, COUNT, STOP, NONFINITE = range(5)


# --------------------------------------------------------------------------- optimisation

class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `peak`, then linear decay to 0 (onecycle), cosine, or constant."""

    def __init__(self, peak, total_steps, warmup_steps, kind="onecycle"):
        self.peak, self.total, self.warmup, self.kind = peak, total_steps, warmup_steps, kind

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = tf.cast(max(self.warmup, 1), tf.float32)
        rest = tf.cast(max(self.total - self.warmup, 1), tf.float32)
        progress = tf.clip_by_value((step - self.warmup) / rest, 0.0, 1.0)
        if self.kind == "onecycle":
            after = self.peak * (1.0 - progress)
        elif self.kind == "cosine":
            after = self.peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            after = tf.constant(self.peak, tf.float32)
        if self.warmup == 0:
            return after
        return tf.where(step < self.warmup, self.peak * (step + 1.0) / warm, after)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total,
                "warmup_steps": self.warmup, "kind": self.kind}


def peak_learning_rate(cfg) -> float:
    """--learning_rate is tuned at --base_batch_size; --lr_scaling says how it grows with batch."""
    ratio = cfg.batch_size / cfg.base_batch_size
    return cfg.learning_rate * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def make_optimizer(cfg, total_steps: int):
    schedule = WarmupSchedule(peak_learning_rate(cfg), total_steps,
                              int(round(cfg.warmup_fraction * total_steps)), cfg.schedule)
    wd = cfg.weight_decay or None
    if cfg.optimizer == "sgd":
        opt = keras.optimizers.SGD(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                   weight_decay=wd)
    elif cfg.optimizer == "adam":
        opt = keras.optimizers.Adam(schedule, weight_decay=wd)
    else:
        opt = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
    # BatchNorm scales/offsets and biases are not decayed (standard practice).
    opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    if cfg.dtype == "float16":
        opt = keras.optimizers.LossScaleOptimizer(opt, initial_scale=cfg.loss_scale)
    return opt


# --------------------------------------------------------------------------- helpers

def is_tty() -> bool:
    return sys.stderr.isatty()


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- trainer

class Trainer:
    """Builds model/optimizer/checkpoints under a strategy and runs the loop."""

    def __init__(self, cfg, strategy, cluster, bundle):
        self.cfg, self.strategy, self.cluster, self.bundle = cfg, strategy, cluster, bundle
        self.replicas = strategy.num_replicas_in_sync
        if cfg.batch_size % self.replicas:
            raise ConfigError(f"--batch_size={cfg.batch_size} does not divide among "
                              f"{self.replicas} replicas: use a multiple of {self.replicas}")
        self.steps_per_epoch = pipeline.steps_per_epoch(len(bundle.train), cfg.batch_size)
        self.total_steps = cfg.train_steps or cfg.train_epochs * self.steps_per_epoch
        if cfg.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(cfg.seed)
        with strategy.scope():
            self.model = build_model(cfg.model, bundle.num_classes, cfg.dtype_policy,
                                     cfg.sync_batch_norm)
            self.optimizer = make_optimizer(cfg, self.total_steps)
            self.optimizer.build(self.model.trainable_variables)
            self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                             name="skipped_steps")
        # Host-side accumulators (not mirrored): summed stats since the last read.
        self.stats = tf.Variable(tf.zeros([5]), trainable=False, name="stats")
        self.loss_fn = keras.losses.CategoricalCrossentropy(
            label_smoothing=cfg.label_smoothing, reduction=None)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              global_step=self.global_step,
                                              skipped_steps=self.skipped_steps)
        self.model_dir = cfg.model_dir
        self.ckpt_dir = os.path.join(self.model_dir, "checkpoints")
        self._build_steps()

    # ------------------------------------------------------------------ compiled functions

    def _build_steps(self):
        cfg, model, optimizer = self.cfg, self.model, self.optimizer
        num_classes = self.bundle.num_classes
        global_batch = float(cfg.batch_size)
        loss_scaling = cfg.dtype == "float16"

        def grads_fn(images_u8, labels, seed):
            if cfg.augment:
                x = augment_lib.augment_batch(images_u8, seed)
            else:
                x = augment_lib.to_unit_float(images_u8)
            with tf.GradientTape() as tape:
                probs = model(x, training=True)
                onehot = tf.one_hot(labels, num_classes)
                per_example = self.loss_fn(onehot, probs)
                # Sum / GLOBAL batch: summing gradients over replicas gives the global mean.
                loss = tf.reduce_sum(per_example) / global_batch
                scaled = optimizer.scale_loss(loss) if loss_scaling else loss
            grads = tape.gradient(scaled, model.trainable_variables)
            correct = tf.reduce_sum(tf.cast(
                tf.equal(tf.argmax(probs, -1, output_type=tf.int32), labels), tf.float32))
            return grads, tf.reduce_sum(per_example), correct

        if cfg.sync_batch_norm and self.replicas > 1:
            # Synchronised BatchNorm all-reduces inside the forward pass; TF 2.21 cannot put
            # a collective inside a nested (XLA) function, so the step runs uncompiled.
            logging.warning("--sync_batch_norm with %d replicas: the step runs without XLA",
                            self.replicas)
            self.grads_fn = grads_fn
        else:
            self.grads_fn = tf.function(grads_fn, jit_compile=cfg.jit_compile)

        def replica_step(images, labels, stop):
            ctx = tf.distribute.get_replica_context()
            seed = tf.stack([tf.constant(cfg.seed, tf.int64),
                             self.global_step * 4096 + tf.cast(ctx.replica_id_in_sync_group,
                                                               tf.int64)])
            grads, loss_sum, correct = self.grads_fn(images, labels, seed)
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            nonfinite = 1.0 - tf.cast(finite, tf.float32)
            if loss_scaling:
                # Make the skip decision identical on every replica and worker: if any
                # replica overflowed, every replica hands NaN gradients to the
                # LossScaleOptimizer, which then skips the step and halves the scale.
                any_bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, nonfinite)
                poison = tf.where(any_bad > 0, float("nan"), 0.0)
                grads = [g + tf.cast(poison, g.dtype) for g in grads]
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            count = tf.cast(tf.shape(labels)[0], tf.float32)
            nonfinite_loss = 1.0 - tf.cast(tf.math.is_finite(loss_sum), tf.float32)
            return tf.stack([loss_sum, correct, count, tf.cast(stop, tf.float32),
                             tf.maximum(nonfinite, nonfinite_loss)])

        @tf.function
        def train_step(iterator, stop):
            images, labels, _ = next(iterator)
            per_replica = self.strategy.run(replica_step, args=(images, labels, stop))
            totals = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            self.global_step.assign_add(1)
            if loss_scaling:
                self.skipped_steps.assign_add(tf.cast(totals[NONFINITE] > 0, tf.int64))
            self.stats.assign_add(totals)
            return totals

        self.train_step = train_step

        def eval_fn(images_u8, labels, weights):
            probs = model(augment_lib.to_unit_float(images_u8), training=False)
            per_example = keras.losses.categorical_crossentropy(
                tf.one_hot(labels, num_classes), probs)
            correct = tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), labels),
                              tf.float32)
            return tf.stack([tf.reduce_sum(per_example * weights),
                             tf.reduce_sum(correct * weights), tf.reduce_sum(weights)])

        compiled_eval = tf.function(eval_fn, jit_compile=cfg.jit_compile)

        @tf.function
        def eval_step(iterator):
            images, labels, weights = next(iterator)
            # A plain Python wrapper: strategy.run must trace the XLA function once per
            # replica (each replica reads its own variable copies).
            per_replica = self.strategy.run(lambda *batch: compiled_eval(*batch),
                                            args=(images, labels, weights))
            return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        self.eval_step = eval_step

        @tf.function
        def weights_finite():
            return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v))
                                  for v in model.trainable_variables])

        self._weights_finite = weights_finite

        # BatchNorm moving statistics are plain per-replica variables in Keras 3 (no
        # aggregation), so every replica and worker drifts to its own. Before anything reads
        # them (evaluation, checkpoint, export) they are averaged over all replicas and the
        # mean is written back to every copy: checkpoints and workers agree bitwise.
        stats_vars = [getattr(v, "value", v) for v in model.non_trainable_variables]

        @tf.function
        def sync_moving_stats():
            def mean_of_replicas():
                ctx = tf.distribute.get_replica_context()
                return ctx.all_reduce(tf.distribute.ReduceOp.MEAN,
                                      [tf.identity(v) for v in stats_vars])

            means = self.strategy.run(mean_of_replicas)
            for var, mean in zip(stats_vars, means):
                self.strategy.extended.update(var, lambda v, m: v.assign(m), args=(mean,),
                                              group=False)

        self.sync_moving_stats = sync_moving_stats if self.replicas > 1 else (lambda: None)

    # ------------------------------------------------------------------ data

    def _distributed(self, make):
        def fn(ctx: tf.distribute.InputContext):
            return make(ctx.input_pipeline_id, ctx.num_input_pipelines)
        return self.strategy.distribute_datasets_from_function(fn)

    def train_iterator(self, start_step: int):
        train = self.bundle.train
        ds = self._distributed(lambda pid, npipe: pipeline.train_dataset(
            train.images, train.labels, global_batch=self.cfg.batch_size, seed=self.cfg.seed,
            start_step=start_step, total_steps=self.total_steps, num_replicas=self.replicas,
            pipeline_id=pid, num_pipelines=npipe))
        return iter(ds)

    def evaluate(self, split) -> dict:
        """Loss and accuracy of the current weights on a split, computed on all replicas."""
        holder = {}

        def make(pid, npipe):
            ds, holder["steps"] = pipeline.eval_dataset(
                split.images, split.labels, global_batch=self.cfg.batch_size,
                num_replicas=self.replicas, pipeline_id=pid, num_pipelines=npipe)
            return ds

        iterator = iter(self._distributed(make))
        total = np.zeros(3)
        for _ in range(holder["steps"]):
            total += self.eval_step(iterator).numpy()
        return {"loss": total[0] / total[2], "accuracy": total[1] / total[2],
                "examples": int(total[2])}

    # ------------------------------------------------------------------ checkpoints

    def _check_resume_compatible(self):
        path = os.path.join(self.model_dir, "config.json")
        if not os.path.exists(path):
            return
        with open(path) as f:
            saved = json.load(f)
        shaping = {"model": self.cfg.model, "num_classes": self.bundle.num_classes,
                   "dtype": self.cfg.dtype, "optimizer": self.cfg.optimizer}
        differ = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in shaping.items()
                  if k in saved and saved[k] != v]
        if differ:
            raise CheckpointError(f"{self.model_dir} holds a run with other settings "
                                  f"({'; '.join(differ)}): use another --model_dir")

    def restore(self) -> int:
        """Restores the newest loadable checkpoint; returns the step to start from."""
        if not tf.io.gfile.isdir(self.ckpt_dir):
            return 0
        self._check_resume_compatible()
        state = tf.train.get_checkpoint_state(self.ckpt_dir)
        candidates = list(reversed(state.all_model_checkpoint_paths)) if state else []
        for path in candidates:
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as e:  # noqa: BLE001 - a damaged file raises many types
                # (OpError, IndexError "Read less bytes", ValueError, AssertionError); an
                # older checkpoint then overwrites every variable again.
                logging.warning("checkpoint %s is unusable (%s); trying an older one",
                                path, str(e).splitlines()[0])
                continue
            step = int(self.global_step.numpy())
            logging.info("resumed from %s at step %d", path, step)
            return step
        if candidates:
            raise CheckpointError(f"no loadable checkpoint in {self.ckpt_dir}: "
                                  "use another --model_dir to start fresh")
        return 0

    def save(self) -> None:
        """Every worker takes part (saving is a collective); only the chief keeps its files.

        Weights that went non-finite are never saved: the last good checkpoint stays the
        newest one (every worker holds the same weights, so all of them stop here).
        """
        self.sync_moving_stats()
        if not bool(self._weights_finite().numpy()):
            raise TrainingDiverged(
                f"weights became non-finite by step {int(self.global_step.numpy())}; the last "
                f"good checkpoint in {self.ckpt_dir} is kept (lower --learning_rate?)")
        try:
            if self.cluster.is_chief:
                # CheckpointManager updates its state file only after the new checkpoint is
                # complete, so a crash or a full disk mid-save leaves the previous one usable.
                self.manager.save(checkpoint_number=int(self.global_step.numpy()))
            else:
                tmp = tempfile.mkdtemp(prefix=f"cifar_dist_worker{self.cluster.worker_index}_")
                try:
                    self.checkpoint.write(os.path.join(tmp, "ckpt"))
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        except (tf.errors.OpError, OSError) as e:
            message = getattr(e, "message", None) or str(e)
            raise CheckpointError(f"cannot write a checkpoint into {self.ckpt_dir} "
                                  f"({type(e).__name__}: {message.splitlines()[0][:200]}); "
                                  "the previous checkpoint is intact (disk full?)") from None

    # ------------------------------------------------------------------ loop

    def _read_stats(self):
        values = self.stats.numpy()
        self.stats.assign(tf.zeros([5]))
        return values

    def run(self, stop: StopRequest | None = None) -> dict:
        """Trains to the end. `stop`: a StopRequest installed earlier (main installs one at
        start-up, so a signal during start-up is not lost); else one is installed here."""
        with (stop or StopRequest()) as self.stop:
            return self._run_locked()

    def _run_locked(self) -> dict:
        if not self.cluster.is_chief:
            return self._run()
        preflight.check_disk_space(self.model_dir, trainable_param_count(self.model),
                                   self.cfg.keep_checkpoints)
        os.makedirs(self.model_dir, exist_ok=True)
        with preflight.ModelDirLock(self.model_dir):
            return self._run()

    def _run(self) -> dict:
        cfg, chief = self.cfg, self.cluster.is_chief
        start_step = self.restore()
        if chief:
            self.manager = tf.train.CheckpointManager(self.checkpoint, self.ckpt_dir,
                                                      max_to_keep=cfg.keep_checkpoints)
            config = dict(cfg.to_dict(), num_classes=self.bundle.num_classes,
                          class_names=list(self.bundle.class_names),
                          replicas=self.replicas, workers=self.cluster.num_workers)
            write_json_atomic(os.path.join(self.model_dir, "config.json"), config)
        writer = (tf.summary.create_file_writer(os.path.join(self.model_dir, "tensorboard"))
                  if chief and cfg.enable_tensorboard else tf.summary.create_noop_writer())
        history = self._load_history() if chief else []
        logging.info("training %s: %d steps (%d per epoch), global batch %d on %d replica(s), "
                     "dtype %s, XLA %s, from step %d", cfg.model, self.total_steps,
                     self.steps_per_epoch, cfg.batch_size, self.replicas, cfg.dtype,
                     cfg.jit_compile, start_step)
        iterator = self.train_iterator(start_step)
        progress = Progress(self.total_steps, start_step, enabled=chief)
        # Throughput counts training time only: evaluation and checkpoint time is excluded
        # (the clock restarts after them); XLA compilation in the first steps is included.
        clock = Throughput(cfg.batch_size, start_step)
        epoch_stats = np.zeros(5)
        step = start_step
        stop = self.stop
        with writer.as_default():
            no_stop = tf.constant(0, tf.int32)
            while step < self.total_steps:
                flag = no_stop if stop.signal is None else tf.constant(1, tf.int32)
                totals = self.train_step(iterator, flag)
                step += 1
                epoch_end = step % self.steps_per_epoch == 0 or step == self.total_steps
                log_now = step % cfg.log_steps == 0 or epoch_end
                check_stop = step % STOP_CHECK_STEPS == 0
                ckpt_now = cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0
                if not (log_now or check_stop or ckpt_now):
                    continue
                window = self._read_stats()  # waits for the device: the clock can stop here
                clock.stop(step)
                epoch_stats += window
                if window[NONFINITE] and cfg.dtype != "float16":
                    raise TrainingDiverged(
                        f"non-finite loss or gradients at or before step {step}; "
                        f"the last good checkpoint in {self.ckpt_dir} is kept")
                if log_now:
                    ips = clock.window_rate()
                    lr = float(self.optimizer.learning_rate.numpy())
                    progress.update(step, loss=window[LOSS] / max(window[COUNT], 1),
                                    acc=window[CORRECT] / max(window[COUNT], 1), ips=ips, lr=lr,
                                    skipped=int(self.skipped_steps.numpy()))
                    tf.summary.scalar("train/loss", window[LOSS] / max(window[COUNT], 1), step)
                    tf.summary.scalar("train/images_per_second", ips, step)
                    tf.summary.scalar("train/learning_rate", lr, step)
                if float(totals[STOP].numpy()) > 0:
                    self.save()
                    progress.close()
                    raise Preempted(f"stopped by a signal at step {step}; checkpoint saved in "
                                    f"{self.ckpt_dir}: rerun the same command to resume")
                if epoch_end:
                    epoch = math.ceil(step / self.steps_per_epoch)
                    row = self._end_epoch(epoch, step, epoch_stats, clock.epoch_rate(),
                                          clock.train_seconds)
                    epoch_stats = np.zeros(5)
                    if chief:
                        history = [h for h in history if h["epoch"] < epoch] + [row]
                        self._write_history(history)
                    self.save()
                elif ckpt_now:
                    self.save()
                clock.start()
        progress.close()
        return self._finish(start_step, clock, history)

    def _end_epoch(self, epoch, step, stats, images_per_second, train_seconds):
        self.sync_moving_stats()
        row = {"epoch": epoch, "step": step,
               "train_loss": stats[LOSS] / max(stats[COUNT], 1),
               "train_accuracy": stats[CORRECT] / max(stats[COUNT], 1),
               # the rate the next step will use (so 0 after the last step of onecycle)
               "learning_rate": float(self.optimizer.learning_rate.numpy()),
               "images_per_second": images_per_second,
               "train_seconds": train_seconds,
               "skipped_steps": int(self.skipped_steps.numpy())}
        if not self.cfg.skip_eval:
            name = self.bundle.eval_split_name
            result = self.evaluate(self.bundle.eval_split)
            row[f"{name}_loss"], row[f"{name}_accuracy"] = result["loss"], result["accuracy"]
            tf.summary.scalar(f"{name}/accuracy", result["accuracy"], step)
            tf.summary.scalar(f"{name}/loss", result["loss"], step)
        logging.info("epoch %d: %s", epoch, ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        return row

    def _history_path(self):
        return os.path.join(self.model_dir, "history.csv")

    def _load_history(self):
        if not os.path.exists(self._history_path()):
            return []
        with open(self._history_path()) as f:
            return [{k: (float(v) if k not in ("epoch", "step", "skipped_steps") else int(float(v)))
                     for k, v in row.items() if v != ""} for row in csv.DictReader(f)]

    def _write_history(self, history):
        keys = []
        for row in history:
            keys += [k for k in row if k not in keys]
        tmp = self._history_path() + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)
        os.replace(tmp, self._history_path())

    def _finish(self, start_step, clock, history) -> dict:
        self.sync_moving_stats()
        test = self.evaluate(self.bundle.test)
        trained_steps = self.total_steps - start_step
        metrics = {
            "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "test_examples": test["examples"],
            "epochs": self.total_steps / self.steps_per_epoch, "steps": self.total_steps,
            "steps_this_run": trained_steps,
            # training images / training seconds of this run (no evaluation, no checkpoints)
            "images_per_second": clock.total_rate(),
            "train_seconds": clock.train_seconds,
            "wall_seconds": clock.wall_seconds(),
            "trainable_params": trainable_param_count(self.model),
            "train_flops_per_image": train_flops_per_image(self.model),
            "pflops_per_run": train_flops_per_image(self.model)
            * self.total_steps * self.cfg.batch_size / 1e15,
            "skipped_steps": int(self.skipped_steps.numpy()),
            "replicas": self.replicas, "workers": self.cluster.num_workers,
            "data_source": self.bundle.source,
            "config": self.cfg.to_dict(),
        }
        if self.bundle.validation is not None:
            val = self.evaluate(self.bundle.validation)
            metrics["validation_accuracy"], metrics["validation_loss"] = val["accuracy"], val["loss"]
        if history:
            metrics["history"] = history
        if self.cluster.is_chief:
            write_json_atomic(os.path.join(self.model_dir, "metrics.json"), metrics)
        logging.info("test accuracy %.4f (loss %.4f) on %d images; %.1f images/s; %.0f s",
                     test["accuracy"], test["loss"], test["examples"],
                     metrics["images_per_second"], metrics["wall_seconds"])
        return metrics


class Throughput:
    """Training images per second, with the clock stopped during evaluation and saving."""

    def __init__(self, batch_size, start_step):
        self.batch, self.t0 = batch_size, time.time()
        self.train_seconds, self.images = 0.0, 0
        self._since, self._step = time.time(), start_step
        self._window = [0.0, 0]  # seconds, images since the last log line
        self._epoch = [0.0, 0]

    def stop(self, step):
        dt, n = time.time() - self._since, (step - self._step) * self.batch
        self.train_seconds += dt
        self.images += n
        for acc in (self._window, self._epoch):
            acc[0] += dt
            acc[1] += n
        self._since, self._step = time.time(), step

    def start(self):
        self._since = time.time()

    @staticmethod
    def _rate(acc):
        rate = acc[1] / acc[0] if acc[0] > 0 else 0.0
        acc[0], acc[1] = 0.0, 0
        return rate

    def window_rate(self):
        return self._rate(self._window)

    def epoch_rate(self):
        return self._rate(self._epoch)

    def total_rate(self):
        return self.images / self.train_seconds if self.train_seconds > 0 else 0.0

    def wall_seconds(self):
        return time.time() - self.t0


class Progress:
    """A one-line progress bar on a terminal; plain log lines otherwise."""

    def __init__(self, total, start, enabled=True):
        self.total, self.enabled, self.tty = total, enabled, is_tty()
        self.start = start

    def update(self, step, loss, acc, ips, lr, skipped):
        if not self.enabled:
            return
        text = (f"step {step}/{self.total} loss {loss:.4f} acc {acc:.4f} "
                f"{ips:.1f} img/s lr {lr:.4g}" + (f" skipped {skipped}" if skipped else ""))
        if self.tty:
            width = 30
            done = int(width * step / self.total)
            sys.stderr.write(f"\r[{'=' * done}{'.' * (width - done)}] {text}   ")
            sys.stderr.flush()
        else:
            logging.info(text)

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def train(cfg, strategy, cluster, bundle) -> dict:
    return Trainer(cfg, strategy, cluster, bundle).run()
