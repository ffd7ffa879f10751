"""Bad input at the command line: one clear line, exit status 2, nothing written."""

from __future__ import annotations

import json
import os

import pytest

from cifar_dist.config import Config
from cifar_dist.errors import ConfigError
from conftest import TINY_SYNTHETIC, error_lines, run_module


@pytest.mark.parametrize("flags, message", [
    (["--strategy=bogus"], "--strategy='bogus' is not one of"),
    (["--dataset=imagenet"], "--dataset='imagenet' is not one of"),
    (["--dtype=float64"], "--dtype='float64' is not one of"),
    (["--batch_size=0"], "--batch_size must be > 0"),
    (["--batch_size=-8"], "--batch_size must be > 0"),
    (["--batch_size=abc"], "invalid literal for int"),
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--dataset=folder", "--data_dir="], "needs --data_dir"),
    # (the synthetic sizes back at their defaults: with cifar10 they would do nothing)
    (["--dataset=cifar10", "--data_dir=/nonexistent/cifar", "--synthetic_train_size=1024",
      "--synthetic_test_size=256"], "no such file or folder"),
    (["--strategy=multi_worker"], "needs a cluster"),
    (["--batch_size=100000"], "larger than the 512 training images"),
    (["--label_smoothing=1.5"], "--label_smoothing must be in [0, 1)"),
    (["--train_epochs=0", "--train_steps=0"], "set --train_epochs or --train_steps"),
])
def test_bad_flags_give_one_line_and_exit_2(tmp_path, flags, message):
    model_dir = tmp_path / "run"
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.pop("SLURM_PROCID", None)
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=2",
                        f"--model_dir={model_dir}", *flags, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not model_dir.exists()


def test_unwritable_or_file_model_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=2",
                        f"--model_dir={blocker / 'run'}")
    assert result.returncode == 2 and "is not a folder" in error_lines(result.stderr)[0]
    assert blocker.read_text() == "keep me"
    if os.geteuid() != 0:  # root can write anywhere; the permission case needs a normal user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=2",
                            f"--model_dir={locked / 'run'}")
        assert result.returncode == 2 and "not writable" in error_lines(result.stderr)[0]


def test_bad_flags_leave_an_existing_model_dir_untouched(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"test_accuracy": 0.9}))
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--dtype=fp8",
                        f"--model_dir={tmp_path}")
    assert result.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"test_accuracy": 0.9}


def test_config_validation_in_process():
    with pytest.raises(ConfigError, match="--num_cpu_devices splits the CPU"):
        Config(dataset="synthetic", strategy="one_device", num_cpu_devices=2)
    with pytest.raises(ConfigError, match="--momentum"):
        Config(dataset="synthetic", momentum=1.0)
    cfg = Config(dataset="synthetic", dtype="float16")
    assert cfg.dtype_policy == "mixed_float16"
    assert json.loads(cfg.to_json())["dtype"] == "float16"
