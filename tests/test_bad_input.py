"""Issue #17, hardening round 2: every file read and every flag ends in a valid result or
one printable `cifar_dist: error:` line (exit 2, nothing written); models as programs."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from cifar_dist import config, data, evaluate, export, predict, run_dir
from cifar_dist.config import Config
from cifar_dist.errors import ConfigError, DataError, UserError, printable
from conftest import TINY_SYNTHETIC, copy_run, error_lines, run_module

# --------------------------------------------------------------------------- A: one line


def test_printable_escapes_what_could_break_a_line_or_the_encoding():
    assert printable("photos/cat 1.png") == "photos/cat 1.png"  # printable: unchanged
    assert printable("café.png") == "café.png"
    assert printable(os.fsdecode(b"bad\xff.png")) == "bad\\xff.png"
    assert printable(b"bad\xff.png") == "bad\\xff.png"
    assert printable("a\nb\tc\x1b[31m\\d") == "a\\nb\\tc\\x1b[31m\\\\d"
    assert printable("x\u2028y") == "x\\u2028y"
    forged = DataError("x.png\ncifar_dist: error: forged")
    assert str(forged) == "x.png\\ncifar_dist: error: forged" and "\n" not in str(forged)
    str(forged).encode("utf-8")  # always encodable


def _batch(n=4, labels=None):
    rng = np.random.default_rng(0)
    return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(range(n)) if labels is None else labels}, protocol=2)


def test_huge_batch_file_is_refused_before_reading(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as f:
        f.truncate(2 * 2**30)  # sparse: 2 GB on paper, nothing on disk or in memory
    (folder / "test_batch").write_bytes(_batch())
    with pytest.raises(DataError, match=r"data_batch_1: 2,147,483,648 bytes, far more than a "
                                        r"CIFAR-10 batch file .*not read"):
        data.load(Config(data_dir=str(tmp_path)))


def test_tar_member_claiming_a_huge_size_is_refused(tmp_path):
    info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    info.size = 2 * 2**30  # the header lies; only a few bytes follow
    raw = info.tobuf(format=tarfile.GNU_FORMAT) + b"\x00" * 1024
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=r"member cifar-10-batches-py/data_batch_1: "
                                        r"2,147,483,648 bytes.*not read"):
        data.load(Config(data_dir=str(path)))


@pytest.fixture(scope="module")
def odd_names(tmp_path_factory):
    """Image files whose names are not UTF-8 or hold control characters; two are bad."""
    root = tmp_path_factory.mktemp("odd")
    raw = os.fsencode(root)
    good = [b"bad\xffbyte.png", b"new\nline.png", b"esc\x1b[31mred.png", b"tab\there.png",
            "caf\u00e9.png".encode()]
    for i, name in enumerate(good):
        Image.new("RGB", (32, 32), (20 * i, 40, 60)).save(os.path.join(raw, name), "PNG")
    bad = [b"forged.png\ncifar_dist: error: all good.png", b"broken\xfe.png"]
    for name in bad:
        with open(os.path.join(raw, name), "wb") as f:
            f.write(b"not an image")
    return root, good, bad


def test_odd_file_names_keep_every_row_and_one_line_per_error(odd_names, tmp_path, capsys):
    root, good, bad = odd_names
    out = tmp_path / "out.csv"
    assert predict.main(["predict", f"--output={out}", str(root)]) == 2  # shipped model
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("cifar_dist: error:")]
    assert len(errors) == len(bad), err
    assert any("forged.png\\ncifar_dist: error: all good.png: not a readable image" in e
               for e in errors)
    assert any("broken\\xfe.png" in e for e in errors)
    text = out.read_bytes().decode("utf-8")  # valid UTF-8
    rows = text.splitlines()
    assert len(rows) == 1 + len(good)  # header + every good file, one line each
    paths = {row.split(",")[0] for row in rows[1:]}
    raw_root = os.fsencode(root)
    assert paths == {printable(os.path.join(raw_root, name)) for name in good}
    assert f"{root}/caf\u00e9.png" in paths  # printable names are unchanged


# --------------------------------------------------------------------------- A, C: models


def _save_module(path, dtype=None, shape=(None, 32, 32, 3), classes=10):
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal([3, classes], seed=[1, 2]))
            self.class_names = tf.Variable([f"c{i}" for i in range(classes)], trainable=False)

        @tf.function(input_signature=[tf.TensorSpec(shape, dtype or tf.uint8, name="images")])
        def serve(self, images):
            mean = tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2]) / 255.0
            return {"probabilities": tf.nn.softmax(mean @ self.w)}

    module = Tiny()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path)
    return path


@pytest.mark.parametrize("kind", ["float32", "wrong_shape"])
def test_saved_model_with_a_wrong_signature_is_refused_before_the_header(
        kind, tmp_path, image_file, capsys):
    import tensorflow as tf

    path = _save_module(tmp_path / "sm", **({"dtype": tf.float32} if kind == "float32"
                                            else {"shape": (None, 28, 28, 3)}))
    assert predict.main(["predict", f"--model={path}", str(image_file)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no CSV header
    lines = captured.err.strip().splitlines()
    assert lines == [l for l in lines if l.startswith("cifar_dist: error:")] and len(lines) == 1
    assert "not uint8 [N, 32, 32, 3] images" in lines[0]
    assert ("float32" if kind == "float32" else "[None, 28, 28, 3]") in lines[0]


def test_bare_saved_model_loads_with_a_program_warning(tmp_path, image_file, capsys):
    path = _save_module(tmp_path / "sm")
    assert predict.main(["predict", f"--model={path}", str(image_file)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == "path,label,confidence," + ",".join(
        f"c{i}" for i in range(10))
    warnings = [l for l in captured.err.splitlines() if "warning" in l.lower()]
    assert warnings == [f"cifar_dist: warning: {path}: {export.SAVED_MODEL_WARNING}"]
    assert "trusted source" in warnings[0] and error_lines(captured.err) == warnings


def test_export_folder_loads_model_keras_in_safe_mode_without_warning(tmp_path, image_file,
                                                                       capsys):
    folder = tmp_path / "export"
    _save_module(folder / "saved_model")
    shutil.copy(predict.SHIPPED_MODEL, folder / "model.keras")
    shutil.copy(os.path.join(os.path.dirname(predict.SHIPPED_MODEL), "class_names.json"), folder)
    model = export.load_exported(str(folder))
    assert model.kind == "keras" and model.path == str(folder / "model.keras")
    assert predict.main(["predict", f"--model={folder}", str(image_file)]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err.lower()
    assert captured.out.splitlines()[0].endswith(",".join(data.CIFAR10_CLASSES))
    # evaluate: model.keras when there, else the SavedModel (which then warns on load)
    run = tmp_path / "run"
    shutil.copytree(folder, run / "export")
    assert evaluate.exported_model_path(str(run)).endswith("model.keras")
    os.remove(run / "export" / "model.keras")
    assert evaluate.exported_model_path(str(run)) == str(run / "export" / "saved_model")


# --------------------------------------------------------------------------- B: float flags

FLOAT_FIELDS = [f.name for f in dataclasses.fields(Config) if f.type in (float, "float")]


def test_every_float_field_is_covered():
    assert {"learning_rate", "weight_decay", "momentum", "label_smoothing", "warmup_fraction",
            "loss_scale", "collective_timeout"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_float_flags_are_refused(tmp_path, name, value):
    with pytest.raises(ConfigError, match=f"--{name} must be a finite number"):
        Config(dataset="synthetic", **{name: float(value)})
    model_dir = tmp_path / "run"
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=1",
                        f"--model_dir={model_dir}", f"--{name}={value}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert lines == [f"cifar_dist: error: --{name} must be a finite number, "
                     f"got {float(value)!r}"], result.stderr[-2000:]
    assert not model_dir.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- D: the surprises


def test_a_flagfile_that_includes_itself_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "loop.cfg").write_text("--flagfile=loop.cfg\n--train_steps=1\n")
    (tmp_path / "a.cfg").write_text("--flagfile=./b.cfg\n")
    (tmp_path / "b.cfg").write_text("--flagfile=a.cfg\n")
    result = run_module("cifar_dist.main", "--flagfile=loop.cfg",
                        f"--model_dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("cifar_dist: error: --flagfile=loop.cfg "
                                                   "includes itself"), result.stderr
    assert not (tmp_path / "run").exists()
    from absl import flags
    monkeypatch.chdir(tmp_path)  # absl reads nested flagfiles relative to the current folder
    fv = flags.FlagValues()
    config.define_flags(fv)
    with pytest.raises(flags.Error, match=r"includes itself \(.*a.cfg -> .*b.cfg -> .*a.cfg\)"):
        fv(["prog", "--flagfile=a.cfg"])
    # evaluate/predict/export parse through cli.parse_flags: the same refusal
    assert predict.main(["predict", f"--flagfile={tmp_path / 'loop.cfg'}", "x.png"]) == 2


def test_subset_larger_than_the_data_names_both_numbers():
    with pytest.raises(DataError, match=r"--train_subset=5000 is more than the 2048 train "
                                        r"images of cifar10 sample"):
        data.load(Config(dataset="sample", train_subset=5000))
    with pytest.raises(DataError, match=r"--train_subset=2000 is more than the 1848 .* after "
                                        r"--validation_size=200"):
        data.load(Config(dataset="sample", train_subset=2000, validation_size=200))
    with pytest.raises(DataError, match=r"--test_subset=513 is more than the 512 test"):
        data.load(Config(dataset="sample", test_subset=513))
    assert len(data.load(Config(dataset="sample", train_subset=2048)).train) == 2048


@pytest.mark.parametrize("labels, message", [
    ([1, 2, 2**32 + 3, 4], "label 4294967299 does not fit in int32"),
    ([1, 2, -2**31 - 1, 4], "does not fit in int32"),
    ([1, 2, 2**70, 4], "must be integers, found object"),
    ([1.0, 2.7, 3.0, 4.0], "must be integers, found float64 \\(e.g. 1.0\\)"),
    ([True, False, True, False], "must be integers, found bool"),
    (["1", "2", "3", "4"], "must be integers"),
])
def test_labels_that_would_wrap_or_truncate_are_refused(labels, message):
    with pytest.raises(DataError, match=message):
        data.parse_batch(_batch(labels=labels), "batch")
    split = data.parse_batch(_batch(labels=np.array([0, 1, 2, 9], np.uint8)), "batch")
    assert split.labels.dtype == np.int32 and split.labels.tolist() == [0, 1, 2, 9]


def test_folder_dataset_needs_two_classes_with_images(tmp_path):
    def image(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (1, 2, 3)).save(path)

    for i in range(20):
        image(tmp_path / "one" / "cat" / f"{i}.png")
    with pytest.raises(DataError, match="only one class folder \\(cat\\); .* at least 2"):
        data.load(Config(dataset="folder", data_dir=str(tmp_path / "one")))
    image(tmp_path / "split" / "train" / "cat" / "a.png")
    image(tmp_path / "split" / "train" / "dog" / "a.png")
    (tmp_path / "split" / "test" / "cat").mkdir(parents=True)
    image(tmp_path / "split" / "test" / "dog" / "b.png")
    with pytest.raises(DataError, match=r"test/cat: class folder with no images"):
        data.load(Config(dataset="folder", data_dir=str(tmp_path / "split")))


def test_a_data_dir_the_dataset_would_not_read_is_refused(tmp_path):
    for dataset in ("sample", "synthetic"):
        with pytest.raises(ConfigError, match=f"--data_dir=/my/cifar is not read with "
                                              f"--dataset={dataset}"):
            Config(dataset=dataset, data_dir="/my/cifar")
    Config(dataset="cifar10", data_dir="/my/cifar")
    # As a user types it: the smoke recipe names the sample; the data_dir would be ignored.
    result = run_module("cifar_dist.main", "--flagfile=configs/smoke.cfg",
                        "--data_dir=/my/cifar", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "add --dataset=cifar10" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_profile_steps_past_the_end_of_the_run_are_refused(tmp_path):
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=2",
                        "--profile_steps=5,6", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "--profile_steps=5,6 starts past the run's end (step 2)" in \
        lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_num_cpu_devices_is_bounded_by_the_cores():
    bound = config.MAX_CPU_DEVICES_PER_CORE * os.cpu_count()
    with pytest.raises(ConfigError, match=f"--num_cpu_devices={bound + 1} is more than 8 per "
                                          f"CPU core .*at most {bound}"):
        Config(dataset="synthetic", strategy="mirrored", num_cpu_devices=bound + 1)
    Config(dataset="synthetic", strategy="mirrored", num_cpu_devices=bound)


def test_evaluate_refuses_a_model_dir_still_training(tmp_path, capsys):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.keras").write_bytes(b"")
    with run_dir.ModelDirLock(str(tmp_path)):  # what a training run holds
        assert evaluate.main(["evaluate", f"--model_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"cifar_dist: error: --model_dir={tmp_path} is in use by a run still "
                       f"training (pid {os.getpid()}); evaluate it when that run has finished"]
    assert run_dir.RunDir(str(tmp_path)).lock_owner() is None
    assert evaluate.main(["evaluate", f"--model_dir={tmp_path}"]) == 2  # next check: config.json
    assert "in use" not in capsys.readouterr().err


def test_checkpoint_that_does_not_fit_ends_stderr_with_the_error_line(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    shutil.rmtree(run / "export")
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(saved, model="seed")))
    result = run_module("cifar_dist.export", f"--model_dir={run}", timeout=300)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("cifar_dist: error: ") and "does not fit a 'seed' model" \
        in lines[-1], result.stderr[-3000:]
    assert len(error_lines(result.stderr)) == 1
    assert "unrestored values" not in result.stderr
    assert not (run / "export").exists()


def test_evaluate_validates_history_and_config_and_keeps_a_concurrent_tmp(trained_run,
                                                                          tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "eval.tmp").mkdir()  # another evaluation's folder under the old fixed name
    (run / "eval.tmp" / "theirs.txt").write_text("x")
    good = (run / "history.csv").read_text()
    (run / "history.csv").write_text("epoch,step\n1,ten\n")
    with pytest.raises(DataError, match=r"history.csv: not a history.csv written by training"):
        evaluate.evaluate_model_dir(str(run))
    assert not (run / "eval").exists()
    (run / "history.csv").write_text(good)
    metrics = evaluate.evaluate_model_dir(str(run), plots=False)
    assert metrics["eval_dir"] == str(run / "eval") and (run / "eval.tmp" / "theirs.txt").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(run / "eval").st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert not [p for p in os.listdir(run) if p.startswith(".eval")]
    again = evaluate.evaluate_model_dir(str(run), plots=False)  # replaces the folder
    assert again["accuracy"] == metrics["accuracy"]
    assert not [p for p in os.listdir(run) if p.startswith(".eval")]
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(saved, test_subset="ten")))
    with pytest.raises(UserError, match=r"config.json: a data setting of the wrong type"):
        evaluate.config_from_model_dir(str(run))


# --------------------------------------------------------------------------- #25 kind 3

INT_FIELDS = [f.name for f in dataclasses.fields(Config) if f.type in (int, "int")]


def test_every_int_field_is_covered():
    assert {"batch_size", "train_steps", "train_epochs", "seed", "lookahead_steps",
            "synthetic_train_size", "num_gpus"} <= set(INT_FIELDS)


@pytest.mark.parametrize("name", INT_FIELDS)
def test_int_flags_beyond_int32_are_refused(name):
    # 10**30 steps or epochs was a TypeError from TensorFlow after model_dir was written,
    # --lookahead_steps=10**30 an OverflowError, --seed=10**30 numpy's ValueError.
    for value in (10**30, -10**30, config.MAX_INT_FLAG + 1):
        with pytest.raises(ConfigError, match=f"--{name}=-?[0-9]+ is out of range"):
            Config(dataset="synthetic", **{name: value})


@pytest.mark.parametrize("changes, message", [
    (dict(seed=-1), "--seed must be >= 0"),  # was numpy's "expected non-negative integer"
    (dict(num_gpus=-5), "--num_gpus must be -1 \\(all\\) or >= 0"),
    (dict(steps_per_loop="\u00b2"), "--steps_per_loop='\u00b2' must be"),  # isdigit, not int()
    (dict(profile_steps="\u00b2"), "--profile_steps='\u00b2' must be"),
    (dict(profile_steps="\u0661,\u0662"), "--profile_steps=.* must be"),
    (dict(collective_timeout=1e300), "--collective_timeout=1e\\+300 s is more than a week"),
    (dict(startup_timeout=1e9), "--startup_timeout=1e\\+09 s is more than a week"),
])
def test_odd_numbers_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        Config(dataset="synthetic", **changes)


@pytest.mark.parametrize("changes, message", [
    (dict(num_gpus=2), "--num_gpus=2 has no effect: .*--strategy=one_device"),
    (dict(strategy="mirrored", num_cpu_devices=2, num_gpus=1),
     "--num_gpus=1 has no effect: --num_cpu_devices"),
    (dict(loss_scale=1024.0), "--loss_scale=1024.0 has no effect: .*--dtype=float32"),
    (dict(dataset="sample", synthetic_train_size=64),
     "--synthetic_train_size=64 has no effect: .*--dataset=sample"),
    (dict(dataset="sample", synthetic_test_size=64), "--synthetic_test_size=64 has no effect"),
    (dict(base_batch_size=512), "--base_batch_size=512 has no effect: .*--lr_scaling=none"),
    (dict(lookahead_decay=0.5), "--lookahead_decay=0.5 has no effect: lookahead is off"),
])
def test_a_flag_without_effect_is_refused_not_dropped(changes, message):
    with pytest.raises(ConfigError, match=message):
        Config(**{"dataset": "synthetic", **changes})


def test_flags_with_their_effect_or_their_default_are_accepted():
    Config(dataset="synthetic", strategy="mirrored", num_gpus=2)
    Config(dataset="synthetic", dtype="float16", loss_scale=1024.0)
    Config(dataset="synthetic", synthetic_train_size=64)
    Config(dataset="synthetic", lr_scaling="linear", base_batch_size=512)
    Config(dataset="synthetic", lookahead_steps=5, lookahead_decay=0.5)
    Config(dataset="sample", synthetic_train_size=1024, loss_scale=32768.0, num_gpus=-1)
    Config(dataset="synthetic", steps_per_loop="10", profile_steps="2,3", seed=2**31 - 1)


def test_a_flagfile_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "latin1.cfg").write_bytes(b"# caf\xe9\n--train_steps=1\n")
    (tmp_path / "garbage.cfg").write_bytes(bytes(range(128, 256)) * 3)
    (tmp_path / "outer.cfg").write_text(f"--flagfile={tmp_path / 'latin1.cfg'}\n")
    from absl import flags
    for name in ("latin1.cfg", "garbage.cfg", "outer.cfg"):
        fv = flags.FlagValues()
        config.define_flags(fv)
        with pytest.raises(flags.Error, match=r"latin1.cfg is not UTF-8 text \(it holds the "
                                              r"byte 0xe9\)|garbage.cfg is not UTF-8"):
            fv(["prog", f"--flagfile={tmp_path / name}"])
    # evaluate/predict/export: the same reader (cli.parse_flags)
    assert predict.main(["predict", f"--flagfile={tmp_path / 'garbage.cfg'}", "x.png"]) == 2
    result = run_module("cifar_dist.main", f"--flagfile={tmp_path / 'garbage.cfg'}",
                        f"--model_dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr  # was a UnicodeDecodeError traceback, exit 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "garbage.cfg is not UTF-8 text" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_synthetic_sizes_beyond_the_memory_are_refused_before_allocating():
    # 2**31 - 1 images are 6 TiB: was numpy's MemoryError traceback (10**12: 2.7 PiB)
    with pytest.raises(DataError, match=r"--synthetic_train_size=2147483647 .* need "
                                        r"[0-9,.]+ GiB of images, more than half"):
        data.load(Config(dataset="synthetic", synthetic_train_size=config.MAX_INT_FLAG))


def _class_folders(root, names):
    for name in names:
        folder = os.path.join(os.fsencode(root), os.fsencode(name))
        os.makedirs(folder, exist_ok=True)
        for i in range(10):
            Image.new("RGB", (32, 32), (i, 2 * i, 3)).save(os.path.join(folder, b"%d.png" % i))


@pytest.mark.parametrize("name, shown", [
    (os.fsdecode(b"c\xffat"), "c\\\\xffat"),  # was a TensorFlow traceback in the final export
    ("ca\nt", "ca\\\\nt"),  # was an evaluation that no longer matched the exported names
    ("ca\tt", "ca\\\\tt"),
    ("\x1b[31mcat", "\\\\x1b\\[31mcat"),
])
def test_class_names_the_export_would_choke_on_are_refused_before_training(
        tmp_path, name, shown):
    _class_folders(tmp_path / "photos", [name, "dog"])
    with pytest.raises(DataError, match=f"class name {shown} is not printable UTF-8 text"):
        data.load(Config(dataset="folder", data_dir=str(tmp_path / "photos")))
    data.check_class_names(("cat", "caf\u00e9", "$x$", " dog"), "ok")  # printable: kept
    with pytest.raises(DataError, match="class names listed twice: cat"):
        data.check_class_names(("cat", "dog", "cat"), "twice")


def test_a_class_folder_name_is_refused_before_model_dir_is_written(tmp_path):
    _class_folders(tmp_path / "photos", [os.fsdecode(b"c\xffat"), "dog"])
    result = run_module("cifar_dist.main", "--dataset=folder",
                        f"--data_dir={tmp_path / 'photos'}", "--model=tiny", "--batch_size=8",
                        "--train_steps=1", f"--model_dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "class name c\\xffat is not printable" in lines[0], lines
    assert not (tmp_path / "run").exists()
