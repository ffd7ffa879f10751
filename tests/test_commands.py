"""One command line: python -m cifar_dist COMMAND, console scripts, one help/error/exit path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from cifar_dist import cli
from conftest import TINY_SYNTHETIC, error_lines, env_for_subprocess, run_module

# One flag each command defines, to see that --help lists the command's own flags.
OWN_FLAG = {"train": "--batch_size", "evaluate": "--split", "export": "--checkpoint",
            "predict": "--model", "bench": "--windows", "preview": "--num_augmentations"}


def test_every_command_is_listed():
    assert sorted(OWN_FLAG) == sorted(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(OWN_FLAG))
def test_help_and_one_bad_flag(command, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.dispatch(["cifar_dist", command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().err
    assert OWN_FLAG[command] in text and "flags:" in text

    assert cli.dispatch(["cifar_dist", command, "--no_such_flag=1"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("cifar_dist: error: ") and "no_such_flag" in lines[0]


def test_no_command_or_an_unknown_one(capsys):
    assert cli.dispatch(["cifar_dist"]) == 2
    assert "commands:" in capsys.readouterr().err
    assert cli.dispatch(["cifar_dist", "--help"]) == 0
    assert cli.dispatch(["cifar_dist", "trian"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "cifar_dist: error: unknown command 'trian'; choose one of "
        "train, evaluate, export, predict, bench, preview"]


def test_python_dash_m_cifar_dist_and_the_old_module_agree(tmp_path):
    """The same bad flag through `-m cifar_dist train` and `-m cifar_dist.main`."""
    for module, args in (("cifar_dist", ["train"]), ("cifar_dist.main", [])):
        result = run_module(module, *args, "--batch_size=0", f"--model_dir={tmp_path / 'r'}")
        assert result.returncode == 2, result.stderr[-2000:]
        assert error_lines(result.stderr) == ["cifar_dist: error: --batch_size must be > 0, got 0"]
    assert not (tmp_path / "r").exists()


def test_console_scripts_are_installed():
    """pip install -e . (README's set-up) puts one script per command on PATH."""
    bindir = os.path.dirname(sys.executable)
    for name in ["cifar-dist"] + [f"cifar-dist-{c}" for c in cli.COMMANDS]:
        path = shutil.which(name) or shutil.which(name, path=bindir)
        if path is None:
            pytest.skip(f"{name} not on PATH: the package is not pip-installed here")
        result = subprocess.run([path, "--help"] if name != "cifar-dist" else [path, "--help"],
                                capture_output=True, text=True, timeout=120,
                                env=env_for_subprocess())
        assert result.returncode == 0, (name, result.stderr[-1000:])


IMPORT_ALL_THEN_TWO_COMMANDS = r"""
import importlib, json, pkgutil, sys
import cifar_dist
names = [m.name for m in pkgutil.walk_packages(cifar_dist.__path__, "cifar_dist.")]
for name in names:
    if name != "cifar_dist.__main__":
        importlib.import_module(name)
from cifar_dist import cli
train = cli.dispatch(["cifar_dist", "train", *json.loads(sys.argv[1])])
evaluate = cli.dispatch(["cifar_dist", "evaluate", "--model_dir=" + sys.argv[2], "--noplots"])
print(json.dumps({"modules": len(names), "train": train, "evaluate": evaluate}))
"""


@pytest.mark.slow
def test_import_every_module_then_run_two_commands_in_one_process(tmp_path):
    """Flags are defined by the command that runs, not at import: with every module of
    the package imported, train and then evaluate still run in the same process."""
    run_dir = tmp_path / "run"
    train_args = [*TINY_SYNTHETIC, "--train_steps=4", "--export=true", f"--model_dir={run_dir}"]
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL_THEN_TWO_COMMANDS, json.dumps(train_args),
         str(run_dir)], capture_output=True, text=True, timeout=600, env=env_for_subprocess())
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["modules"] >= 20
    assert summary["train"] == 0 and summary["evaluate"] == 0, result.stderr[-3000:]
    assert (run_dir / "export" / "model.keras").is_file()
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["examples"] == 128
