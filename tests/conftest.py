"""Shared test helpers: where the data is, and how to run a command in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
HAVE_DATA = (DATA_DIR / "cifar-10-batches-py" / "data_batch_1").is_file()

requires_data = pytest.mark.skipif(
    not HAVE_DATA, reason=f"real CIFAR-10 not found at {DATA_DIR} (see README: test data)")

# The recipe the tiny test runs were written for (the Config defaults before they became
# configs/seed.cfg's AdamW recipe): SGD + Nesterov, peak 0.1, weight decay 5e-4, 1 epoch.
TINY_RECIPE = ["--optimizer=sgd", "--learning_rate=0.1", "--weight_decay=5e-4",
               "--train_epochs=1"]
# A tiny, fast training configuration on the full real data (a few seconds of training).
TINY_REAL = ["--dataset=cifar10", f"--data_dir={DATA_DIR}", "--train_subset=512",
             "--test_subset=128", "--model=tiny", "--batch_size=64", "--log_steps=2",
             "--enable_tensorboard=false", "--export=false", "--skip_eval", *TINY_RECIPE]
# The same on the real CIFAR-10 sample shipped in the package: needs no data and no network.
TINY_SAMPLE = ["--dataset=sample", "--train_subset=512", "--test_subset=128", "--model=tiny",
               "--batch_size=64", "--log_steps=2", "--enable_tensorboard=false",
               "--export=false", "--skip_eval", *TINY_RECIPE]
# The same on synthetic data, for tests that do not need real images.
TINY_SYNTHETIC = ["--dataset=synthetic", "--synthetic_train_size=512",
                  "--synthetic_test_size=128", "--model=tiny", "--batch_size=64",
                  "--log_steps=2", "--enable_tensorboard=false", "--export=false", "--skip_eval",
                  *TINY_RECIPE]


def env_for_subprocess(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_module(module: str, *args, timeout: float = 600, env=None, cwd=None):
    """Runs `python -m module args...` in a fresh process; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env=env or env_for_subprocess(), cwd=cwd or REPO)


def run_script(path, *args, timeout: float = 600, env=None):
    return subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env or env_for_subprocess(), cwd=REPO)


def error_lines(stderr: str):
    """The lines our CLI prints for a user error (absl/TF start-up noise filtered out)."""
    return [line for line in stderr.splitlines() if line.startswith("cifar_dist: ")]


# --------------------------------------------------------------------------- one trained run
# Shared by test_evaluate, test_plots, test_export and test_predict (evaluation/export owner).

TRAINED_RUN_FLAGS = ["--model=tiny", "--batch_size=64", "--train_epochs=2", "--log_steps=4",
                     "--optimizer=sgd", "--learning_rate=0.05", "--weight_decay=5e-4",
                     "--validation_size=200", "--jit_compile=false", "--seed=0"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished tiny run (about 30 s, once per session): config.json, history.csv with
    validation columns, checkpoints/, tensorboard/, metrics.json and export/. Real CIFAR-10
    images from the sample shipped in the package (512 training, 200 validation, 200 test
    images). Read-only for tests: copy it (copy_run) before changing anything."""
    model_dir = tmp_path_factory.mktemp("trained_run") / "run"
    data = ["--dataset=sample", "--train_subset=512", "--test_subset=200"]
    result = run_module("cifar_dist.main", *data, *TRAINED_RUN_FLAGS, f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def copy_run(run_dir, destination):
    """A private copy of a trained run that a test may change."""
    import shutil  # noqa: PLC0415

    # without eval/: training already wrote one, and tests check what they write themselves
    shutil.copytree(run_dir, destination, ignore=shutil.ignore_patterns("eval"))
    return Path(destination)
