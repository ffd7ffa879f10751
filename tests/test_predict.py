"""cifar_dist.predict: CSV rows equal the exported model's predictions; bad files are
reported one line each while the others are classified; exit status; batching."""

from __future__ import annotations

import csv
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cifar_dist import data, evaluate, export, predict
from conftest import error_lines, run_module


def read_rows(text):
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def test_images(trained_run):
    split = data.load(evaluate.config_from_model_dir(str(trained_run))).test
    return split.images[:12]


@pytest.fixture(scope="module")
def image_folder(test_images, tmp_path_factory):
    """Good images of every kind, two bad files, nested folders. Returns (root, good, bad)."""
    root = tmp_path_factory.mktemp("images")
    (root / "a" / "b").mkdir(parents=True)
    good = {}
    for i in range(8):
        path = root / ("a" if i % 2 else "a/b") / f"test_{i}.png"
        Image.fromarray(test_images[i]).save(path)
        good[str(path)] = test_images[i]
    big = root / "big.jpg"
    Image.fromarray(test_images[8]).resize((96, 80), Image.Resampling.NEAREST).save(big, quality=95)
    Image.fromarray(test_images[9]).convert("L").save(root / "gray.png")
    Image.fromarray(test_images[10]).convert("RGBA").save(root / "rgba.png")
    Image.fromarray(test_images[11]).convert("P").save(root / "palette.gif")
    for name in ("big.jpg", "gray.png", "rgba.png", "palette.gif"):
        good[str(root / name)] = None  # converted: compared through load_image below
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "a" / "text.jpg").write_text("this is not a JPEG")
    (root / "README.txt").write_text("skipped: not an image extension")
    bad = [str(root / "a" / "text.jpg"), str(root / "corrupt.png")]
    return root, good, bad


def test_folder_with_bad_files(trained_run, image_folder, tmp_path, capsys):
    # In-process (the `python -m` path is exercised by the bad-input test below).
    root, good, bad = image_folder
    out = tmp_path / "predictions.csv"
    missing = tmp_path / "missing.png"
    status = predict.main(["predict", f"--model={trained_run / 'export'}", f"--output={out}",
                           str(root), str(missing)])
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert captured.out == ""  # the CSV went to --output
    errors = [line for line in captured.err.splitlines() if line.startswith("cifar_dist: error:")]
    assert len(errors) == 3, errors  # one line per bad file, nothing else
    for path in bad + [str(missing)]:
        assert sum(path + ":" in line for line in errors) == 1, (path, errors)
    notes = [line for line in captured.err.splitlines() if "note:" in line]
    assert notes == [f"cifar_dist: note: {root / 'big.jpg'}: resized from 96x80 to 32x32"]
    assert f"3 of {len(good) + 3} inputs failed; {len(good)} classified" in captured.err

    header, rows = read_rows(out.read_text())
    model = export.load_exported(str(trained_run / "export"))
    assert header == ["path", "label", "confidence"] + list(model.class_names)
    assert sorted(r[0] for r in rows) == sorted(good)
    probs = np.array([[float(v) for v in r[3:]] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    best = probs.argmax(1)
    assert [r[1] for r in rows] == [model.class_names[b] for b in best]
    np.testing.assert_allclose([float(r[2]) for r in rows], probs.max(1), atol=1e-6)
    # Each row combines the exported model on the decoded image and its mirror image (flip
    # TTA, the recorded default: their logits averaged; for the 32x32 PNGs, on the original
    # test image itself).
    from cifar_dist.images import load_image
    decoded = np.stack([good[r[0]] if good[r[0]] is not None else load_image(r[0])[0]
                        for r in rows])
    log_mean = 0.5 * (np.log(model.probabilities(decoded))
                      + np.log(model.probabilities(decoded[:, :, ::-1])))
    expected = np.exp(log_mean) / np.exp(log_mean).sum(1, keepdims=True)  # = mean of logits
    np.testing.assert_allclose(probs, expected, atol=2e-6)
    assert not np.allclose(probs, model.probabilities(decoded), atol=1e-4)  # it does differ


def test_all_good_exit_0_and_csv_on_stdout(trained_run, image_folder, capsys):
    root, good, _ = image_folder
    paths = sorted(p for p in good if p.endswith(".png"))[:5]
    assert predict.main(["predict", f"--model={trained_run}", "--notta", *paths]) == 0
    captured = capsys.readouterr()
    header, rows = read_rows(captured.out)
    assert [r[0] for r in rows] == paths  # the order given
    assert error_lines(captured.err) == []
    # --notta: the model's probabilities for each image alone.
    model = export.load_exported(str(trained_run / "export"))
    probs = np.array([[float(v) for v in r[3:]] for r in rows])
    np.testing.assert_allclose(probs, model.probabilities(np.stack([good[p] for p in paths])),
                               atol=2e-6)


def test_shipped_model_is_the_default(trained_run, image_folder, tmp_path, monkeypatch, capsys):
    _, good, _ = image_folder
    path = sorted(good)[0]
    monkeypatch.setattr(predict, "SHIPPED_MODEL", str(tmp_path / "assets" / "seed_model.keras"))
    assert predict.main(["predict", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cifar_dist: error: no --model given and no model shipped in the package "
                   f"({tmp_path / 'assets' / 'seed_model.keras'} is absent): pass "
                   "--model=MODEL_DIR/export"]
    (tmp_path / "assets").mkdir()
    shutil.copy(trained_run / "export" / "model.keras", tmp_path / "assets" / "seed_model.keras")
    shutil.copy(trained_run / "export" / "class_names.json", tmp_path / "assets")
    assert predict.main(["predict", path]) == 0
    assert read_rows(capsys.readouterr().out)[1][0][0] == path


def test_folder_is_classified_in_batches(trained_run, tmp_path):
    files = []
    rng = np.random.default_rng(0)
    for i in range(300):
        files.append(str(tmp_path / f"{i:03d}.png"))
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(files[-1])
    model = export.load_exported(str(trained_run / "export"))
    calls = []
    inner = model._fn
    model._fn = lambda batch: calls.append(int(batch.shape[0])) or inner(batch)
    found, errors = predict.expand_paths([str(tmp_path)])
    assert found == files and errors == []
    results = list(predict.predict_files(model, found, batch_size=128))
    assert calls == [128, 128, 44]  # whole batches, no per-image calls
    assert [r.path for r in results] == files and not any(r.error for r in results)


def test_bad_input_exits_2_and_writes_nothing(trained_run, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    out = tmp_path / "out.csv"
    cases = [([f"--model={trained_run}", f"--output={out}"], "at least one image"),
             ([f"--model={tmp_path / 'nope'}", f"--output={out}", image], "no such file"),
             ([f"--model={trained_run}", f"--output={tmp_path / 'no' / 'out.csv'}", image],
              "not a writable folder"),
             ([f"--model={trained_run}", f"--output={tmp_path}", image], "is a folder"),
             ([f"--model={trained_run}", "--batch_size=0", image], "batch_size"),
             (["--bogus", image], "bogus")]
    for args, message in cases:
        result = run_module("cifar_dist.predict", *args, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("cifar_dist: error: ") and message in lines[0], lines
        assert result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["x.png"]
