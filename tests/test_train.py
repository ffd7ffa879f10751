"""Training end to end in fresh processes: smoke, every dtype, resume after SIGKILL,
pre-emption signals, divergence."""

from __future__ import annotations

import csv
import json
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from cifar_dist.run_dir import RunDir
from conftest import REPO, TINY_SAMPLE, TINY_SYNTHETIC, env_for_subprocess, error_lines, \
    run_module


def checkpoint_tensors(model_dir):
    path = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    return path, {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
                  if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


@pytest.mark.slow
def test_smoke_config_trains_and_writes_metrics(tmp_path):
    result = run_module("cifar_dist.main", "--flagfile=configs/smoke.cfg",
                        f"--model_dir={tmp_path / 'run'}", "--enable_tensorboard=true")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "epochs", "steps", "images_per_second",
                "wall_seconds", "trainable_params", "config"):
        assert key in metrics
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_examples"] == 512
    assert metrics["epochs"] == 2 and metrics["steps"] == 32 and metrics["images_per_second"] > 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert (tmp_path / "run" / "export" / "saved_model" / "saved_model.pb").is_file()
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert "test_accuracy=" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_dtype_learns_without_nan(tmp_path, dtype):
    result = run_module("cifar_dist.main", *TINY_SAMPLE, f"--dtype={dtype}", "--train_steps=24",
                        "--learning_rate=0.05", "--log_steps=4", f"--model_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(line.split(" loss ")[1].split()[0]) for line in result.stderr.splitlines()
              if " loss " in line and "step " in line]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["dtype"] == dtype and np.isfinite(metrics["test_loss"])


@pytest.mark.slow
def test_float16_overflow_skips_steps_on_every_replica_and_counts_them(tmp_path):
    """A loss scale of 1e30 overflows float16 gradients: every step is skipped (weights
    untouched, scale halved) on both replicas alike, and the count reaches metrics.json."""
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=4",
                        "--dtype=float16", "--loss_scale=1e30", "--strategy=mirrored",
                        "--num_cpu_devices=2", "--log_steps=1", f"--model_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 4 and metrics["steps"] == 4
    assert "skipped 4" in result.stderr
    _, tensors = checkpoint_tensors(tmp_path)
    scale = [v for k, v in tensors.items() if "dynamic_scale" in k]
    assert scale and float(scale[0]) == pytest.approx(1e30 / 2 ** 4, rel=1e-5)


def start(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "cifar_dist.main", *args], cwd=REPO,
                            env=env_for_subprocess(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def wait_for_step(proc, step, timeout=300):
    """Reads the log until 'step N/' with N >= step is printed; returns the lines read."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if " step " in line and "/" in line:
            n = int(line.split(" step ")[1].split("/")[0])
            if n >= step:
                return lines
        assert time.time() < deadline, "no progress"
    raise AssertionError("process ended early:\n" + "".join(lines[-30:]))


RESUME_ARGS = TINY_SYNTHETIC + ["--train_steps=12", "--checkpoint_steps=2", "--log_steps=1",
                                "--learning_rate=0.05"]


@pytest.mark.slow
def test_sigkill_and_restart_ends_with_the_same_weights(tmp_path):
    straight = run_module("cifar_dist.main", *RESUME_ARGS, f"--model_dir={tmp_path / 'a'}")
    assert straight.returncode == 0, straight.stderr[-3000:]

    kill_at = random.Random().randint(3, 9)
    proc = start([*RESUME_ARGS, f"--model_dir={tmp_path / 'b'}"])
    wait_for_step(proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "b" / "metrics.json").exists()
    again = run_module("cifar_dist.main", *RESUME_ARGS, f"--model_dir={tmp_path / 'b'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr

    path_a, a = checkpoint_tensors(tmp_path / "a")
    path_b, b = checkpoint_tensors(tmp_path / "b")
    assert path_a.endswith("ckpt-12") and path_b.endswith("ckpt-12")
    assert a.keys() == b.keys() and len(a) > 20
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"killed at step {kill_at}; differing: {different[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_saves_a_checkpoint_and_exits_75_then_resumes(tmp_path, sig):
    proc = start([*RESUME_ARGS, "--checkpoint_steps=0", f"--model_dir={tmp_path}"])
    wait_for_step(proc, 3)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    assert "rerun the same command to resume" in out
    saved = int(tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).rsplit("-", 1)[1])
    assert 3 <= saved < 12
    if sig != signal.SIGTERM:
        return  # resuming is the same for every signal: checked once, below, for SIGTERM
    again = run_module("cifar_dist.main", *RESUME_ARGS, "--checkpoint_steps=0",
                       f"--model_dir={tmp_path}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {saved}" in again.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 12


@pytest.mark.slow
def test_a_stop_mid_epoch_on_two_replicas_resumes_bitwise_and_keeps_the_epochs_record(tmp_path):
    """The save at a stop is an extra one (no checkpoint is due there): it must not change
    what training computes next. Before BatchNorm's statistics were averaged every step, that
    save averaged the replicas' statistics and the resumed run ended up to 5e-7 away. And the
    epoch's history row covers the whole epoch, not only the steps after the resume."""
    args = [*RESUME_ARGS, "--checkpoint_steps=0", "--steps_per_loop=1", "--strategy=mirrored",
            "--num_cpu_devices=2"]
    straight = run_module("cifar_dist.main", *args, f"--model_dir={tmp_path / 'a'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    proc = start([*args, f"--model_dir={tmp_path / 'b'}"])
    wait_for_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    saved = int(tf.train.latest_checkpoint(str(tmp_path / "b" / "checkpoints")).rsplit("-", 1)[1])
    assert 3 <= saved < 8, out[-2000:]  # mid-epoch (8 steps per epoch): an extra save
    again = run_module("cifar_dist.main", *args, f"--model_dir={tmp_path / 'b'}")
    assert again.returncode == 0, again.stderr[-3000:]
    _, a = checkpoint_tensors(tmp_path / "a")
    _, b = checkpoint_tensors(tmp_path / "b")
    moving = [k for k in a if "moving" in k]
    assert moving, sorted(a)[:10]
    different = [k for k in a if k != "save_counter/.ATTRIBUTES/VARIABLE_VALUE"
                 and not np.array_equal(a[k], b[k])]
    assert not different, f"stopped at step {saved}; differing: {different[:5]}"
    rows_a, rows_b = (RunDir(str(tmp_path / r)).read_history() for r in "ab")
    assert [r["epoch"] for r in rows_b] == [r["epoch"] for r in rows_a] == [1, 2]
    for key in ("train_loss", "train_accuracy"):
        assert rows_b[0][key] == pytest.approx(rows_a[0][key], rel=1e-12), (key, saved)


@pytest.mark.slow
def test_signal_during_start_up_ends_the_run_at_once_with_exit_76(tmp_path):
    proc = start([*RESUME_ARGS, f"--model_dir={tmp_path}"])
    for line in proc.stdout:  # the strategy exists, data is loaded, no step has run yet
        if "main.py" in line and " data: " in line:
            break
    proc.send_signal(signal.SIGTERM)
    started = time.time()
    out = proc.communicate(timeout=120)[0]
    assert time.time() - started < 30, "the signal was not acted on within seconds"
    assert proc.returncode == 76, out[-3000:]
    lines = error_lines(out)
    assert len(lines) == 1 and "stopped by SIGTERM outside the training loop" in lines[0], out[-2000:]
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")) is None


def test_divergence_in_float32_stops_with_exit_4_and_keeps_last_good_checkpoint(tmp_path):
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=8",
                        "--learning_rate=1e30", "--warmup_fraction=0", "--checkpoint_steps=1",
                        "--log_steps=1", f"--model_dir={tmp_path}")
    assert result.returncode == 4, result.stderr[-3000:]
    assert "last good checkpoint" in result.stderr
    _, tensors = checkpoint_tensors(tmp_path)
    assert all(np.all(np.isfinite(t)) for t in tensors.values() if t.dtype.kind == "f")
    assert not (tmp_path / "metrics.json").exists()


def test_resume_with_another_network_is_refused(tmp_path):
    first = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=2",
                       f"--model_dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = (tmp_path / "config.json").read_text()
    second = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=2", "--model=seed",
                        f"--model_dir={tmp_path}")
    assert second.returncode == 2
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and "model: checkpoint 'tiny' vs now 'seed'" in lines[0]
    assert (tmp_path / "config.json").read_text() == before


def test_resume_on_other_training_data_is_refused_and_on_moved_data_accepted(tmp_path):
    """Compared by content, not path: the same files elsewhere resume; other files do not."""
    from test_data import make_fake_cifar  # noqa: PLC0415

    make_fake_cifar(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    make_fake_cifar(tmp_path / "b")
    (tmp_path / "b" / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        (tmp_path / "a" / "cifar-10-batches-py" / "data_batch_4").read_bytes())  # one batch
    args = ["--dataset=cifar10", "--download=false", "--model=tiny", "--batch_size=20",
            "--train_steps=2", "--skip_eval", "--export=false", "--enable_tensorboard=false",
            f"--model_dir={tmp_path / 'run'}"]
    first = run_module("cifar_dist.main", *args, f"--data_dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = (tmp_path / "run" / "config.json").read_text()
    other = run_module("cifar_dist.main", *args, f"--data_dir={tmp_path / 'b'}")
    assert other.returncode == 2, other.stderr[-3000:]
    lines = error_lines(other.stderr)
    assert len(lines) == 1 and "the training data: not the images and labels" in lines[0], lines
    assert (tmp_path / "run" / "config.json").read_text() == before
    moved = run_module("cifar_dist.main", *args, f"--data_dir={tmp_path / 'moved'}")
    assert moved.returncode == 0, moved.stderr[-3000:]
