"""cifar_dist.plots and cifar_dist.augment_preview: the plotted data are the data given."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cifar_dist import augment_preview, plots
from cifar_dist.data import load_synthetic
from conftest import run_module

NAMES = ["cat", "dog", "ship"]


def png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_training_curves_plot_the_history(tmp_path):
    history = [{"epoch": str(e), "step": str(10 * e), "train_loss": str(2.0 / e),
                "train_accuracy": str(0.2 * e), "learning_rate": str(0.1 / e),
                "validation_loss": str(2.2 / e), "validation_accuracy": str(0.18 * e)}
               for e in (1, 2, 3)]
    lr_steps = (np.array([0.5, 1.0, 1.5]), np.array([0.05, 0.1, 0.07]))
    fig = plots.training_curves(history, str(tmp_path / "c.png"), lr_curve=lr_steps)
    loss_ax, acc_ax, lr_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["train", "validation"]
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), [2.0, 1.0, 2 / 3])
    np.testing.assert_allclose(loss_ax.lines[1].get_ydata(), [2.2, 1.1, 2.2 / 3])
    np.testing.assert_allclose(acc_ax.lines[1].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(acc_ax.lines[1].get_ydata(), [0.18, 0.36, 0.54])
    np.testing.assert_allclose(lr_ax.lines[0].get_ydata(), lr_steps[1])
    np.testing.assert_allclose(lr_ax.lines[1].get_ydata(), [0.1, 0.05, 0.1 / 3])
    assert png_size(tmp_path / "c.png") == (1260, 360)  # 3 panels x 4.2 in x 100 dpi

    # Test columns instead of validation, no eval at all, and a speed panel.
    test_history = [{k.replace("validation", "test"): v for k, v in row.items()} for row in history]
    fig = plots.training_curves(test_history, str(tmp_path / "t.png"),
                                speed_curve=(np.array([1.0, 2.0]), np.array([100.0, 120.0])))
    assert len(fig.axes) == 4 and fig.axes[0].lines[1].get_label() == "test"
    np.testing.assert_allclose(fig.axes[3].lines[0].get_ydata(), [100, 120])
    train_only = [{k: v for k, v in row.items() if "validation" not in k} for row in history]
    assert len(plots.training_curves(train_only, str(tmp_path / "n.png")).axes[0].lines) == 1
    with pytest.raises(ValueError):
        plots.training_curves([], str(tmp_path / "e.png"))


def test_confusion_matrix_shows_every_count_and_name(tmp_path):
    matrix = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
    fig = plots.confusion_matrix(matrix, NAMES, str(tmp_path / "cm.png"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == [str(v) for v in matrix.ravel()]
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
    assert "25 images" in ax.get_title()
    # colour = fraction of the true class (rows of different sizes compare fairly)
    np.testing.assert_allclose(ax.images[0].get_array(), matrix / matrix.sum(1, keepdims=True))
    assert png_size(tmp_path / "cm.png") == (620, 500)


def test_prediction_grid_puts_confident_mistakes_first(tmp_path):
    true = np.array([0, 1, 2, 0, 1, 2])
    pred = np.array([0, 2, 2, 1, 1, 0])
    conf = np.array([0.9, 0.6, 0.5, 0.8, 0.95, 0.4])
    order = plots.mistakes_first_order(true, pred, conf)
    assert order.tolist() == [3, 1, 5, 4, 0, 2]  # mistakes 0.8, 0.6, 0.4; then right 0.95, ...
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    fig, shown = plots.prediction_grid(images, true, pred, conf, NAMES,
                                       str(tmp_path / "g.png"), columns=4, rows=2)
    assert shown.tolist() == order.tolist()
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in titled[:2]] == ["true: cat\npred: dog 0.80",
                                                     "true: dog\npred: ship 0.60"]
    assert titled[0].title.get_color() == plots.MISTAKE_COLOUR
    assert titled[3].title.get_color() == plots.CORRECT_COLOUR
    np.testing.assert_array_equal(titled[0].images[0].get_array(), images[3])
    png_size(tmp_path / "g.png")


def test_pick_examples_takes_one_per_class_first():
    labels = np.array([2, 2, 0, 1, 0, 2, 1])
    assert augment_preview.pick_examples(labels, 3).tolist() == [2, 3, 0]
    assert augment_preview.pick_examples(labels, 5).tolist() == [2, 3, 0, 1, 4]
    assert augment_preview.pick_examples(labels, 99).tolist() == [2, 3, 0, 1, 4, 5, 6]


def test_augmented_versions_are_seeded_and_differ():
    images = load_synthetic(4, 4).train.images
    a = augment_preview.augmented_versions(images, 3, seed=1)
    assert a.shape == (4, 3, 32, 32, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(augment_preview.augmented_versions(images, 3, seed=1), a)
    assert not np.allclose(augment_preview.augmented_versions(images, 3, seed=2), a)
    assert not np.allclose(a[:, 0], a[:, 1])  # versions of one image differ
    assert not np.allclose(a[:, 0], images / 255.0)  # and differ from the original


def test_augmentation_grid_layout(tmp_path):
    bundle = load_synthetic(3, 3, num_classes=3)
    originals = bundle.train.images
    augmented = augment_preview.augmented_versions(originals, 2, seed=0)
    fig = plots.augmentation_grid(originals, augmented, str(tmp_path / "a.png"),
                                  labels=bundle.train.labels, class_names=bundle.class_names)
    assert len(fig.axes) == 3 * 3
    assert [fig.axes[r * 3].get_ylabel() for r in range(3)] == \
        [bundle.class_names[i] for i in bundle.train.labels]
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), originals[0])
    np.testing.assert_allclose(fig.axes[2].images[0].get_array(), augmented[0, 1])


def test_augment_preview_command_on_real_data(tmp_path, capsys):
    out = tmp_path / "preview.png"
    assert augment_preview.main(["augment_preview", "--dataset=sample", f"--output={out}",
                                 "--num_images=4", "--num_augmentations=3"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    width, height = png_size(out)
    assert width == 500 and height > 400  # 4 columns x 1.25 in; 4 rows


def test_augment_preview_bad_input_exits_2(tmp_path):
    assert callable(augment_preview.run)  # setup.cfg: cifar-dist-augment-preview
    cases = [([], "--output=FILE.png is required"),
             ([f"--output={tmp_path / 'a.png'}", "--dataset=folder"], "needs --data_dir"),
             ([f"--output={tmp_path / 'a.png'}", f"--data_dir={tmp_path / 'nope'}"],
              "no such file or folder"),
             ([f"--output={tmp_path / 'x' / 'a.png'}", "--dataset=synthetic"], "not a writable"),
             ([f"--output={tmp_path / 'a.txt'}", "--dataset=synthetic"], ".png"),
             ([f"--output={tmp_path / 'a.png'}", "--num_images=0"], "num_images")]
    for args, message in cases:
        result = run_module("cifar_dist.augment_preview", *args, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("cifar_dist: error: ") and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []
