"""--ema_decay: the moving average of the weights, updated in the compiled update, saved in
checkpoints (bitwise resume holds), and what evaluation and export use."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from cifar_dist.optimizer import EMA_WARMUP, Update, LearningRateSchedule
from conftest import TINY_SYNTHETIC, error_lines, run_module
from test_train import checkpoint_tensors


def make_update(variables, decay, loss_scale=None):
    schedule = LearningRateSchedule(0.1, 100, 0, "constant")
    return Update("sgd", schedule, variables, momentum=0.0, loss_scale=loss_scale,
                  ema_decay=decay)


def test_the_average_follows_its_formula_with_the_warm_up():
    rng = np.random.default_rng(0)
    var = tf.Variable(rng.normal(size=[3, 2]).astype(np.float32))
    update = make_update([var], decay=0.9)
    average = var.numpy().copy()
    for t in range(1, 21):
        grad = rng.normal(size=[3, 2]).astype(np.float32)
        update.apply(update.flatten([tf.constant(grad)]), [var])
        decay = min(0.9, (1 + t) / (EMA_WARMUP + t))
        average = average + (var.numpy() - average) * (1 - decay)
        np.testing.assert_allclose(update.averages[0].numpy(), average, rtol=1e-6, atol=1e-7)
    assert not np.allclose(update.averages[0].numpy(), var.numpy())  # it does lag behind


def test_a_skipped_float16_step_leaves_the_average_and_swapping_twice_is_exact():
    var = tf.Variable(tf.ones([4]))
    update = make_update([var], decay=0.5, loss_scale=8.0)
    update.apply(tf.fill([4], 8.0), [var], finite=tf.constant(True))
    before = update.averages[0].numpy().copy()
    update.apply(tf.fill([4], np.inf), [var], finite=tf.constant(False))
    np.testing.assert_array_equal(update.averages[0].numpy(), before)
    weights = var.numpy().copy()
    update.swap_averages([var])
    np.testing.assert_array_equal(var.numpy(), before)
    update.swap_averages([var])
    np.testing.assert_array_equal(var.numpy(), weights)
    np.testing.assert_array_equal(update.averages[0].numpy(), before)


def test_bad_ema_decay_is_one_line_and_exit_2(tmp_path):
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=2",
                        "--ema_decay=1.0", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "cifar_dist: error: --ema_decay must be in [0, 1) (0 = off), got 1.0"]
    assert not (tmp_path / "run").exists()


def kernel_names(tensors):
    return sorted(k for k in tensors if k.startswith("model/") and "kernel" in k)


@pytest.mark.slow
def test_ema_run_exports_the_averages_and_resumes_bitwise(tmp_path):
    run = tmp_path / "run"
    command = [*TINY_SYNTHETIC, "--train_steps=8", "--checkpoint_steps=4", "--log_steps=4",
               "--ema_decay=0.9", "--export=true", "--keep_checkpoints=5",
               f"--model_dir={run}"]
    result = run_module("cifar_dist.main", *command)
    assert result.returncode == 0, result.stderr[-3000:]
    _, final = checkpoint_tensors(run)
    averages = sorted(k for k in final if k.startswith("optimizer/averages/"))
    assert averages, sorted(final)[:20]

    # The exported model holds the averaged weights (averages/<i> is trainable variable i),
    # not the trained ones.
    exported = keras.saving.load_model(run / "export" / "model.keras", safe_mode=True)
    assert len(averages) == len(exported.trainable_weights)
    trained = [final[k] for k in kernel_names(final)]
    for i, weight in enumerate(exported.trainable_weights):
        np.testing.assert_array_equal(
            weight.numpy(), final[f"optimizer/averages/{i}/.ATTRIBUTES/VARIABLE_VALUE"])
        if "kernel" in weight.path:
            assert not any(np.array_equal(weight.numpy(), t) for t in trained), weight.path

    # `cifar_dist.export` from the checkpoint makes the same model as the run did.
    again = run_module("cifar_dist.export", f"--model_dir={run}",
                       f"--export_dir={tmp_path / 'again'}")
    assert again.returncode == 0, again.stderr[-3000:]
    reexported = keras.saving.load_model(tmp_path / "again" / "model.keras", safe_mode=True)
    for a, b in zip(exported.weights, reexported.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    # --noaveraged_weights: the trained weights instead, for comparing the two.
    raw = run_module("cifar_dist.export", f"--model_dir={run}", "--noaveraged_weights",
                     f"--export_dir={tmp_path / 'raw'}")
    assert raw.returncode == 0, raw.stderr[-3000:]
    raw_model = keras.saving.load_model(tmp_path / "raw" / "model.keras", safe_mode=True)
    raw_kernels = [w.numpy() for w in raw_model.trainable_weights if "kernel" in w.path]
    assert len(raw_kernels) == len(trained)
    for weight in raw_kernels:
        assert any(np.array_equal(weight, t) for t in trained)

    # Resume from the step-4 checkpoint: the same weights and averages, bitwise.
    ckpt_dir = run / "checkpoints"
    for f in ckpt_dir.glob("ckpt-8*"):
        f.unlink()
    tf.compat.v1.train.update_checkpoint_state(str(ckpt_dir), str(ckpt_dir / "ckpt-4"))
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "export")
    resumed = run_module("cifar_dist.main", *command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stderr
    _, again_final = checkpoint_tensors(run)
    different = [k for k in final if not np.array_equal(final[k], again_final[k])]
    assert not different, different[:5]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["ema_decay"] == 0.9
