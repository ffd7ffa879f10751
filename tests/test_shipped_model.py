"""The model shipped in the package: it is there, it is the file its record describes, it
scores its recorded accuracy on the shared test images, and `predict` uses it by default."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os

import numpy as np
from PIL import Image

from cifar_dist import data, export, predict
from conftest import DATA_DIR, REPO, error_lines, requires_data, run_module, run_script


def load_record() -> dict:
    with open(predict.SHIPPED_RECORD) as f:
        return json.load(f)


def shared_test_split(n: int):
    return data.load_local_cifar10(data.find_local_cifar10(str(DATA_DIR))).test.take(n)


def test_shipped_model_is_the_recorded_file():
    # Not a skip: the package promises a model, so a missing one is a failure.
    assert os.path.isfile(predict.SHIPPED_MODEL), "no model shipped in cifar_dist/assets"
    record = load_record()
    with open(predict.SHIPPED_MODEL, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == record["sha256"]
    assert os.path.getsize(predict.SHIPPED_MODEL) < 12 * 2**20  # ~9 MB at float32
    assert record["epochs"] <= 10


@requires_data
def test_shipped_model_scores_its_recorded_accuracy():
    record = load_record()
    model = export.load_exported(predict.SHIPPED_MODEL)
    assert model.class_names == data.CIFAR10_CLASSES
    test = shared_test_split(record["test_images"])
    accuracy = float((model.probabilities(test.images).argmax(1) == test.labels).mean())
    # The same file on the same images: equal up to a few float-rounding flips across machines.
    assert abs(accuracy - record["test_accuracy"]) <= 0.005, (accuracy, record["test_accuracy"])
    assert accuracy > 0.8  # a trained model, not chance (10%)
    # predict's default views are the recorded ones (assets/tta.json), and score as recorded
    assert model.tta_views == record["tta_views"]
    augmented = float((model.probabilities(test.images, tta=True).argmax(1) == test.labels).mean())
    assert abs(augmented - record["test_accuracy_tta"]) <= 0.005, (augmented, record)


def test_predict_without_model_uses_the_shipped_one(tmp_path):
    test = data.load_sample().test.take(20)  # the first 20 official test images
    paths = []
    for i, image in enumerate(test.images):
        paths.append(str(tmp_path / f"{i:02d}.png"))
        Image.fromarray(image).save(paths[-1])
    result = run_module("cifar_dist.predict", *paths, timeout=300)
    assert result.returncode == 0, result.stderr
    assert error_lines(result.stderr) == []
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0][:3] == ["path", "label", "confidence"]
    assert [r[0] for r in rows[1:]] == paths
    names = [data.CIFAR10_CLASSES[label] for label in test.labels]
    correct = sum(r[1] == name for r, name in zip(rows[1:], names))
    # PNG round trip is lossless, so these are the same predictions as in-process ones
    # (the recorded test-time views: predict's default).
    shipped = export.load_exported(predict.SHIPPED_MODEL)
    in_process = shipped.probabilities(test.images, tta=True)
    assert [r[1] for r in rows[1:]] == [data.CIFAR10_CLASSES[i] for i in in_process.argmax(1)]
    assert correct >= 15, f"{correct} of 20 correct"
    probs = np.array([[float(v) for v in r[3:]] for r in rows[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)


def test_ship_model_refuses_a_run_without_export_and_leaves_the_assets(tmp_path):
    assets = os.path.dirname(predict.SHIPPED_MODEL)
    before = {name: os.path.getmtime(os.path.join(assets, name)) for name in os.listdir(assets)}
    r = run_script(REPO / "tools" / "ship_model.py", f"--model_dir={tmp_path}",
                   f"--data_dir={DATA_DIR}", timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("ship_model: ")]
    assert len(lines) == 1 and "export" in lines[0], r.stderr
    after = {name: os.path.getmtime(os.path.join(assets, name)) for name in os.listdir(assets)}
    assert after == before  # nothing written, no staging folder left
