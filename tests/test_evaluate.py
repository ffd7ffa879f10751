"""cifar_dist.evaluate: metrics agree with training and with each other; files; bad input."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

from cifar_dist import data, evaluate, export
from cifar_dist.errors import ConfigError, DataError, UserError
from cifar_dist.run_dir import RunDir
from conftest import copy_run, run_module


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluation(trained_run, tmp_path_factory):
    """evaluate_model_dir(run, tta=True) into a separate folder (the run stays untouched)."""
    out = tmp_path_factory.mktemp("evaluation") / "eval"
    metrics = evaluate.evaluate_model_dir(str(trained_run), tta=True, output_dir=str(out))
    return metrics, out


@pytest.fixture(scope="module")
def test_split(trained_run):
    return data.load(evaluate.config_from_model_dir(str(trained_run))).test


def test_metrics_agree_with_training_run(evaluation, trained_run, test_split):
    metrics, _ = evaluation
    with open(trained_run / "metrics.json") as f:
        training = json.load(f)
    n = len(test_split)
    assert metrics["split"] == "test" and metrics["examples"] == n == training["test_examples"]
    # Same weights, same images, same loss formula: the exported model must reproduce the
    # training run's final test figures (XLA vs plain kernels may differ in the last bits).
    assert abs(metrics["accuracy"] - training["test_accuracy"]) <= 1.0 / n
    assert metrics["loss"] == pytest.approx(training["test_loss"], abs=1e-3)
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (10, 10)
    assert matrix.sum() == n
    assert np.trace(matrix) / n == pytest.approx(metrics["accuracy"], abs=1e-12)
    assert matrix.sum(axis=1).tolist() == np.bincount(test_split.labels, minlength=10).tolist()
    assert metrics["top_k"] == 5 and metrics["accuracy"] <= metrics["top_k_accuracy"] <= 1.0
    p = metrics["accuracy"]
    assert metrics["accuracy_standard_error"] == pytest.approx(math.sqrt(p * (1 - p) / n))
    supports = [c["support"] for c in metrics["per_class"].values()]
    assert sum(supports) == n


def test_report_and_predictions_agree_with_metrics(evaluation, test_split):
    metrics, out = evaluation
    with open(out / "metrics.json") as f:
        assert json.load(f)["accuracy"] == metrics["accuracy"]
    report = (out / "classification_report.txt").read_text()
    accuracy_rows = [line.split() for line in report.splitlines()
                     if line.strip().startswith("accuracy ") and len(line.split()) == 3]
    assert len(accuracy_rows) == 1, report  # scikit-learn's "accuracy  0.xxxx  n" row
    assert float(accuracy_rows[0][1]) == pytest.approx(round(metrics["accuracy"], 4))
    assert int(accuracy_rows[0][2]) == metrics["examples"]
    assert "TTA (flip): accuracy" in report  # the run's views: the default, flip

    rows = read_csv(out / "predictions.csv")
    assert [int(r["index"]) for r in rows] == list(range(len(test_split)))
    assert [int(r["true_id"]) for r in rows] == test_split.labels.tolist()
    names = metrics["class_names"]
    assert all(r["true_label"] == names[int(r["true_id"])] and
               r["predicted_label"] == names[int(r["predicted_id"])] for r in rows)
    correct = np.array([int(r["correct"]) for r in rows])
    assert correct.mean() == pytest.approx(metrics["accuracy"])
    confidence = np.array([float(r["confidence"]) for r in rows])
    assert ((confidence >= 1.0 / len(names) - 1e-6) & (confidence <= 1.0)).all()
    # Per-class recall recomputed from the CSV equals the reported one.
    true = np.array([int(r["true_id"]) for r in rows])
    pred = np.array([int(r["predicted_id"]) for r in rows])
    for c, name in enumerate(names):
        recall = np.mean(pred[true == c] == c) if (true == c).any() else 0.0
        assert metrics["per_class"][name]["recall"] == pytest.approx(recall)


def test_tta_averages_the_logits_of_image_and_mirror(evaluation, trained_run, test_split):
    import keras

    metrics, _ = evaluation
    model = keras.saving.load_model(trained_run / "export" / "model.keras")
    x = test_split.images.astype(np.float32) / 255.0
    plain = model.predict(x, verbose=0)
    mirrored = model.predict(x[:, :, ::-1, :], verbose=0)
    labels = test_split.labels
    assert np.mean(plain.argmax(1) == labels) == pytest.approx(metrics["accuracy"])
    tta = metrics["tta"]
    assert tta["views"] == "flip"  # the run's default --tta_views, recorded in export/tta.json
    # the two views' logits averaged: the softmax of their mean log-probability
    log_mean = 0.5 * (np.log(plain) + np.log(mirrored))
    combined = np.exp(log_mean) / np.exp(log_mean).sum(1, keepdims=True)
    assert tta["accuracy"] == pytest.approx(np.mean(combined.argmax(1) == labels))
    p_true = combined[np.arange(len(labels)), labels]
    assert tta["loss"] == pytest.approx(-np.mean(np.log(p_true)), abs=1e-4)


def test_plots_are_written(evaluation):
    from PIL import Image

    metrics, out = evaluation
    for name in ("confusion_matrix.png", "predictions.png", "training_curves.png"):
        assert name in metrics["files"]
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) >= 300, (name, img.size)
    assert sorted(os.listdir(out)) == metrics["files"]


def test_evaluate_with_a_bundle_as_main_passes_it(trained_run, tmp_path, evaluation):
    cfg = evaluate.config_from_model_dir(str(trained_run))
    bundle = data.load(cfg)
    metrics = evaluate.evaluate_model_dir(str(trained_run), bundle, output_dir=str(tmp_path / "e"),
                                          plots=False, tta=False)
    assert metrics["accuracy"] == evaluation[0]["accuracy"]
    assert metrics["tta"] is None
    assert sorted(os.listdir(tmp_path / "e")) == sorted(evaluate.OUTPUT_FILES)
    # A bundle with other classes is refused before anything is written.
    other = data.load_synthetic(64, 64, num_classes=5)
    with pytest.raises(DataError, match="predicts 10 classes"):
        evaluate.evaluate_model_dir(str(trained_run), other, output_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_cli_splits_and_overrides(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    assert evaluate.main(["evaluate", f"--model_dir={run}", "--split=validation",
                          "--plots=false"]) == 0
    out = capsys.readouterr().out
    assert "validation_accuracy=" in out and f"eval_dir={run / 'eval'}" in out
    with open(run / "eval" / "metrics.json") as f:
        m = json.load(f)
    assert (m["split"], m["examples"]) == ("validation", 200)
    with open(run / "metrics.json") as f:
        assert abs(m["accuracy"] - json.load(f)["validation_accuracy"]) <= 1 / 200

    assert evaluate.main(["evaluate", f"--model_dir={run}", "--split=train", "--train_subset=100",
                          "--top_k=3", "--plots=false"]) == 0
    with open(run / "eval" / "metrics.json") as f:
        m = json.load(f)
    assert (m["split"], m["examples"], m["top_k"]) == ("train", 100, 3)
    assert not (run / "eval.tmp").exists()


def test_validation_split_needs_a_held_out_run(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["validation_size"] = 0
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="held out no validation split"):
        evaluate.evaluate_model_dir(str(run), split="validation")
    assert not (run / "eval").exists()


def test_relative_data_dir_from_elsewhere_is_a_clear_error(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config.update(dataset="cifar10", data_dir="../no/such/data")  # the shared run uses the sample
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="relative to where training ran.*--data_dir"):
        evaluate.config_from_model_dir(str(run))
    cfg = evaluate.config_from_model_dir(str(run), {"dataset": "synthetic"})
    assert cfg.dataset == "synthetic"
    with pytest.raises(ConfigError, match="cannot override model"):
        evaluate.config_from_model_dir(str(run), {"model": "seed"})


def _bad_cases(trained_run, tmp):
    no_export = tmp / "no_export"
    no_export.mkdir()
    (no_export / "config.json").write_text((trained_run / "config.json").read_text())
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    return {
        "no --model_dir": ([], "--model_dir is required"),
        "missing folder": ([f"--model_dir={tmp / 'nope'}"], "no such folder"),
        "no export": ([f"--model_dir={no_export}"], "no exported model"),
        "bad enum": ([f"--model_dir={trained_run}", "--split=bogus"], "split"),
        "unknown flag": ([f"--model_dir={trained_run}", "--bogus=1"], "bogus"),
        "training flag": ([f"--model_dir={trained_run}", "--batch_size=8"], "batch_size"),
        "stray argument": ([f"--model_dir={trained_run}", "extra"], "unexpected arguments"),
        "missing data": ([f"--model_dir={trained_run}", "--dataset=cifar10",
                          f"--data_dir={tmp / 'nodata'}"], "not found"),
        "foreign output": ([f"--model_dir={trained_run}", f"--output_dir={foreign}"],
                           "not an evaluation folder"),
        "model_dir as output": ([f"--model_dir={trained_run}", f"--output_dir={trained_run}"],
                                "not an evaluation folder"),
        "top_k": ([f"--model_dir={trained_run}", "--top_k=0"], "top_k"),
    }


def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(trained_run, tmp_path):
    cases = _bad_cases(trained_run, tmp_path)
    before = sorted(os.listdir(trained_run)), sorted(os.listdir(tmp_path))
    for name, (args, message) in cases.items():
        if name in ("top_k",):  # found after the data load: checked in-process below
            continue
        result = run_module("cifar_dist.evaluate", *args, timeout=120)
        assert result.returncode == 2, (name, result.stderr)
        # These are all rejected before TensorFlow is imported: exactly one line.
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cifar_dist: error: "), (name, lines)
        assert message in lines[0], (name, lines[0])
        assert result.stdout == ""
    assert (sorted(os.listdir(trained_run)), sorted(os.listdir(tmp_path))) == before
    assert os.listdir(tmp_path / "foreign") == ["keep.txt"]


def test_in_process_bad_input_returns_2(trained_run, tmp_path, capsys):
    args, message = _bad_cases(trained_run, tmp_path)["top_k"]
    assert evaluate.main(["evaluate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (trained_run / "eval.tmp").exists()
    with pytest.raises(UserError):
        evaluate.exported_model_path(str(tmp_path))
    assert issubclass(export.ModelError, UserError)


def test_training_curves_inputs(trained_run, tmp_path, monkeypatch):
    from cifar_dist import plots

    seen = {}

    def capture(history, path, **kwargs):
        seen.update(kwargs, history=history)

    # The shared run: per-log-window learning rate from TensorBoard, images/s per epoch
    # from history.csv (training time only).
    scalars = evaluate.read_tensorboard_scalars(
        str(trained_run), ("train/learning_rate", "train/images_per_second"))
    history = RunDir(str(trained_run)).read_history()
    steps, lrs = scalars["train/learning_rate"]
    for row in history:  # the TensorBoard value at an epoch's last step is history's
        assert lrs[steps.tolist().index(int(row["step"]))] == pytest.approx(
            float(row["learning_rate"]), rel=1e-6)
    monkeypatch.setattr(plots, "training_curves", capture)
    config = json.loads((trained_run / "config.json").read_text())
    assert evaluate.plot_training_curves(str(trained_run), "unused.png", config)
    per_epoch = int(history[0]["step"])
    np.testing.assert_allclose(seen["lr_curve"][0], steps / per_epoch)
    assert "per epoch" in seen["speed_title"]
    np.testing.assert_allclose(seen["speed_curve"][1],
                               [float(row["images_per_second"]) for row in history])
    assert seen["train_note"] == \
        "train: measured on augmented images, loss with label smoothing 0.1"

    # A history with images/s per epoch (and no TensorBoard) plots that column instead.
    (tmp_path / "history.csv").write_text(
        "epoch,step,train_loss,train_accuracy,learning_rate,images_per_second\n"
        "1,10,2.0,0.2,0.1,500.5\n2,20,1.5,0.4,0.0,750.0\n")
    seen.clear()
    assert evaluate.plot_training_curves(str(tmp_path), "unused.png", {"augment": False})
    np.testing.assert_allclose(seen["speed_curve"][1], [500.5, 750.0])
    assert seen["lr_curve"] is None and seen["train_note"] == ""
    assert not evaluate.plot_training_curves(str(tmp_path / "nothing"), "unused.png")


def test_config_uses_only_the_data_settings_of_the_run(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    # Training-only settings, even ones a later version would reject, do not matter here.
    config.update(batch_size=-5, optimizer="no-such-optimizer", some_future_flag=1)
    (run / "config.json").write_text(json.dumps(config))
    cfg = evaluate.config_from_model_dir(str(run))
    assert (cfg.dataset, cfg.test_subset, cfg.validation_size) == \
        (config["dataset"], config["test_subset"], config["validation_size"])
    assert len(data.load(cfg).test) == json.loads(
        (trained_run / "metrics.json").read_text())["test_examples"]
