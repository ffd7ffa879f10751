"""PNG figures: training curves, confusion matrix, prediction grid, augmentation preview.

Every function takes plain arrays, writes one PNG and returns the matplotlib Figure (tests
read the plotted data back from it). Figures are built with matplotlib's object API on the
Agg canvas, never pyplot: no display, no global figure state, safe in any process.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

DPI = 100
CORRECT_COLOUR = "#1a7f37"
MISTAKE_COLOUR = "#c62828"


def _save(fig: Figure, path: str) -> Figure:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return fig


def _column(history, key):
    """Floats of one history column (NaN where a row lacks it)."""
    return np.array([float(row[key]) if row.get(key) not in (None, "") else np.nan
                     for row in history])


def training_curves(history, path: str, lr_curve=None, speed_curve=None, title: str = "",
                    train_note: str = "",
                    speed_title: str = "images/s per log window\n(incl. compile, eval, checkpoints)"
                    ) -> Figure:
    """Loss, accuracy (train vs test/validation) and learning rate per epoch.

    history: rows of history.csv (dicts). lr_curve / speed_curve: optional (epochs, values)
    recorded every few steps (TensorBoard scalars), finer than one point per epoch; a
    speed curve adds a fourth panel with images/s. train_note goes under the figure (say
    when the training figures were measured on augmented images with label smoothing).
    """
    if not history:
        raise ValueError("empty history: nothing to plot")
    epochs = _column(history, "epoch")
    eval_name = next((n for n in ("validation", "test") if f"{n}_loss" in history[0]), None)
    panels = 4 if speed_curve is not None else 3
    fig = Figure(figsize=(4.2 * panels, 3.6), layout="constrained")
    axes = fig.subplots(1, panels)
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        ax.plot(epochs, _column(history, f"train_{metric}"), "o-", label="train")
        if eval_name:
            ax.plot(epochs, _column(history, f"{eval_name}_{metric}"), "s-", label=eval_name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.legend()
    axes[1].set_ylim(0, 1)
    ax = axes[2]
    if lr_curve is not None:
        ax.plot(*lr_curve, "-", color="tab:purple", label="every log step")
    ax.plot(epochs, _column(history, "learning_rate"), "o", color="tab:purple",
            label="epoch end")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate")
    ax.legend()
    if speed_curve is not None:
        ax = axes[3]
        ax.plot(*speed_curve, "o-", color="tab:green", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("images / second")
        ax.set_title(speed_title, fontsize=10)
        ax.set_ylim(bottom=0)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    if title:
        fig.suptitle(title)
    if train_note:
        fig.supxlabel(train_note, fontsize=9)
    return _save(fig, path)


def confusion_matrix(matrix, class_names, path: str, title: str = "") -> Figure:
    """Heat map of a confusion matrix: colour = fraction of the true class, text = count."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    row_sums = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, row_sums, out=np.zeros(matrix.shape, float),
                          where=row_sums > 0)
    size = max(5.0, 0.55 * n + 2.5)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:  # beyond that the numbers are unreadable anyway
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if fractions[i, j] > 0.5 else "black")
    ax.set_title(title or f"confusion matrix ({int(matrix.sum())} images)")
    return _save(fig, path)


def mistakes_first_order(true_ids, pred_ids, confidence) -> np.ndarray:
    """Indices: mistakes by falling confidence, then correct predictions by falling confidence."""
    true_ids, pred_ids = np.asarray(true_ids), np.asarray(pred_ids)
    confidence = np.asarray(confidence)
    wrong = true_ids != pred_ids
    # lexsort: last key first; stable, so ties keep the data order.
    return np.lexsort((np.arange(len(true_ids)), -confidence, ~wrong))


def prediction_grid(images, true_ids, pred_ids, confidence, class_names, path: str,
                    columns: int = 8, rows: int = 4, title: str = ""):
    """Images with true and predicted labels, confident mistakes first.

    Returns (Figure, the indices shown in reading order).
    """
    order = mistakes_first_order(true_ids, pred_ids, confidence)[:columns * rows]
    rows = max(1, int(np.ceil(len(order) / columns)))
    fig = Figure(figsize=(1.55 * columns, 1.95 * rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).reshape(-1)
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, order):
        ok = true_ids[i] == pred_ids[i]
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(f"true: {class_names[true_ids[i]]}\npred: {class_names[pred_ids[i]]} "
                     f"{confidence[i]:.2f}", fontsize=8,
                     color=CORRECT_COLOUR if ok else MISTAKE_COLOUR)
    fig.suptitle(title or "most confident mistakes first (red: wrong, green: right)",
                 fontsize=10)
    return _save(fig, path), order


def augmentation_grid(originals, augmented, path: str, labels=None, class_names=None,
                      title: str = "") -> Figure:
    """One row per image: the original, then its augmented versions.

    originals: uint8 or [0, 1] float [N, H, W, C]; augmented: [N, K, H, W, C] in [0, 1].
    """
    n, k = augmented.shape[0], augmented.shape[1]
    fig = Figure(figsize=(1.25 * (k + 1), 1.3 * n + 0.6), layout="constrained")
    axes = np.asarray(fig.subplots(n, k + 1)).reshape(n, k + 1)
    for r in range(n):
        axes[r, 0].imshow(originals[r], interpolation="nearest")
        for c in range(k):
            axes[r, c + 1].imshow(np.clip(augmented[r, c], 0.0, 1.0), interpolation="nearest")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        if labels is not None and class_names is not None:
            axes[r, 0].set_ylabel(class_names[labels[r]], fontsize=8)
    axes[0, 0].set_title("original", fontsize=9)
    for c in range(k):
        axes[0, c + 1].set_title(f"augmented {c + 1}", fontsize=9)
    fig.suptitle(title or "augmentation: rotation +/-15 deg, shifts up to 10%, flip p=0.5",
                 fontsize=10)
    return _save(fig, path)
