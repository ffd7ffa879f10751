"""Host arrays -> tf.data: uint8 batches, one stream per worker, every example once per epoch.

The order of a whole run is a pure function of (seed, epoch): epoch e visits the
training set in the order of a stateless permutation (tf.random.experimental.index_shuffle).
Global step s of that epoch takes positions [s*B, (s+1)*B) of it (B = global batch);
global replica r of that step takes the r-th slice of B / replicas of those. Each worker
builds only its own replicas' slices. So:
  * every example is seen exactly once per epoch across all replicas and workers, except
    the N mod B left over at the end of the permutation (dropped: every step has full,
    equal batches on every replica);
  * 1 replica with batch B and R replicas with B / R see the same examples in each step;
  * resuming at step s reproduces the data order exactly, with no state to save.

Batches are gathered from the in-memory arrays with one tf.gather per batch (no per-image
Python), stay uint8 to the device (4x fewer bytes than float32) and are prefetched.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from cifar_dist.errors import ConfigError

# --data_on_device=auto keeps the training split on each device up to this size (CIFAR-10's
# 50,000 uint8 images are 154 MB).
DEVICE_DATA_LIMIT_BYTES = 1 << 30


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    steps = num_examples // global_batch
    if steps == 0:
        raise ConfigError(f"--batch_size={global_batch} is larger than the {num_examples} "
                          "training images: lower --batch_size")
    return steps


def per_replica_batch(global_batch: int, num_replicas: int) -> int:
    """The batch of one replica; ConfigError unless --batch_size divides among the replicas."""
    if global_batch % num_replicas:
        raise ConfigError(f"--batch_size={global_batch} does not divide among {num_replicas} "
                          f"replicas: use a multiple of {num_replicas}")
    return global_batch // num_replicas


def epoch_order(seed: int, epoch, num_examples: int, length: int) -> tf.Tensor:
    """The first `length` positions of epoch `epoch`'s permutation of range(num_examples)."""
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.index_shuffle(
        tf.range(length, dtype=tf.int64), seed=key, max_index=num_examples - 1)


def replica_batch_ids(order: tf.Tensor, step_in_epoch, replica, global_batch: int,
                      num_replicas: int) -> tf.Tensor:
    """The example ids global replica `replica` trains on at `step_in_epoch`: the slice of the
    epoch's order that train_dataset hands it.

    A gather, not tf.slice: under XLA a slice's start must be a compile-time constant, so a
    slice would recompile the step for every new start (80 ms a step on this CPU).
    """
    per_replica = global_batch // num_replicas
    start = (tf.cast(step_in_epoch, tf.int32) * global_batch
             + tf.cast(replica, tf.int32) * per_replica)
    return tf.gather(order, start + tf.range(per_replica))


def fits_on_device(images: np.ndarray, labels: np.ndarray) -> bool:
    """--data_on_device=auto: the training split is resident on each device when it is small."""
    return images.nbytes + labels.nbytes <= DEVICE_DATA_LIMIT_BYTES


class DeviceData:
    """The training split resident on every replica's device, and each epoch's order there.

    Replaces train_dataset when the split fits: the compiled step gathers its own batch
    (replica_batch_ids + tf.gather), in exactly the order train_dataset would deliver, so
    nothing crosses from the host per step.
    """

    def __init__(self, strategy, images: np.ndarray, labels: np.ndarray, *, global_batch: int,
                 seed: int):
        self.strategy, self.seed, self.global_batch = strategy, seed, global_batch
        self.num_examples = int(labels.shape[0])
        self.steps = steps_per_epoch(self.num_examples, global_batch)
        # One copy per local replica, placed on its device by the strategy (once per run).
        self.images = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(images))
        self.labels = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(labels, tf.int32))
        self._epoch, self._order = None, None

    def order(self, epoch: int):
        """Epoch `epoch`'s order on every replica's device (computed once per epoch)."""
        if epoch != self._epoch:
            order = tf.cast(epoch_order(self.seed, epoch, self.num_examples,
                                        self.steps * self.global_batch), tf.int32)
            self._order = self.strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.identity(order))
            self._epoch = epoch
        return self._order


def train_dataset(images: np.ndarray, labels: np.ndarray, *, global_batch: int, seed: int,
                  start_step: int, total_steps: int, num_replicas: int,
                  pipeline_id: int = 0, num_pipelines: int = 1) -> tf.data.Dataset:
    """Per-replica batches (images uint8, labels int32, example ids int64) for one worker.

    Elements come in the order the distributed iterator hands them to this worker's
    replicas: step by step, local replica 0, 1, ... within each step.
    """
    per_replica = per_replica_batch(global_batch, num_replicas)
    if num_replicas % num_pipelines:
        raise ConfigError(f"{num_replicas} replicas do not divide among {num_pipelines} workers")
    n = int(labels.shape[0])
    local = num_replicas // num_pipelines
    steps = steps_per_epoch(n, global_batch)
    start_epoch, offset = divmod(start_step, steps)
    end_epoch = math.ceil(total_steps / steps)
    images_t = tf.constant(images)
    labels_t = tf.constant(labels, tf.int32)

    def epoch_blocks(epoch):
        order = epoch_order(seed, epoch, n, steps * global_batch)
        order = tf.reshape(order, [steps, num_replicas, per_replica])
        mine = order[:, pipeline_id * local:(pipeline_id + 1) * local]
        first = tf.where(epoch == start_epoch, offset, 0)
        return tf.data.Dataset.from_tensor_slices(tf.reshape(mine[first:], [-1, per_replica]))

    def gather(ids):
        return tf.gather(images_t, ids), tf.gather(labels_t, ids), ids

    ds = tf.data.Dataset.range(start_epoch, max(end_epoch, start_epoch + 1))
    ds = ds.flat_map(epoch_blocks).map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def eval_dataset(images: np.ndarray, labels: np.ndarray, *, global_batch: int, num_replicas: int,
                 pipeline_id: int = 0, num_pipelines: int = 1) -> tuple[tf.data.Dataset, int]:
    """Per-replica batches (images, labels, weights) covering every example once, in order.

    The last global batch is padded with weight-0 copies so that every replica runs the
    same number of equal-shape steps. Returns the dataset and its number of steps.
    """
    n = int(labels.shape[0])
    per_replica = global_batch // num_replicas
    local = num_replicas // num_pipelines
    steps = max(1, math.ceil(n / global_batch))
    positions = np.arange(steps * global_batch).reshape(steps, num_replicas, per_replica)
    mine = positions[:, pipeline_id * local:(pipeline_id + 1) * local].reshape(-1, per_replica)
    weights = (mine < n).astype(np.float32)
    ids = np.minimum(mine, n - 1)
    images_t = tf.constant(images)
    labels_t = tf.constant(labels, tf.int32)

    def gather(batch_ids, batch_weights):
        return tf.gather(images_t, batch_ids), tf.gather(labels_t, batch_ids), batch_weights

    ds = tf.data.Dataset.from_tensor_slices((ids, weights)).map(gather)
    return _with_options(ds.prefetch(tf.data.AUTOTUNE)), steps


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    # We shard by construction (each worker builds only its own slices); stop tf.distribute
    # from sharding again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def distribute(strategy, make):
    """A tf.data input per worker: make(pipeline_id, num_pipelines) -> its dataset."""
    def fn(ctx):
        return make(ctx.input_pipeline_id, ctx.num_input_pipelines)
    return strategy.distribute_datasets_from_function(fn)
