"""tools/jax_tuning_proxy.py: its schedule, sampling and split are cifar_dist's.

The proxy trains on Keras' JAX backend on a GPU machine without TensorFlow; these checks
run its backend-agnostic pieces here, under TensorFlow, against the modules they copy.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import tensorflow as tf

from cifar_dist import augment, data, optimizer
from conftest import DATA_DIR, REPO, requires_data, run_script

spec = importlib.util.spec_from_file_location("jax_tuning_proxy",
                                              REPO / "tools" / "jax_tuning_proxy.py")
proxy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(proxy)


@pytest.mark.parametrize("kind, warmup", [("onecycle", 262), ("cosine", 262), ("onecycle", 0)])
def test_schedule_matches_cifar_dist(kind, warmup):
    ours = optimizer.LearningRateSchedule(0.2, 1750, warmup, kind)
    theirs = proxy.make_schedule(0.2, 1750, warmup, kind)
    for step in (0, 1, 100, 261, 262, 263, 900, 1749, 1750):
        np.testing.assert_allclose(float(theirs(step)), float(ours(step)), rtol=1e-6,
                                   err_msg=f"step {step}")


def test_affine_sample_matches_cifar_dist():
    rng = np.random.default_rng(0)
    images = rng.random((16, 32, 32, 3)).astype(np.float32)
    params = [rng.uniform(-0.26, 0.26, 16), rng.uniform(-3.2, 3.2, 16),
              rng.uniform(-3.2, 3.2, 16), (rng.random(16) < 0.5).astype(np.float64)]
    params = [tf.constant(p, tf.float32) for p in params]
    ours = augment.affine_sample(tf.constant(images), *params).numpy()
    theirs = np.asarray(proxy.affine_sample(tf.constant(images), *params))
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_runs_parse_with_the_seed_recipe_as_default():
    assert proxy.parse_run("") == proxy.DEFAULTS
    run = proxy.parse_run("optimizer=adamw, learning_rate=0.006,weight_decay=0.2,seed=3")
    assert (run["optimizer"], run["learning_rate"], run["weight_decay"], run["seed"]) == \
        ("adamw", 0.006, 0.2, 3)
    assert run["batch_size"] == 256 and isinstance(run["seed"], int)
    with pytest.raises(ValueError, match="unknown key 'lr'"):
        proxy.parse_run("lr=0.1")
    with pytest.raises(ValueError, match="seed='one' .* is not a int"):
        proxy.parse_run("seed=one")


@pytest.mark.parametrize("args, message", [
    (["--run=lr=0.1", "--data=x.npz"], "unknown key 'lr'"),
    (["--run=seed=0"], "--data is required"),
    (["--run=seed=0", "--data=/nonexistent/split.npz"], "No such file"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, args, message):
    out = tmp_path / "results.jsonl"
    result = run_script(REPO / "tools" / "jax_tuning_proxy.py", *args, f"--out={out}")
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("jax_tuning_proxy: ")]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


@requires_data
def test_exported_split_is_the_validation_split_of_cifar_dist(tmp_path):
    path = tmp_path / "split.npz"
    proxy.export_split(str(path), str(DATA_DIR))
    bundle = data.hold_out_validation(
        data.load_local_cifar10(data.find_local_cifar10(str(DATA_DIR))), 5000)
    with np.load(path) as npz:
        assert npz["train_x"].shape == (45000, 32, 32, 3)
        np.testing.assert_array_equal(npz["val_x"], bundle.validation.images)
        np.testing.assert_array_equal(npz["val_y"], bundle.validation.labels)
        np.testing.assert_array_equal(npz["train_y"], bundle.train.labels)


def test_summary_pools_seeds_and_ranks_by_mean_validation():
    base = dict(proxy.DEFAULTS, val_tta=0.0)
    rows = [dict(base, seed=0, val=84.0), dict(base, seed=1, val=86.0),
            dict(base, seed=0, weight_decay=0.2, optimizer="adamw", momentum=0.95, val=87.0)]
    table = proxy.summarize(rows)
    assert table[2] == "| optimizer=adamw, weight_decay=0.2 | 1 | 87.00% (-) | 0.00% |"
    assert table[3] == "| none | 2 | 85.00% (1.41) | 0.00% |"
    assert len(table) == 4
