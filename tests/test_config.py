"""The Config defaults are the seed recipe; a run without --model_dir gets runs/<UTC time>."""

from __future__ import annotations

import calendar
import dataclasses
import os

import pytest
from absl import flags

from cifar_dist import config
from cifar_dist.errors import ConfigError
from conftest import REPO, TINY_SYNTHETIC, error_lines, run_module


def parse(*argv) -> flags.FlagValues:
    fv = flags.FlagValues()
    config.define_flags(fv)
    fv(["prog", *argv])
    return fv


def test_seed_cfg_only_restates_the_defaults(monkeypatch):
    monkeypatch.chdir(REPO)
    fv = parse("--flagfile=configs/seed.cfg")
    fields = {f.name: f.default for f in dataclasses.fields(config.Config)}
    set_here = [name for name in fields if fv[name].present]
    assert len(set_here) >= 10  # the file is read: it sets the recipe's flags
    differing = {name: (fv[name].value, fields[name]) for name in set_here
                 if fv[name].value != fields[name]}
    assert not differing, f"configs/seed.cfg != Config defaults: {differing}"
    # and the flag defaults are the Config defaults
    assert all(parse()[name].value == default for name, default in fields.items())


def test_default_model_dir_is_a_fresh_utc_timestamp_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = calendar.timegm((2026, 12, 1, 21, 30, 5, 0, 0, 0))
    assert config.default_model_dir("one_device", now) == os.path.join("runs", "20261201-213005")
    (tmp_path / "runs" / "20261201-213005").mkdir(parents=True)  # same second: a new folder
    assert config.default_model_dir("mirrored", now) == os.path.join("runs", "20261201-213005-1")
    cfg = config.from_flags(parse("--dataset=synthetic"))
    assert os.path.dirname(cfg.model_dir) == str(tmp_path / "runs")
    with pytest.raises(ConfigError, match="multi_worker needs an explicit --model_dir"):
        config.from_flags(parse("--dataset=synthetic", "--strategy=multi_worker"))


def test_a_run_without_model_dir_writes_under_runs(tmp_path):
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert f"no --model_dir given: writing to {run}" in result.stderr
    assert (run / "metrics.json").is_file() and f"model_dir={run}" in result.stdout


def test_multi_worker_without_model_dir_is_one_line(tmp_path):
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=1",
                        "--strategy=multi_worker", cwd=tmp_path)
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "needs an explicit --model_dir that every worker" in lines[0]
    assert list(tmp_path.iterdir()) == []
