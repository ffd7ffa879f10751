"""The training loop's shape: data on the device in exactly tf.data's order, calls of many
steps ending at every event, the same weights whatever the call length or data path, and
the new flags' bad values refused."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf

from cifar_dist import pipeline
from cifar_dist.train import call_end, resolve_data_on_device, resolve_steps_per_loop
from cifar_dist.errors import ConfigError
from conftest import TINY_SYNTHETIC, error_lines, run_module
from test_train import checkpoint_tensors


@pytest.mark.parametrize("replicas, workers", [(1, 1), (2, 1), (4, 2), (2, 2)])
def test_device_batches_are_the_tf_data_order_element_for_element(replicas, workers):
    """replica_batch_ids (what the compiled step gathers) against train_dataset (what the
    tf.data path delivers), for every step of two epochs, every replica, every worker,
    and a resume in the middle of the first epoch."""
    n, global_batch, seed = 100, 8, 7
    labels = np.arange(n, dtype=np.int32)
    images = np.zeros((n, 32, 32, 3), np.uint8)
    steps = pipeline.steps_per_epoch(n, global_batch)
    local = replicas // workers
    for start_step in (0, 5):
        per_worker = []
        for worker in range(workers):
            ds = pipeline.train_dataset(images, labels, global_batch=global_batch, seed=seed,
                                        start_step=start_step, total_steps=2 * steps,
                                        num_replicas=replicas, pipeline_id=worker,
                                        num_pipelines=workers)
            per_worker.append([ids.numpy() for _, _, ids in ds])
        for step in range(start_step, 2 * steps):
            epoch, in_epoch = divmod(step, steps)
            order = tf.cast(pipeline.epoch_order(seed, epoch, n, steps * global_batch), tf.int32)
            for worker, r in itertools.product(range(workers), range(local)):
                expected = per_worker[worker][(step - start_step) * local + r]
                got = pipeline.replica_batch_ids(order, in_epoch, worker * local + r,
                                                 global_batch, replicas)
                np.testing.assert_array_equal(got.numpy(), expected)
    # The check can fail: the next replica's slice is another one.
    order = tf.cast(pipeline.epoch_order(seed, 0, n, steps * global_batch), tf.int32)
    if replicas > 1:
        assert not np.array_equal(pipeline.replica_batch_ids(order, 0, 1, global_batch, replicas),
                                  pipeline.replica_batch_ids(order, 0, 0, global_batch, replicas))


def test_calls_end_at_every_event_and_never_exceed_steps_per_loop():
    kw = dict(total_steps=450, steps_per_epoch=195, log_steps=50, checkpoint_steps=0)
    ends, step = [], 0
    while step < 450:
        step = call_end(step, steps_per_loop=100, **kw)
        ends.append(step)
    assert ends == [50, 100, 150, 195, 200, 250, 300, 350, 390, 400, 450]
    ends, step = [], 0
    while step < 40:
        step = call_end(step, steps_per_loop=7, total_steps=40, steps_per_epoch=16,
                        log_steps=100, checkpoint_steps=10)
        ends.append(step)
    assert ends == [7, 10, 16, 20, 27, 30, 32, 39, 40]
    # --profile_steps=23,35: calls also end after step 22 and at step 35
    ends, step = [], 0
    while step < 40:
        step = call_end(step, steps_per_loop=100, total_steps=40, steps_per_epoch=40,
                        log_steps=100, profile=(23, 35))
        ends.append(step)
    assert ends == [22, 35, 40]


def test_steps_per_loop_auto_depends_on_the_device_and_the_work_per_step():
    from cifar_dist.model import build_model, train_flops_per_image

    cpu, gpu = ["/job:localhost/replica:0/task:0/device:CPU:0"], ["/job:worker/task:0/device:GPU:0"]
    seed_step = train_flops_per_image(build_model("seed")) * 256
    tiny_step = train_flops_per_image(build_model("tiny")) * 2
    # CPUs: the seed network at batch 256 keeps its 10 steps (~25 s here) per call; a step
    # 10x bigger gets 1, the tiny network at batch 2 the cap of 100.
    assert resolve_steps_per_loop("auto", cpu, seed_step) == 10
    assert resolve_steps_per_loop("auto", cpu, 10 * seed_step) == 1
    assert resolve_steps_per_loop("auto", cpu, tiny_step) == 100
    assert resolve_steps_per_loop("auto", gpu, seed_step) == 100
    assert resolve_steps_per_loop("37", ["/device:GPU:0"], seed_step) == 37


def test_data_on_device_true_refuses_a_split_over_the_limit():
    from cifar_dist.data import Split

    big = Split(np.zeros((pipeline.DEVICE_DATA_LIMIT_BYTES // 3072 + 1, 32, 32, 3), np.uint8),
                np.zeros(pipeline.DEVICE_DATA_LIMIT_BYTES // 3072 + 1, np.int32))
    with pytest.raises(ConfigError, match="--data_on_device=true"):
        resolve_data_on_device("true", big)
    assert resolve_data_on_device("auto", big) is False
    small = Split(big.images[:10], big.labels[:10])
    assert resolve_data_on_device("auto", small) is True
    assert resolve_data_on_device("false", small) is False


@pytest.mark.parametrize("flag, message", [
    ("--steps_per_loop=0", "--steps_per_loop='0' must be 'auto' or a positive number"),
    ("--steps_per_loop=-5", "--steps_per_loop='-5' must be 'auto' or a positive number"),
    ("--steps_per_loop=many", "must be 'auto' or a positive number"),
    ("--data_on_device=yes", "--data_on_device='yes' is not one of auto, true, false"),
    ("--profile_steps=5,3", "--profile_steps='5,3' must be A,B"),
    ("--profile_steps=0,2", "--profile_steps='0,2' must be A,B"),
    ("--profile_steps=a", "--profile_steps='a' must be A,B"),
])
def test_bad_loop_flags_are_one_line_and_exit_2(tmp_path, flag, message):
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=2", flag,
                        f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_call_length_and_data_path_do_not_change_the_weights(tmp_path):
    """One step per call from tf.data, and up to 5 steps per call from device-resident data,
    end with bitwise-equal weights, optimizer state and counters (AdamW, augmentation on)."""
    common = [*TINY_SYNTHETIC, "--train_steps=12", "--optimizer=adamw", "--learning_rate=0.01",
              "--weight_decay=0.1", "--log_steps=100"]
    one = run_module("cifar_dist.main", *common, "--steps_per_loop=1", "--data_on_device=false",
                     f"--model_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    many = run_module("cifar_dist.main", *common, "--steps_per_loop=5", "--data_on_device=true",
                      f"--model_dir={tmp_path / 'many'}")
    assert many.returncode == 0, many.stderr[-3000:]
    assert "up to 1 per call" in one.stderr and "from tf.data" in one.stderr
    assert "up to 5 per call" in many.stderr and "on the device" in many.stderr
    _, a = checkpoint_tensors(tmp_path / "one")
    _, b = checkpoint_tensors(tmp_path / "many")
    assert a.keys() == b.keys() and any("velocity" in k for k in a)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.mark.slow
def test_profile_steps_write_a_trace_tensorboard_reads(tmp_path):
    """--profile_steps=3,4: a profiler trace (plugins/profile/<run>/*.xplane.pb, what the
    Profile tab reads) in model_dir/tensorboard, made by calls that end at steps 2 and 4."""
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=6", "--log_steps=6",
                        "--profile_steps=3,4", f"--model_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "profiling steps 3 to 4" in result.stderr and "profiler trace written" in result.stderr
    traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000, traces
