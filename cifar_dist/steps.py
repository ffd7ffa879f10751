"""What training computes, compiled: the step on each replica, and the one call that runs many.

    train_loop(inputs, num_steps, stop)           one tf.function call = num_steps steps
      window := 0
      for _ in tf.range(num_steps):               a TF while loop (an XLA while loop was 3.5x
                                                  slower on CPU, so the loop stays in TF)
        strategy.run(replica_step)
          one replica     fused_step   [XLA]  gather the batch, uint8 -> float, augment,
                                              forward, loss (scaled), gradients (one flat
                                              vector), one non-finite flag, the update, the stats
          many replicas   grads_step   [XLA]  the same up to the flag, packed into one vector
                                              with BatchNorm's moving statistics / replicas
                          ctx.all_reduce(SUM, packed)   one collective: gradients, statistics,
                                              flags
                          apply_step   [XLA]  learning rate (once), optimizer (flat), weight decay,
                                              loss scale (skip agreed: the flag was summed
                                              over every replica and worker), the moving
                                              statistics := their mean, the stats
      return window                               the call's stats, on replica 0's device

The host reads the returned window once per call (`STATS` names its entries). Nothing else
crosses between host and device inside a call: with --data_on_device the batch is gathered
from device-resident data inside the compiled step (pipeline.DeviceData), else it comes
from the tf.data iterator.

Why the all-reduce is not inside XLA: TF 2.21 cannot compile a cross-device collective into
a nested XLA function (BUILD_NOTES.md); with one replica there is none, and the whole step
is one XLA program.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from cifar_dist import augment as augment_lib
from cifar_dist import model as model_lib
from cifar_dist import pipeline

# The per-call stats vector. The first REDUCED entries come from each replica's step and are
# summed over replicas (they travel in the gradients' all-reduce); the first SUMMED entries
# are summed over the steps of a call; the rest are the values after the call's last step
# (learning_rate: the rate the next step will use).
STATS = ("loss_sum", "correct", "count", "nonfinite", "stop", "skipped",
         "learning_rate", "skipped_total")
REDUCED, SUMMED = 5, 6
LOSS_SUM, CORRECT, COUNT, NONFINITE, STOP, SKIPPED, LEARNING_RATE, SKIPPED_TOTAL = range(len(STATS))


class TrainSteps:
    """Builds the compiled functions of one run (model, update and counters already exist)."""

    def __init__(self, cfg, strategy, model, update, *, num_classes: int, steps_per_epoch: int,
                 global_step, skipped_steps, window, device_data=None):
        self.cfg, self.strategy, self.model, self.update = cfg, strategy, model, update
        self.num_classes, self.steps_per_epoch = num_classes, steps_per_epoch
        self.global_step, self.skipped_steps, self.window = global_step, skipped_steps, window
        self.device_data = device_data
        # BatchNorm's moving statistics are plain per-replica variables in Keras 3 (no
        # aggregation): each replica updates its own copy from its own batch. With many
        # replicas every step replaces them by their mean over all replicas and workers, in
        # the gradients' all-reduce, so they never drift apart: a checkpoint, an evaluation or
        # an export taken after any step reads the same values on every replica and changes
        # nothing that training computes next (a stop by signal mid-epoch resumes bitwise).
        self.moving_statistics = model_lib.batch_norm_statistics(model)
        self._statistics_size = sum(int(np.prod(v.shape)) for v in self.moving_statistics)
        self.replicas = strategy.num_replicas_in_sync
        self.global_batch = cfg.batch_size
        self.augmentation = augment_lib.Policy.from_config(cfg)
        self.loss_fn = keras.losses.CategoricalCrossentropy(
            label_smoothing=cfg.label_smoothing, reduction=None)
        jit = cfg.jit_compile
        if self.replicas == 1:
            self.fused_step = tf.function(self._fused_step, jit_compile=jit)
        else:
            if cfg.sync_batch_norm:
                # Synchronised BatchNorm all-reduces inside the forward pass; TF 2.21 cannot put
                # a collective inside a nested (XLA) function, so the gradients run uncompiled.
                logging.warning("--sync_batch_norm with %d replicas: the gradients run without "
                                "XLA", self.replicas)
                self.grads_step = self._grads_step
            else:
                self.grads_step = tf.function(self._grads_step, jit_compile=jit)
            self.apply_step = tf.function(self._apply_packed, jit_compile=jit)
        self.loop_on_device = tf.function(self._loop_on_device)
        self.loop_on_iterator = tf.function(self._loop_on_iterator)

    # ------------------------------------------------------------------ one replica's step

    def _batch(self, inputs, replica):
        """(images, labels, example ids) of this replica's batch."""
        if self.device_data is None:
            return inputs
        images, labels, order = inputs
        step_in_epoch = self.global_step % self.steps_per_epoch
        ids = pipeline.replica_batch_ids(order, step_in_epoch, replica, self.global_batch,
                                         self.replicas)
        return tf.gather(images, ids), tf.gather(labels, ids), ids

    def _forward_backward(self, inputs, replica, stop):
        """The gradients as one flat vector (Update.flatten; loss-scaled in float16) and
        [loss_sum, correct, count, nonfinite, stop]."""
        images_u8, labels, ids = self._batch(inputs, replica)
        # Keyed by (run seed, epoch, example id): the same example is augmented the same
        # whatever the number of replicas and workers.
        seed = tf.stack([tf.constant(self.cfg.seed, tf.int64),
                         self.global_step // self.steps_per_epoch])
        x = (augment_lib.augment_batch(images_u8, seed, self.augmentation, ids)
             if self.cfg.augment else augment_lib.to_unit_float(images_u8))
        with tf.GradientTape() as tape:
            probs = self.model(x, training=True)
            per_example = self.loss_fn(tf.one_hot(labels, self.num_classes), probs)
            loss_sum = tf.reduce_sum(per_example)
            # Sum / GLOBAL batch: summing gradients over replicas gives the global mean.
            scaled = self.update.scale_loss(loss_sum / self.global_batch)
        grad = self.update.flatten(tape.gradient(scaled, self.model.trainable_variables))
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(probs, -1, output_type=tf.int32), labels), tf.float32))
        finite = tf.logical_and(tf.math.is_finite(loss_sum),
                                tf.reduce_all(tf.math.is_finite(grad)))
        flags = tf.stack([loss_sum, correct, tf.cast(tf.shape(labels)[0], tf.float32),
                          1.0 - tf.cast(finite, tf.float32), tf.cast(stop, tf.float32)])
        return grad, flags

    def _apply_step(self, grad, totals):
        """The update from summed gradients and summed flags, then the counters and stats."""
        finite = tf.equal(totals[NONFINITE], 0.0)
        loss_scaling = self.update.loss_scaling
        self.update.apply(grad, self.model.trainable_variables,
                          finite if loss_scaling else None)
        # Reported: the rate the next step will use, as history.csv's (0 after onecycle's end).
        lr = self.update.learning_rate()
        skipped = (1.0 - tf.cast(finite, tf.float32)) if loss_scaling else tf.constant(0.0)
        self.global_step.assign_add(1)
        self.skipped_steps.assign_add(tf.cast(skipped, tf.int64))
        summed = self.window[:SUMMED] + tf.concat([totals, [skipped]], 0)
        self.window.assign(tf.concat(
            [summed, [lr, tf.cast(self.skipped_steps, tf.float32)]], 0))

    def _grads_step(self, inputs, replica, stop):
        """The flat gradients, this replica's moving statistics / replicas and the flags in one
        vector: one all-reduce, and no packing ops (reshape, concat, split per tensor) left
        outside XLA."""
        grad, flags = self._forward_backward(inputs, replica, stop)
        statistics = [tf.reshape(tf.cast(v, grad.dtype), [-1]) / self.replicas
                      for v in self.moving_statistics]
        return tf.concat([grad, *statistics, flags], 0)

    def _apply_packed(self, packed):
        grad_size = int(packed.shape[0]) - self._statistics_size - REDUCED
        grad, statistics, totals = tf.split(packed, [grad_size, self._statistics_size, REDUCED])
        self._apply_step(grad, totals)
        start = 0
        for var in self.moving_statistics:  # summed over replicas: their mean
            size = int(np.prod(var.shape))
            var.assign(tf.cast(tf.reshape(statistics[start:start + size], var.shape), var.dtype))
            start += size

    def _fused_step(self, inputs, replica, stop):
        grad, flags = self._forward_backward(inputs, replica, stop)
        self._apply_step(grad, flags)

    def _replica_step(self, inputs, stop):
        # A plain Python function: strategy.run traces the XLA functions once per replica,
        # so each replica reads and writes its own copies of the variables.
        ctx = tf.distribute.get_replica_context()
        replica = ctx.replica_id_in_sync_group
        if self.replicas == 1:
            self.fused_step(inputs, replica, stop)
            return
        packed = self.grads_step(inputs, replica, stop)
        self.apply_step(ctx.all_reduce(tf.distribute.ReduceOp.SUM, packed))

    # ------------------------------------------------------------------ many steps per call

    def _loop_on_device(self, images, labels, order, num_steps, stop):
        self.window.assign(tf.zeros([len(STATS)]))
        for _ in tf.range(num_steps):
            self.strategy.run(self._replica_step, args=((images, labels, order), stop))
        return self.window.read_value()

    def _loop_on_iterator(self, iterator, num_steps, stop):
        self.window.assign(tf.zeros([len(STATS)]))
        for _ in tf.range(num_steps):
            batch = next(iterator)  # images, labels, example ids
            self.strategy.run(self._replica_step, args=(batch, stop))
        return self.window.read_value()

    def run(self, inputs, num_steps: int, stop: bool):
        """`num_steps` steps in one call; returns the call's stats vector (a device tensor)."""
        n, flag = tf.constant(num_steps, tf.int32), tf.constant(int(stop), tf.int32)
        if self.device_data is not None:
            return self.loop_on_device(*inputs, n, flag)
        return self.loop_on_iterator(inputs, n, flag)


class EvalSteps:
    """Evaluation on every replica (whose BatchNorm statistics agree after every step) with,
    under --ema_decay, the averaged weights swapped in."""

    def __init__(self, cfg, strategy, model, update, num_classes: int):
        self.strategy, self.model, self.num_classes = strategy, model, num_classes
        self.update, self.batch_size = update, cfg.batch_size
        self.compiled_eval = tf.function(self._eval, jit_compile=cfg.jit_compile)
        self.eval_step = tf.function(self._eval_step)
        self.weights_finite = tf.function(self._weights_finite)
        if update.averages:
            # Per replica (each swaps its own copies), nested like the update's functions.
            swap = tf.function(lambda: update.swap_averages(model.trainable_variables))
            self._swap_averages = tf.function(lambda: strategy.run(swap))

    def evaluate(self, split) -> dict:
        """Loss and accuracy of the current weights on a split, computed on all replicas."""
        holder = {}

        def make(pid, npipe):
            ds, holder["steps"] = pipeline.eval_dataset(
                split.images, split.labels, global_batch=self.batch_size,
                num_replicas=self.strategy.num_replicas_in_sync, pipeline_id=pid,
                num_pipelines=npipe)
            return ds

        iterator = iter(pipeline.distribute(self.strategy, make))
        total = np.zeros(3)
        for _ in range(holder["steps"]):
            total += self.eval_step(iterator).numpy()
        return {"loss": total[0] / total[2], "accuracy": total[1] / total[2],
                "examples": int(total[2])}

    @contextlib.contextmanager
    def averaged_weights(self):
        """With --ema_decay the model holds the averaged weights inside the block (what
        evaluation and export use), its trained weights again after it; else a no-op.
        Checkpoints are never written inside: they keep both, each in its own place."""
        if not self.update.averages:
            yield
            return
        self._swap_averages()
        try:
            yield
        finally:
            self._swap_averages()

    def _eval(self, images_u8, labels, weights):
        probs = self.model(augment_lib.to_unit_float(images_u8), training=False)
        per_example = keras.losses.categorical_crossentropy(
            tf.one_hot(labels, self.num_classes), probs)
        correct = tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), labels),
                          tf.float32)
        return tf.stack([tf.reduce_sum(per_example * weights),
                         tf.reduce_sum(correct * weights), tf.reduce_sum(weights)])

    def _eval_step(self, iterator):
        images, labels, weights = next(iterator)
        # A plain Python wrapper: strategy.run must trace the XLA function once per replica.
        per_replica = self.strategy.run(lambda *batch: self.compiled_eval(*batch),
                                        args=(images, labels, weights))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def _weights_finite(self):
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v))
                              for v in self.model.trainable_variables])
