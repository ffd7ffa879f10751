"""Methods (2), (2x) and (3): the same network trained the Keras way, with model.fit.

(2) augments in a tf.data map with Keras' preprocessing layers, (2x) is (2) with
jit_compile=True, (3) is the seed's way: a keras.utils.PyDataset that augments each image
on the host with scipy (host_augment.py). An epoch is one window of steps.
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np
import tensorflow as tf

from cifar_dist.bench import timing, workload
from cifar_dist.bench.host_augment import host_augment_image


def keras_model_and_optimizer(cfg, num_classes):
    """The same network and optimizer type/settings as cifar_dist; a small constant learning
    rate (speed does not depend on it; it only keeps the short run finite)."""
    from cifar_dist.model import build_model  # noqa: PLC0415

    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg.model, num_classes, cfg.dtype_policy)
    opt = keras.optimizers.SGD(0.01, momentum=cfg.momentum,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay or None)
    opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    # Keras wraps the optimizer in a LossScaleOptimizer itself under mixed_float16.
    return model, opt


class EpochTimer(keras.callbacks.Callback):
    """Seconds, loss and CPU use of every epoch (an epoch = one window of steps), and the
    adjacent matmul just before the first timed epoch."""

    def __init__(self, warmup_windows: int, adjacent: timing.AdjacentMatmul):
        super().__init__()
        self.warmup_windows, self.adjacent = warmup_windows, adjacent
        self.seconds, self.losses, self.usage = [], [], []
        self.matmul_before = None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.warmup_windows:  # the roofline just before the timed epochs
            self.matmul_before = self.adjacent.gflops()
        self._t0, self._meter = time.perf_counter(), timing.Meter()

    def on_epoch_end(self, epoch, logs=None):
        self.losses.append(float((logs or {}).get("loss", float("nan"))))  # syncs
        self.seconds.append(time.perf_counter() - self._t0)
        self.usage.append(self._meter.usage())

    def windows(self) -> timing.Windows:
        """The timed epochs as windows (the warm-up epochs' seconds summed)."""
        w = self.warmup_windows
        secs = tuple(self.seconds[w:])
        return timing.Windows(secs, sum(self.seconds[:w]),
                              timing.combined_load(self.usage[w:], sum(secs)))


def fit_and_time(settings, model, optimizer, data, cfg, jit_compile):
    model.compile(optimizer=optimizer, jit_compile=jit_compile,
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing))
    adjacent = timing.AdjacentMatmul(settings.matmul_size)
    timer = EpochTimer(settings.warmup_windows, adjacent)
    model.fit(data, epochs=settings.warmup_windows + settings.windows,
              steps_per_epoch=settings.steps_per_window, verbose=0, callbacks=[timer])
    matmul_after = adjacent.gflops()
    out = timer.windows().summary(settings.steps_per_window * cfg.batch_size,
                                  settings.steps_per_window)
    out.update(workload.model_counts(model))
    out["adjacent_matmul_gflops"] = [timer.matmul_before, matmul_after]
    out["jit_compile"] = bool(model.jit_compile)
    out["last_window_loss"] = timer.losses[-1]
    out["finite"] = bool(math.isfinite(timer.losses[-1]))
    return out


def keras_augmentation_layers():
    """The seed's augmentation as Keras 3 preprocessing layers (rotation factor is a
    fraction of a full turn: 15/360 -> +/-15 degrees)."""
    return keras.Sequential([
        keras.layers.RandomRotation(15 / 360, fill_mode="nearest"),
        keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest"),
        keras.layers.RandomFlip("horizontal"),
    ], name="augmentation")


def run_keras_fit(settings, jit_compile="auto") -> dict:
    cfg = workload.make_config(settings)
    bundle = workload.load_bundle(cfg)
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
    out = fit_and_time(settings, model, opt, ds, cfg, jit_compile)
    out["shuffle_buffer"] = min(n, 10000)
    return out


class HostAugmented(keras.utils.PyDataset):
    """datagen.flow(x, y, batch_size): shuffled batches, each image augmented in Python."""

    def __init__(self, images, labels, num_classes, batch, seed):
        super().__init__()  # workers=1, no multiprocessing: the old fit defaults
        self.images, self.labels, self.num_classes, self.batch = images, labels, num_classes, batch
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(labels))

    def __len__(self):
        return len(self.labels) // self.batch

    def __getitem__(self, i):
        ids = self.order[i * self.batch:(i + 1) * self.batch]
        x = np.stack([host_augment_image(self.images[j].astype(np.float32) / 255.0, self.rng)
                      for j in ids]).astype(np.float32)
        return x, np.eye(self.num_classes, dtype=np.float32)[self.labels[ids]]

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.labels))


def run_keras_fit_host(settings) -> dict:
    cfg = workload.make_config(settings)
    bundle = workload.load_bundle(cfg)
    model, opt = keras_model_and_optimizer(cfg, bundle.num_classes)
    seq = HostAugmented(bundle.train.images, bundle.train.labels, bundle.num_classes,
                        cfg.batch_size, cfg.seed)
    t0 = time.perf_counter()
    for i in range(3):
        seq[i]
    host_seconds_per_batch = (time.perf_counter() - t0) / 3
    out = fit_and_time(settings, model, opt, seq, cfg, "auto")
    out["host_augment_seconds_per_batch"] = host_seconds_per_batch
    return out
